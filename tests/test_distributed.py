"""Two CPU processes (gloo) under torchrun: plain DDP and DeepSpeed ZeRO-2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

import hf_spectralkd  # noqa: F401  (registers the Lift and WideLast students with the Auto classes)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "dist_train.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(out: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(SCRIPT), "--out", str(out), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def components(log_history: list[dict]) -> list[dict]:
    keys = ("loss", "loss_ce", "loss_kd", "loss_fft", "eval_loss", "eval_loss_ce", "eval_loss_kd", "eval_loss_fft")
    return [{k: e[k] for k in keys if k in e} for e in log_history if any(k in e for k in keys)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, run_two_processes(out)


@pytest.mark.slow
def test_ddp_two_processes_complete_and_agree(ddp_run):
    out, ranks = ddp_run
    assert [r["world_size"] for r in ranks] == [2, 2]
    first, second = components(ranks[0]["log_history"]), components(ranks[1]["log_history"])
    assert len(first) == 3 and first == second  # two train logs and one eval log, identical on both ranks
    assert all(entry["loss_fft"] > 0 for entry in first if "loss_fft" in entry)
    # the teacher is not wrapped in DDP (no gradients to synchronise)
    assert ranks[0]["teacher_type"] == "TimmWrapperForImageClassification"
    assert (out / "checkpoint-6" / "model.safetensors").exists()
    reloaded = AutoModelForImageClassification.from_pretrained(out / "student")
    assert reloaded.config.num_labels == 5


@pytest.mark.skipif(not __import__("importlib").util.find_spec("deepspeed"), reason="deepspeed extra not installed")
@pytest.mark.slow
def test_deepspeed_zero2_two_processes_match_ddp(ddp_run, tmp_path):
    _, ddp_ranks = ddp_run
    ranks = run_two_processes(tmp_path, "--deepspeed", str(ROOT / "recipes" / "accelerate" / "ds_zero2.json"))
    assert all(r["deepspeed"] for r in ranks)
    assert ranks[0]["teacher_type"] == "DeepSpeedEngine"  # a stage-0 inference replica
    first, second = components(ranks[0]["log_history"]), components(ranks[1]["log_history"])
    assert first == second
    for ds_entry, ddp_entry in zip(first, components(ddp_ranks[0]["log_history"])):
        for key, value in ddp_entry.items():
            assert ds_entry[key] == pytest.approx(value, rel=1e-4, abs=1e-6)
    state = AutoModelForImageClassification.from_pretrained(tmp_path / "student").state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.skipif(not __import__("importlib").util.find_spec("deepspeed"), reason="deepspeed extra not installed")
@pytest.mark.slow
def test_deepspeed_zero3_two_processes_shard_student_and_teacher(tmp_path):
    ranks = run_two_processes(tmp_path, "--deepspeed", str(ROOT / "recipes" / "accelerate" / "ds_zero3.json"))
    assert ranks[0]["teacher_type"] == "DeepSpeedEngine"
    first, second = components(ranks[0]["log_history"]), components(ranks[1]["log_history"])
    assert len(first) == 3 and first == second
    assert all(entry["loss_fft"] > 0 for entry in first if "loss_fft" in entry)
    # saved with stage3_gather_16bit_weights_on_model_save: a whole student, loadable without DeepSpeed
    student = AutoModelForImageClassification.from_pretrained(tmp_path / "student")
    assert student.config.num_labels == 5 and all(torch.isfinite(p).all() and p.numel() > 0 for p in student.parameters())
    # Each process holds a shard of every parameter; the card counts the whole model.
    whole = sum(p.numel() for p in student.parameters())
    assert f"({whole:,} parameters)" in (tmp_path / "student" / "README.md").read_text()


@pytest.mark.parametrize("student", ["lift", "widelast"])
def test_ddp_trains_lift_and_widelast_without_searching_for_unused_parameters(student, tmp_path):
    """With find_unused_parameters=False, DDP fails at the second step if any parameter got no gradient in the
    first; Lift creates no unused head or final norm, so six steps and an evaluation complete."""
    ranks = run_two_processes(tmp_path, "--student", student)
    assert [r["find_unused_parameters"] for r in ranks] == [False, False]
    first, second = components(ranks[0]["log_history"]), components(ranks[1]["log_history"])
    assert len(first) == 3 and first == second
    assert all(entry["loss_fft"] > 0 for entry in first if "loss_fft" in entry)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "student")
    assert reloaded.config.model_type == f"{student}_vit"


def test_a_finished_recipe_tears_its_process_group_down(tmp_path, monkeypatch):
    """gloo threads left running at exit can abort a process that finished its work (SIGABRT, exit code 1), so the
    recipe destroys the process group when the run returns normally, and keeps it when the run raised."""
    import torch.distributed as dist

    from hf_spectralkd.cli import distill
    argv = ["demo", "--output_dir", str(tmp_path / "run"), "--report_to", "none"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(distill, "run", lambda *a: (_ for _ in ()).throw(RuntimeError("failed mid-run")))
        with pytest.raises(RuntimeError, match="failed mid-run"):
            distill.main.__wrapped__(argv)
        assert dist.is_initialized()  # the other ranks may still be in a collective: no teardown after an error

        monkeypatch.setattr(distill, "run", lambda *a: 0)
        assert distill.main.__wrapped__(argv) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
