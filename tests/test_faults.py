"""What checkpointing promises, under faults: a full disk, a kill mid-save, two runs on one folder, Ctrl-C."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import run_distill
import torch
from helpers import RECIPE, RECIPE_ENV, ROOT, run_and_capture, tiny_run_args
from safetensors.torch import load_file

from hf_spectralkd.checkpointing import LOCK_FILE, STAGING_DIR, OutputDirLock
from hf_spectralkd.errors import OutputDirLockedError

FAULTY_RECIPE = ROOT / "tests" / "scripts" / "faulty_recipe.py"


def checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))


def assert_complete_checkpoint(folder: Path, step: int) -> None:
    """Everything resume reads is there and loads."""
    assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    torch.load(folder / "optimizer.pt", weights_only=True)
    torch.load(folder / "scheduler.pt", weights_only=True)


def run_with_fault(argv: list[str], fault: str, **popen) -> subprocess.Popen:
    env = {**RECIPE_ENV, "HF_SPECTRALKD_TEST_FAULT": fault}
    return subprocess.Popen([sys.executable, str(FAULTY_RECIPE), *argv], env=env, **popen)


def test_full_disk_at_the_second_save_stops_with_one_line_and_the_first_checkpoint_resumes(
    saved_models, imagefolder, tmp_path, capsys, monkeypatch
):
    import transformers.modeling_utils as modeling_utils

    write_weights = modeling_utils.safe_save_file
    calls = {"n": 0}

    def disk_fills_during_the_second_write(state_dict, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"\0" * 64)  # part of the file made it, then the disk was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return write_weights(state_dict, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", disk_fills_during_the_second_write)
    out = tmp_path / "out"
    argv = tiny_run_args(saved_models, imagefolder, out, "--eval_strategy", "no", "--profile_images", "0")
    code, err = run_and_capture(run_distill.main, argv, capsys)
    assert code == 1, err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert line.startswith(f"error: checkpoint: could not write checkpoint-4 in '{out}'"), line
    assert "No space left on device" in line and "checkpoint-2 is the last complete checkpoint" in line
    assert "Traceback" not in err
    assert checkpoints(out) == ["checkpoint-2"] and not (out / STAGING_DIR).exists()
    assert_complete_checkpoint(out / "checkpoint-2", step=2)

    monkeypatch.setattr(modeling_utils, "safe_save_file", write_weights)  # space was freed
    assert run_distill.main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert json.loads((out / "results.json").read_text())["global_steps"] == 4


def test_kill_between_the_write_and_the_rename_leaves_only_complete_checkpoints(saved_models, imagefolder, tmp_path):
    out = tmp_path / "out"
    argv = tiny_run_args(saved_models, imagefolder, out, "--eval_strategy", "no", "--profile_images", "0")
    process = run_with_fault(argv, "kill_before_rename:4", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert process.wait(timeout=300) == -signal.SIGKILL
    assert (out / STAGING_DIR / "checkpoint-4" / "model.safetensors").exists()  # written, never renamed
    assert checkpoints(out) == ["checkpoint-2"]
    assert_complete_checkpoint(out / "checkpoint-2", step=2)
    # The killed run's lock names a dead process of this host: the resumed run takes it over.
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == process.pid
    assert run_distill.main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and not (out / STAGING_DIR).exists()
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_a_second_run_on_the_same_output_dir_stops_at_once(saved_models, imagefolder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = tiny_run_args(saved_models, imagefolder, out, "--max_steps", "100000", "--save_steps", "100000",
                         "--eval_strategy", "no", "--profile_images", "0")
    first = subprocess.Popen([sys.executable, str(RECIPE), *argv], env=RECIPE_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_FILE).exists():
            assert first.poll() is None and time.time() < deadline, "the first run never locked its folder"
            time.sleep(0.05)
        started = time.time()
        code, err = run_and_capture(run_distill.main, argv, capsys)
        assert code == 2
        assert f"error: output_dir: '{out}' is in use by another run (pid {first.pid} on {socket.gethostname()})" in err
        assert time.time() - started < 30 and "Traceback" not in err
    finally:
        first.kill()
        first.wait()
    # The dead run's lock does not block the folder forever.
    assert run_distill.main([*argv, "--max_steps", "2", "--overwrite_output_dir", "true"]) == 0


def test_ctrl_c_during_evaluation_exits_130_with_complete_checkpoints(saved_models, imagefolder, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "evaluating"
    argv = tiny_run_args(saved_models, imagefolder, out, "--profile_images", "0")  # saves at 2, evaluates at 4
    process = run_with_fault(argv, f"hang_in_eval:{marker}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, "the run never evaluated"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "interrupted: checkpoints written so far are complete" in err and "Traceback" not in err
    assert checkpoints(out) == ["checkpoint-2"]
    assert_complete_checkpoint(out / "checkpoint-2", step=2)
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------
# The lock itself
# ------------------------------------------------------------------------------------------------
def write_lock(folder: Path, pid: int, host: str, age_s: float = 0.0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host, "started": 0, "heartbeat": 0}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_of_a_live_process_blocks_and_of_a_dead_one_is_taken_over(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "busy", live.pid, socket.gethostname())
        with pytest.raises(OutputDirLockedError, match=f"in use by another run \\(pid {live.pid} on"):
            OutputDirLock(str(tmp_path / "busy")).acquire()
    finally:
        live.kill()
        live.wait()
    path = write_lock(tmp_path / "stale", dead_pid(), socket.gethostname())
    with OutputDirLock(str(tmp_path / "stale")):
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputDirLockedError, match="in use by another run"):  # one holder per run: not re-entrant
            OutputDirLock(str(tmp_path / "stale")).acquire()
        assert path.exists()  # the refused second holder did not remove the first one's lock
    assert not path.exists()


def test_lock_of_another_host_expires_without_heartbeat(tmp_path):
    write_lock(tmp_path / "fresh", 1, "another-host", age_s=10)
    with pytest.raises(OutputDirLockedError, match="on another-host"):
        OutputDirLock(str(tmp_path / "fresh"), stale_after_s=300).acquire()
    write_lock(tmp_path / "old", 1, "another-host", age_s=600)
    lock = OutputDirLock(str(tmp_path / "old"), stale_after_s=300).acquire()
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = OutputDirLock(str(tmp_path), heartbeat_s=0.05).acquire()
    try:
        os.utime(lock.path, (0, 0))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5
    finally:
        lock.release()
