"""What the checkpoint checksum manifest costs: hashing and verifying a DeiT-Tiny-sized checkpoint.

Builds DeiT-Tiny (1000 classes) from its config, saves it with an AdamW state after one step (what
a ``checkpoint-N`` of the paper's student holds, ~69 MB), then times ``write_manifest`` (done at
every save) and ``verify_checkpoint`` (done on resume and by ``hf-spectralkd verify``)::

    .venv/bin/python bench/manifest.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hf_spectralkd.checkpointing import verify_checkpoint, write_manifest
from hf_spectralkd.io.model_loading import load_model


def build_checkpoint(folder: Path) -> int:
    """A checkpoint-like folder (weights, config, optimizer, scheduler, trainer state); returns its size in bytes."""
    model = load_model("deit_tiny_patch16_224", id2label={i: str(i) for i in range(1000)}).model
    model.save_pretrained(folder)
    optimizer = torch.optim.AdamW(model.parameters())
    model(pixel_values=torch.randn(1, 3, 224, 224)).logits.sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0).state_dict(), folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    return sum(path.stat().st_size for path in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="Timed repetitions (the files stay in the page cache).")
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="manifest_bench_"))
    try:
        size = build_checkpoint(folder)
        write_times, verify_times = [], []
        for _ in range(options.repeats):
            started = time.perf_counter()
            write_manifest(str(folder))
            write_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            problems = verify_checkpoint(folder)
            verify_times.append(time.perf_counter() - started)
            assert not problems, problems
        result = {"checkpoint_mb": round(size / 1e6, 1), "write_manifest_s": round(statistics.median(write_times), 3),
                  "verify_checkpoint_s": round(statistics.median(verify_times), 3), "repeats": options.repeats}
        print(f"{result['checkpoint_mb']} MB checkpoint: write_manifest {result['write_manifest_s']} s, "
              f"verify_checkpoint {result['verify_checkpoint_s']} s (median of {options.repeats})")
        print(json.dumps(result))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
