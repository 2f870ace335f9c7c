"""The FSDP2 training path on GPUs: student and teacher sharded, 50 steps, checkpoints, resume (a GPU-suite case).

    .venv/bin/python bench/fsdp2_case.py [--processes 2] [--workdir DIR]

transformers' Trainer runs FSDP only on accelerators, so this path has no CPU test. The case builds a ViT teacher
(6 blocks, width 192) and a ViT student config (4 blocks, width 96) with random weights and a synthetic image folder
(10 classes, 64 px), then runs the recipe through
``accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/run_distill.py ...`` twice:

1. 50 steps, checkpoints at 25 and 50;
2. a copy of run 1 cut back to checkpoint-25, resumed with ``--resume_from_checkpoint true`` to step 50.

It checks that both exit 0; that every checkpoint verifies (``verify_checkpoint``) and holds what transformers
writes under FSDP with FULL_STATE_DICT (model.safetensors, pytorch_model_fsdp.bin, optimizer.bin, one
rng_state_<rank>.pth per process); that the saved weights are the student's alone (its element count: the teacher
is never saved); that rank 0 logged the teacher sharded with about 1/N of its parameters; that the resumed run logs
the uninterrupted run's losses after step 25 and ends with its weights (bf16 tolerances); and that the final
student loads with ``from_pretrained``. Prints one JSON line. Exit 0: every check holds; 1: one failed (named);
2: no CUDA GPU (the case cannot run, nothing is built).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "accelerate" / "fsdp2.yaml"
RECIPE = ROOT / "recipes" / "run_distill.py"
sys.path.insert(0, str(ROOT))
SHARDED = re.compile(r"Teacher sharded with FSDP2 in (\d+) units: this process holds ([\d,]+) of its ([\d,]+) parameters")
LOSSES = ("loss", "loss_ce", "loss_kd", "loss_fft")
# bf16 autocast and NCCL reductions: the resumed run repeats the same batches, not necessarily the same bits.
LOSS_RTOL, WEIGHT_ATOL = 2e-2, 5e-3


def build_inputs(root: Path) -> dict[str, str]:
    """Teacher folder, student config and a class-coloured image folder under ``root``."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    def vit(hidden: int, layers: int) -> ViTConfig:
        return ViTConfig(image_size=64, patch_size=8, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=3, intermediate_size=4 * hidden, num_labels=10, layer_norm_eps=1e-6)

    torch.manual_seed(0)
    ViTForImageClassification(vit(192, 6)).save_pretrained(root / "teacher")
    vit(96, 4).save_pretrained(root / "student_config")
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("validation", 8)):
        for label in range(10):
            folder = root / "data" / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([25 * label, 255 - 25 * label, (80 * label) % 256], dtype=np.float32)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return {"teacher": str(root / "teacher"), "student": str(root / "student_config" / "config.json"),
            "data": str(root / "data")}


def launch(inputs: dict[str, str], output_dir: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes",
        str(processes), str(RECIPE), "--teacher", inputs["teacher"], "--student", inputs["student"],
        "--dataset", inputs["data"], "--output_dir", str(output_dir), "--max_steps", "50", "--save_steps", "25",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--learning_rate", "1e-3",
        "--logging_steps", "5", "--student_layers", "0", "3", "--teacher_layers", "0", "5", "--auto_augment", "none",
        "--reprob", "0", "--eval_strategy", "no", "--use_cpu", "false", "--bf16", "true", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "0", "--teacher_check_images", "0", "--evaluate_teacher", "false",
        "--profile_images", "0", "--dataloader_num_workers", "2", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)


def losses_after(checkpoint: Path, step: int) -> list[dict]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [{k: e[k] for k in LOSSES if k in e} for e in history if e.get("step", 0) > step and "loss" in e]


