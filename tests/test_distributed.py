"""Two CPU processes (gloo) under torchrun: plain DDP, DeepSpeed ZeRO-2 and ZeRO-3, the teacher sharded with FSDP2."""

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
SHARD_SCRIPT = ROOT / "tests" / "scripts" / "shard_teacher.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(out: Path, *extra: str, script: Path = SCRIPT) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), "--out", str(out), *extra]
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


@pytest.mark.slow
def test_fsdp2_teacher_is_sharded_in_halves_and_computes_what_the_whole_teacher_does(tmp_path):
    """place_teacher under FSDP2 on 2 gloo processes: logits and every tapped map equal the unsharded teacher's
    (ViT: embeddings and layers as units; Swin: stages), each rank holds about half of the parameters, and the
    teacher stays frozen in eval mode and out of accelerate's prepared models (the stub refuses prepare_model)."""
    ranks = run_two_processes(tmp_path, script=SHARD_SCRIPT)
    for family, units, taps in (("vit", 5, 2), ("swin", 4, 3)):  # ViT: embeddings, 3 layers, root; Swin: 3 stages, root
        first, second = ranks[0][family], ranks[1][family]
        for rank in (first, second):
            assert rank["logits_max_diff"] == 0.0 and rank["maps_max_diff"] == [0.0] * taps
            assert rank["units"] == units and rank["sharded"]
            assert not rank["training"] and not rank["requires_grad"]
            assert 0.45 < rank["local_numel"] / rank["whole_numel"] < 0.55
        assert first["local_numel"] + second["local_numel"] == first["whole_numel"]  # every element held once


def test_teacher_blocks_follow_no_split_modules_else_the_encoder_layers():
    from helpers import tiny_cait, tiny_swin, tiny_vit

    from hf_spectralkd.training.teacher_sharding import teacher_blocks
    vit, swin, cait = tiny_vit(layers=3), tiny_swin(), tiny_cait(depth=4)
    assert [type(b).__name__ for b in teacher_blocks(vit)] == ["ViTEmbeddings"] + ["ViTLayer"] * 3
    assert teacher_blocks(swin) == list(swin.swin.encoder.layers)  # SwinStage, one per stage
    # TimmWrapper lists only its whole backbone: the longest uniform stack (CaiT's 4 blocks, not its 1 class block).
    assert teacher_blocks(cait) == list(cait.timm_model.blocks)


@pytest.mark.parametrize("case", ["fsdp_flag", "use_cpu", "fsdp1"])
def test_fsdp_where_it_cannot_run_is_refused_in_one_line_before_any_data(case, tmp_path, capsys, monkeypatch):
    """transformers' Trainer would train as DDP under --use_cpu without a word, stop without a GPU after the data has
    loaded, and accelerate's FSDP1 leaves the teacher on the CPU: the recipe refuses each while parsing (exit 2)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from helpers import run_and_capture

    from hf_spectralkd.cli import main
    out = tmp_path / "run"
    argv = ["distill", "demo", "--output_dir", str(out), "--report_to", "none"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    argv += [] if case == "use_cpu" else ["--use_cpu", "false"]  # the demo config sets use_cpu: true
    if case == "fsdp_flag":
        argv.append("--fsdp")
        expected = "error: fsdp: FSDP needs CUDA devices and this run has none (no GPU); on CPU train with DDP"
    else:
        # What accelerate launch --config_file sets for an FSDP config: the shipped one, or the same as FSDP1.
        shipped = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "fsdp2.yaml"))
        assert shipped.distributed_type == DistributedType.FSDP
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", str(shipped.fsdp_config["fsdp_version"]) if case == "use_cpu" else "1")
        expected = ("error: accelerate launch (an FSDP config: ACCELERATE_USE_FSDP=true): " + (
            "FSDP needs CUDA devices and this run has none (use_cpu)" if case == "use_cpu"
            else "FSDP version 1 is not supported (the teacher is sharded with FSDP2)"))
    code, err = run_and_capture(main, argv, capsys)
    assert code == 2 and err.startswith(expected) and err.count("\n") == 1, err
    assert not out.exists()  # nothing loaded, nothing written


def test_the_fsdp2_gpu_case_says_in_one_line_that_it_needs_cuda():
    """bench/fsdp2_case.py (the FSDP2 training path: 50 steps, checkpoints, resume) runs in the GPU suite only."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "fsdp2_case.py")], env=env, capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "fsdp2_case: needs CUDA GPUs (FSDP runs on accelerators only) and found none; nothing was run\n"
