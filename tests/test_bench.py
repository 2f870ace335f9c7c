"""bench/gpu_suite.sh: every stage runs on the CPU with tiny models and writes its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_runs_every_stage_on_cpu_quick(tmp_path):
    out = tmp_path / "suite.jsonl"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": os.sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_stage = {}
    for record in records:
        by_stage.setdefault(record["stage"], []).append(record)
    assert by_stage["device"][0]["device"] == "cpu"
    steps = {r["variant"]: r for r in by_stage["step"]}
    assert set(steps) == {"eager", "compiled_both"}
    assert steps["compiled_both"]["step"]["compile_student"] == "default" and steps["eager"]["images_per_s"] > 0
    assert 0 < steps["eager"]["teacher_share"] < 1
    kernels = by_stage["kernels"][0]
    assert kernels["variant"] in steps and len(kernels["top_kernels"]) == 10
    assert by_stage["decode"][0]["backend"] == "torchvision" and by_stage["decode"][0]["images_per_s"]["0"] > 0
    assert by_stage["end_to_end"][0]["images_per_s"] > 0 and by_stage["end_to_end"][0]["data_backend"] == "torchvision"
    fsdp2 = by_stage["fsdp2"][0]
    assert fsdp2 == {"stage": "fsdp2", "skipped": "FSDP2 training runs on CUDA devices only"}