def check(processes: int, workdir: Path) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    from hf_spectralkd.checkpointing import verify_checkpoint

    inputs = build_inputs(workdir)
    failures: list[str] = []
    first = launch(inputs, workdir / "run", processes)
    if first.returncode != 0:
        return {"failures": [f"run 1 exited with {first.returncode}: {(first.stderr or first.stdout)[-2000:]}"]}
    shards = [tuple(int(n.replace(",", "")) for n in m) for m in SHARDED.findall(first.stdout + first.stderr)]
    if not shards:
        failures.append("no 'Teacher sharded with FSDP2' line in run 1's log")
    elif not all(abs(held / whole - 1 / processes) < 0.1 for _, held, whole in shards):
        failures.append(f"teacher shard sizes {shards} are not about 1/{processes} of its parameters")
    student_numel = sum(p.numel() for p in ViTForImageClassification(ViTConfig.from_json_file(inputs["student"]))
                        .parameters())
    for step in (25, 50):
        folder = workdir / "run" / f"checkpoint-{step}"
        problems = verify_checkpoint(folder) if folder.is_dir() else [f"{folder.name} is missing"]
        expected = {"model.safetensors", "pytorch_model_fsdp.bin", "optimizer.bin",
                    *(f"rng_state_{r}.pth" for r in range(processes))}
        missing = sorted(name for name in expected if not (folder / name).is_file())
        failures += [f"checkpoint-{step}: {p}" for p in problems] + [f"checkpoint-{step}: no {m}" for m in missing]
        if not missing:
            saved = sum(t.numel() for t in load_file(folder / "model.safetensors").values())
            if saved != student_numel:
                failures.append(f"checkpoint-{step}/model.safetensors holds {saved:,} elements, the student {student_numel:,}")
    if failures:
        return {"failures": failures, "teacher_shards": shards}

    resumed_dir = workdir / "resumed"
    shutil.copytree(workdir / "run" / "checkpoint-25", resumed_dir / "checkpoint-25")
    second = launch(inputs, resumed_dir, processes, "--resume_from_checkpoint", "true")
    if second.returncode != 0:
        return {"failures": [f"resumed run exited with {second.returncode}: {(second.stderr or second.stdout)[-2000:]}"]}
    original = losses_after(workdir / "run" / "checkpoint-50", 25)
    repeated = losses_after(resumed_dir / "checkpoint-50", 25)
    loss_diff = max((abs(a[k] - b[k]) / max(abs(a[k]), 1e-8) for a, b in zip(original, repeated) for k in a), default=0.0)
    if len(original) != len(repeated) or not original or loss_diff > LOSS_RTOL:
        failures.append(f"resumed losses differ: {len(original)} vs {len(repeated)} logs, max relative difference {loss_diff:.3g}")
    a, b = (load_file(d / "checkpoint-50" / "model.safetensors") for d in (workdir / "run", resumed_dir))
    weight_diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    if a.keys() != b.keys() or not math.isfinite(weight_diff) or weight_diff > WEIGHT_ATOL:
        failures.append(f"resumed weights differ from the uninterrupted run's by up to {weight_diff:.3g}")
    final = AutoModelForImageClassification.from_pretrained(resumed_dir)
    if not all(torch.isfinite(p).all() for p in final.parameters()):
        failures.append("the final student has non-finite weights")
    return {"failures": failures, "teacher_shards": shards, "resume_loss_max_rel_diff": loss_diff,
            "resume_weight_max_abs_diff": weight_diff}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=None, help="processes (GPUs); default: every visible GPU, at most 2")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build and run (default: a temporary folder)")
    options = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("fsdp2_case: needs CUDA GPUs (FSDP runs on accelerators only) and found none; nothing was run",
              file=sys.stderr)
        return 2
    processes = options.processes or min(torch.cuda.device_count(), 2)
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="fsdp2_case_"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"case": "fsdp2", "processes": processes, **check(processes, workdir), "workdir": str(workdir)}
    print(json.dumps(result))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
