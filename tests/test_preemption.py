"""Preemption as schedulers send it: SIGTERM to the whole process group, DataLoader workers included.

The signal must end the run at a step boundary with a checkpoint of exactly that step (weights, RNG,
data position, image counts), exit code 143 and one line, never a traceback; a resumed run must then
match an uninterrupted one bit for bit. Ctrl-C while the program starts (its imports take seconds)
must end with one line and exit code 130.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    RECIPE,
    RECIPE_ENV,
    SyntheticImageDataset,
    assert_complete_checkpoint,
    checkpoints,
    run_recipe_process,
    run_with_fault,
    tiny_cait,
    tiny_run_args,
    tiny_vit,
)
from safetensors.torch import load_file

import hf_spectralkd.checkpointing.atomic as checkpointing
from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer
from hf_spectralkd.checkpointing import LOCK_FILE


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (from /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def with_dropout(config_file: str, folder: Path) -> str:
    """A copy of a student config with dropout on, so that a resume that misplaces the RNG state shows in the weights."""
    config = json.loads(Path(config_file).read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder / "config.json")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_sigterm_to_the_process_group_saves_the_step_it_reports_and_resumes_bit_exactly(
    saved_models, imagefolder, tmp_path
):
    models = {**saved_models, "student_config": with_dropout(saved_models["student_config"], tmp_path / "student")}
    # 24 images at batch 4: one epoch of 6 steps, so the 2 workers are running when the signal comes.
    extra = ["--max_steps", "6", "--save_steps", "100", "--logging_steps", "1", "--dataloader_num_workers", "2",
             "--eval_strategy", "no", "--evaluate_teacher", "false", "--profile_images", "0"]
    full, stopped, marker = tmp_path / "full", tmp_path / "stopped", tmp_path / "in_step_3"
    reference = subprocess.Popen([sys.executable, str(RECIPE), *tiny_run_args(models, imagefolder, full, *extra)],
                                 env=RECIPE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    argv = tiny_run_args(models, imagefolder, stopped, *extra)
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file, not a pipe: the child never blocks on its logs
        process = run_with_fault(argv, f"term_in_step:3:{marker}", stdout=subprocess.DEVNULL, stderr=stderr,
                                 start_new_session=True)  # its own process group, as a job's
        deadline = time.time() + 240
        while not marker.exists():
            assert process.poll() is None and time.time() < deadline, "the run never reached step 3"
            time.sleep(0.02)
        assert len(group_members(process.pid)) >= 3  # the main process and its 2 DataLoader workers get the signal
        os.killpg(process.pid, signal.SIGTERM)  # `kill -TERM -- -PGID`, while step 3 is in progress
        process.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert f"stopped at step 3 of 6 on SIGTERM; checkpoint saved: checkpoint-3 in {stopped}" in err
    # The checkpoint is of the step the run reports, with that step's counters; no final student.
    assert checkpoints(stopped) == ["checkpoint-3"] and not (stopped / "model.safetensors").exists()
    assert_complete_checkpoint(stopped / "checkpoint-3", step=3)
    assert json.loads((stopped / "checkpoint-3" / "image_counts.json").read_text())["train_images"] == 3 * 4
    assert not (stopped / LOCK_FILE).exists() and group_members(process.pid) == []  # no worker left behind

    assert reference.wait(timeout=300) == 0
    run_recipe_process(tiny_run_args(models, imagefolder, stopped, *extra, "--resume_from_checkpoint", "true"))
    expected, resumed = load_file(full / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)  # dropout drew the same masks
    results = [json.loads((folder / "results.json").read_text()) for folder in (full, stopped)]
    assert results[1]["train_images"] == results[0]["train_images"] == 6 * 4




@pytest.mark.parametrize("during", ["evaluation", "save"])
def test_sigterm_during_an_evaluation_or_a_save_lets_it_finish_then_stops_at_that_step(during, tmp_path, monkeypatch):
    def terminate_during(function):
        def wrapped(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # this process's handler runs at once, in the middle of it
            return function(*args, **kwargs)
        return wrapped

    # evaluation at step 3 only; a scheduled save at step 2 only
    if during == "evaluation":
        monkeypatch.setattr(SpectralDistillationTrainer, "evaluation_loop",
                            terminate_during(SpectralDistillationTrainer.evaluation_loop))
    else:
        monkeypatch.setattr(checkpointing, "publish_staged_folder", terminate_during(checkpointing.publish_staged_folder))
    args = SpectralDistillationConfig(
        output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=8, logging_steps=1, save_steps=2,
        eval_strategy="steps", eval_steps=3, use_cpu=True, report_to=[], disable_tqdm=True, seed=0,
        student_layers=[0, 2], teacher_layers=[0, 3], teacher_check_images=0,
    )
    if during == "evaluation":
        args.save_steps = 100
    else:
        args.eval_steps = 100
    trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(), args=args,
                                          train_dataset=SyntheticImageDataset(64), eval_dataset=SyntheticImageDataset(16))
    previous = signal.getsignal(signal.SIGTERM)
    trainer.train()
    step = 3 if during == "evaluation" else 2
    assert trainer.preempted_at_step == trainer.state.global_step == step
    assert checkpoints(tmp_path / "run") == [f"checkpoint-{step}"]  # the save that was interrupted is the only one
    assert_complete_checkpoint(tmp_path / "run" / f"checkpoint-{step}", step=step)
    if during == "evaluation":  # the evaluation finished and was logged
        assert [e["step"] for e in trainer.state.log_history if "eval_loss" in e] == [3]
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler lives only while training


# ------------------------------------------------------------------------------------------------
# Ctrl-C while a command starts
# ------------------------------------------------------------------------------------------------
#: Loaded by Python at start-up from PYTHONPATH: in the middle of the long imports (transformers' modeling
#: code, which pulls in torch), create a marker file and wait there for the test's Ctrl-C.
PAUSE_IN_IMPORTS = '''
import os, sys, time

class PauseInImports:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers.modeling_utils":
            sys.meta_path.remove(self)
            open(os.environ["PAUSED_MARKER"], "w").close()
            time.sleep(120)
        return None

sys.meta_path.insert(0, PauseInImports())
'''


@pytest.mark.slow
def test_ctrl_c_while_a_command_imports_its_libraries_prints_one_line_and_exits_130(saved_models, imagefolder, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(PAUSE_IN_IMPORTS)
    argv = tiny_run_args(saved_models, imagefolder, tmp_path / "out")
    commands = {"recipe": [sys.executable, str(RECIPE), *argv],
                "hf-spectralkd": [str(Path(sys.executable).with_name("hf-spectralkd")), "distill", *argv]}
    runs = {}
    for name, command in commands.items():
        marker = tmp_path / f"paused-{name}"
        env = {**RECIPE_ENV, "PAUSED_MARKER": str(marker),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), RECIPE_ENV.get("PYTHONPATH")]))}
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        runs[name] = (process, marker)
    for name, (process, marker) in runs.items():
        deadline = time.time() + 120
        while not marker.exists():
            assert process.poll() is None and time.time() < deadline, f"{name} never reached its imports"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the foreground process group
    for name, (process, _) in runs.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130, (name, err[-2000:])
        assert err.strip().splitlines() == ["interrupted while starting; nothing was written"], (name, err[-2000:])
    assert not (tmp_path / "out").exists()


def test_sigterm_while_the_demo_teacher_trains_keeps_no_half_trained_teacher(tmp_path, monkeypatch):
    """A demo teacher stopped by SIGTERM is not saved where --teacher points (every later run would take it as
    the trained teacher); its folder is removed so that the next run trains it again."""
    from types import SimpleNamespace

    from hf_spectralkd import SpectralDistillationConfig
    from hf_spectralkd.demo import train_demo_teacher
    from hf_spectralkd.training import SpectralDistillationTrainer

    def stopped_at_step_2(self, *args, **kwargs):  # what the preemption watch leaves after SIGTERM at step 2
        (Path(self.args.output_dir) / "checkpoint-2").mkdir(parents=True)
        self.preempted_at_step = 2

    data = SimpleNamespace(train=SyntheticImageDataset(8, num_labels=3), collator=None, streaming=False,
                           id2label={0: "a", 1: "b", 2: "c"})
    args = SpectralDistillationConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], teacher_check_images=0)
    teacher_dir = tmp_path / "teacher"
    monkeypatch.setattr(SpectralDistillationTrainer, "train", stopped_at_step_2)
    assert train_demo_teacher("demo_vit_teacher", str(teacher_dir), data, args, None, 1.0, 1e-3) is False
    assert not teacher_dir.exists()
    monkeypatch.setattr(SpectralDistillationTrainer, "train", lambda self, *a, **k: None)  # a run that completes
    assert train_demo_teacher("demo_vit_teacher", str(teacher_dir), data, args, None, 1.0, 1e-3) is True
    assert (teacher_dir / "model.safetensors").exists()
