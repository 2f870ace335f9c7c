"""The recipe with one fault injected, chosen by the environment (tests/test_faults.py launches it).

HF_SPECTRALKD_TEST_FAULT:
  kill_before_rename:N   SIGKILL this process after checkpoint-N is written and flushed, before its rename
  hang_in_eval:MARKER    at the first evaluation, create MARKER and wait (for the test's Ctrl-C)
  term_in_step:K:MARKER  in the K-th training forward (step K in progress), create MARKER and wait until this
                         process has received the test's SIGTERM, then go on
"""

import os
import signal
import sys
import time
from pathlib import Path

import hf_spectralkd.checkpointing.atomic as checkpointing
from hf_spectralkd.cli.distill import main
from hf_spectralkd.training import SpectralDistillationTrainer

fault, _, value = os.environ["HF_SPECTRALKD_TEST_FAULT"].partition(":")

if fault == "kill_before_rename":
    flush = checkpointing._fsync_tree

    def flush_then_die(root):
        flush(root)
        if os.path.basename(root) == f"checkpoint-{value}":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpointing._fsync_tree = flush_then_die
elif fault == "hang_in_eval":
    evaluate = SpectralDistillationTrainer.evaluation_loop

    def hang(self, *args, **kwargs):
        Path(value).touch()
        time.sleep(120)
        return evaluate(self, *args, **kwargs)

    SpectralDistillationTrainer.evaluation_loop = hang
elif fault == "term_in_step":
    step, _, marker = value.partition(":")
    compute_loss = SpectralDistillationTrainer.compute_loss
    forwards = {"train": 0}

    def wait_for_sigterm(self, model, inputs, *args, **kwargs):
        if model.training:
            forwards["train"] += 1
            if forwards["train"] == int(step):
                Path(marker).touch()
                watch = getattr(self, "_preemption", None)  # None in versions before PreemptionWatch:
                deadline = time.time() + (120 if watch is not None else 5)  # their handler acted 3 s after the signal
                while not (watch is not None and watch.received) and time.time() < deadline:
                    time.sleep(0.01)
        return compute_loss(self, model, inputs, *args, **kwargs)

    SpectralDistillationTrainer.compute_loss = wait_for_sigterm
else:
    raise SystemExit(f"unknown fault {fault!r}")

sys.exit(main())
