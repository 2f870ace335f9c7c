"""The model card beside every saved student (a part of the trainer).

:class:`ModelCardWriter` renders the SpectralKD card (:func:`~hf_spectralkd.io.hub.write_model_card`) from
the run's :class:`~hf_spectralkd.io.run_summary.RunSummary`, brought up to date with the trainer's state,
wherever the trainer saves the student: the final folder, each checkpoint, and before
``push_to_hub`` (which would otherwise write transformers' generic card).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..io.hub import write_model_card
from ..io.run_summary import RunSummary


class ModelCardWriter:
    """Writes ``README.md`` for the student.

    Args:
        summary: the run's record of models, data and results.
        args: the training arguments (``output_dir`` names the card, ``hub_model_id`` its repository).
        compilation: what the run compiled (:meth:`CompiledStep.describe`), ``None`` for an eager run.
    """

    def __init__(self, summary: RunSummary, args: Any, compilation: Optional[str] = None):
        self.summary, self.args = summary, args
        summary.compilation = compilation

    def write(self, output_dir: str, state: Any) -> Path:
        """Record ``state`` (a ``TrainerState``: steps, best metric) in the summary and write the card in ``output_dir``."""
        self.summary.record_training_state(state)
        return write_model_card(self.summary, output_dir, self.args.hub_model_id, model_name=Path(self.args.output_dir).name)
