"""The recipe with one fault injected, chosen by the environment (tests/test_faults.py launches it).

HF_SPECTRALKD_TEST_FAULT:
  kill_before_rename:N   SIGKILL this process after checkpoint-N is written and flushed, before its rename
  hang_in_eval:MARKER    at the first evaluation, create MARKER and wait (for the test's Ctrl-C)
  term_in_step:K:MARKER  in the K-th training forward (step K in progress), create MARKER and wait until this
                         process has received the test's SIGTERM, then go on
  fill_disk_after_save:N:FILLER   once checkpoint-N is in place, fill its file system with FILLER, leaving room for
                         its model.safetensors and half its optimizer.pt (the next checkpoint fails in torch.save)
  fill_disk_before_final:FILLER   before the final save, fill the file system with FILLER, leaving room for half of
                         the newest checkpoint's model.safetensors (the final student fails in safetensors)
  remount_ro_after_save:N:MOUNT   once checkpoint-N is in place, remount MOUNT read-only (needs root)

The disk fills for real (the kernel's ENOSPC, mid-file); only the moment is chosen here, which a size given
to the mount could not pin down as exactly (tmpfs counts whole pages, and the run writes more than checkpoints).
"""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hf_spectralkd.checkpointing.atomic as checkpointing
from hf_spectralkd.checkpointing import checkpoint_folders
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
elif fault in ("fill_disk_after_save", "fill_disk_before_final", "remount_ro_after_save"):

    def fill(filler: Path, leave: int) -> None:
        """Write zeros to ``filler`` until the file system is full, then give ``leave`` bytes back."""
        chunk = b"\0" * (1 << 16)
        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(chunk)
                    handle.flush()
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
        os.truncate(filler, max(0, filler.stat().st_size - leave))

    if fault == "fill_disk_before_final":
        save_model = SpectralDistillationTrainer.save_model

        def fill_then_save(self, output_dir=None, _internal_call=False):
            if output_dir is None:  # the recipe's final save; checkpoints pass their staging folder
                newest = checkpoint_folders(self.args.output_dir)[-1]
                fill(Path(value), (newest / "model.safetensors").stat().st_size // 2)
            return save_model(self, output_dir, _internal_call)

        SpectralDistillationTrainer.save_model = fill_then_save
    else:
        step, _, target = value.partition(":")
        publish = checkpointing.publish_staged_folder

        def publish_then_fault(staged, final):
            publish(staged, final)
            if os.path.basename(final) != f"checkpoint-{step}":
                return
            if fault == "remount_ro_after_save":
                subprocess.run(["mount", "-o", "remount,ro", target], check=True)
            else:
                sizes = {name: os.path.getsize(os.path.join(final, name)) for name in ("model.safetensors", "optimizer.pt")}
                fill(Path(target), sizes["model.safetensors"] + 16384 + sizes["optimizer.pt"] // 2)

        checkpointing.publish_staged_folder = publish_then_fault
else:
    raise SystemExit(f"unknown fault {fault!r}")

sys.exit(main())
