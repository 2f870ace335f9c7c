"""Reloads that restore the weights (a transformers 5.23 workaround).

transformers 5.23 restores ViT-family checkpoints with a raw ``load_state_dict`` whose keys (the
in-memory names) do not match the saved ones (the Hub names), so a resumed run silently restarts
from its initial weights (huggingface/transformers#48805). :func:`load_weights_from_folder` goes
through ``from_pretrained``, which converts the keys, and refuses damaged or incomplete files.
"""

from __future__ import annotations

import os
from typing import Optional

from torch import nn

from ..io.integrity import damaged, loading_problems, model_folder_problems
from ..utils import unwrap_model

#: What to do about a damaged checkpoint.
OTHER_CHECKPOINT = ("resume from an earlier checkpoint-* (`hf-spectralkd verify OUTPUT_DIR` lists those that load), or "
                    "copy the checkpoint again")


def single_file_checkpoint(folder: Optional[str]) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "model.safetensors"))


def load_weights_from_folder(model: nn.Module, folder: str, argument: str = "resume_from_checkpoint") -> None:
    """Copy the weights saved in ``folder`` (``save_pretrained`` layout) into ``model``, strictly.

    Raises :class:`~hf_spectralkd.errors.DamagedFileError` naming ``argument`` if a weights file is
    damaged or lacks tensors: ``from_pretrained`` would re-initialise those and
    ``load_state_dict(strict=True)`` could not tell.
    """
    problems = model_folder_problems(folder)
    if problems:
        raise damaged(argument, folder, problems, OTHER_CHECKPOINT)
    target = unwrap_model(model)
    reloaded, info = type(target).from_pretrained(folder, config=target.config, output_loading_info=True,
                                                  ignore_mismatched_sizes=True)
    problems = loading_problems(info, reloaded)
    if problems:
        raise damaged(argument, folder, problems, OTHER_CHECKPOINT)
    target.load_state_dict(reloaded.state_dict(), strict=True)
    del reloaded
