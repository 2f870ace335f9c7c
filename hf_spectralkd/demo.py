"""The offline demo's first stage: train a small teacher when the demo's teacher folder is missing.

``make demo`` distils a student from a teacher trained on the same 5,000 digits
(:mod:`hf_spectralkd.data.demo`); nothing can be downloaded, so the teacher is trained here first,
with the recipe's own trainer and data, and saved where ``--teacher`` points.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil

from .io.model_loading import load_model

logger = logging.getLogger(__name__)


def train_demo_teacher(
    architecture: str, output_dir: str, data, args, processor, epochs: float, learning_rate: float
) -> bool:
    """Train ``architecture`` from scratch without a teacher on ``data.train`` and save it to ``output_dir``;
    ``False`` when SIGTERM stopped it: then nothing is kept in ``output_dir`` (a half-trained teacher saved
    there would be taken as the demo's teacher by every later run), and the next run trains it again.

    ``args`` is the distillation run's ``SpectralDistillationConfig``; batch size, precision and
    seed are kept, the objective becomes plain cross-entropy and nothing is evaluated or pushed.
    """
    from transformers import set_seed

    from .training import SpectralDistillationTrainer

    # Seeded here, not by whatever was built before: every demo (plain or WideLast student) trains the same teacher.
    set_seed(args.seed)
    loaded = load_model(architecture, argument="teacher_architecture", id2label=data.id2label)
    teacher_args = dataclasses.replace(
        args,
        output_dir=output_dir,
        distillation_type="none",
        beta=0.0,
        layer_map="manual",
        student_layers=None,
        teacher_layers=None,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        max_steps=-1 if not data.streaming else args.max_steps,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
        resume_from_checkpoint=None,
        report_to=[],
    )
    logger.info("training a %s teacher into %s (%s epochs)", architecture, output_dir, epochs)
    trainer = SpectralDistillationTrainer(
        model=loaded.model, args=teacher_args, train_dataset=data.train, data_collator=data.collator,
        processing_class=processor,
    )
    trainer.train()
    if trainer.preempted_at_step is not None:
        shutil.rmtree(output_dir, ignore_errors=True)
        return False
    trainer.save_model(output_dir)
    return True
