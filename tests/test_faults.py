"""What checkpointing promises, under faults: a full disk, a kill mid-save, two runs on one folder, Ctrl-C."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import run_distill
from helpers import (
    FAULTY_RECIPE,
    RECIPE,
    RECIPE_ENV,
    assert_complete_checkpoint,
    checkpoints,
    run_and_capture,
    run_with_fault,
    tiny_run_args,
)

from hf_spectralkd.checkpointing import LOCK_FILE, STAGING_DIR, OutputDirLock, verify_checkpoint
from hf_spectralkd.cli import main as cli_main
from hf_spectralkd.errors import OutputDirLockedError, WriteFailedError


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
# A disk that really fills: a small tmpfs, the recipe in its own process
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """A 16 MiB tmpfs, unmounted afterwards; skipped where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(filler: Path) -> None:
    with open(filler, "wb") as handle:
        with pytest.raises(OSError) as raised:
            while True:
                handle.write(b"\0" * (1 << 16))
                handle.flush()
    assert raised.value.errno == errno.ENOSPC


def assert_one_line_failure(process: subprocess.CompletedProcess, start: str) -> str:
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert process.returncode == 1 and len(errors) == 1, process.stderr[-3000:]
    assert "Traceback" not in process.stderr and errors[0].startswith(start), errors
    return errors[0]


@pytest.mark.slow
def test_a_real_full_or_read_only_disk_stops_each_run_with_one_line_and_leaves_nothing_behind(
    tmpfs, saved_models, imagefolder, capsys
):
    out = tmpfs / "out"
    argv = tiny_run_args(saved_models, imagefolder, out, "--eval_strategy", "no", "--profile_images", "0")

    def run(fault=None, *extra):
        env = {**RECIPE_ENV, "HF_SPECTRALKD_TEST_FAULT": fault} if fault else RECIPE_ENV
        script = FAULTY_RECIPE if fault else RECIPE
        return subprocess.run([sys.executable, str(script), *argv, *extra], env=env, capture_output=True, text=True,
                              timeout=300)

    # At start-up: the disk is already full; the lock file is the first thing the run writes.
    fill(tmpfs / "filler")
    line = assert_one_line_failure(run(), f"error: output_dir: cannot write the run's lock file in '{out}'")
    assert "No space left on device" in line and not (out / LOCK_FILE).exists()
    (tmpfs / "filler").unlink()

    # Mid-run: checkpoint-2 is in place, then the disk fills; torch.save fails half-way through optimizer.pt.
    line = assert_one_line_failure(run(f"fill_disk_after_save:2:{tmpfs / 'filler'}"),
                                   f"error: checkpoint: could not write checkpoint-4 in '{out}': no space left on device")
    assert "checkpoint-2 is the last complete checkpoint" in line
    assert checkpoints(out) == ["checkpoint-2"] and verify_checkpoint(out / "checkpoint-2") == []
    assert not (out / STAGING_DIR).exists() and not (out / LOCK_FILE).exists()
    (tmpfs / "filler").unlink()

    # The final save: space freed, the run resumes (no stale lock refuses it), then the disk fills again.
    line = assert_one_line_failure(run(f"fill_disk_before_final:{tmpfs / 'filler'}", "--resume_from_checkpoint", "true"),
                                   f"error: output_dir: could not write the final student in '{out}'")
    assert "No space left on device" in line and "checkpoint-4 is the last complete checkpoint" in line
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and verify_checkpoint(out / "checkpoint-4") == []
    assert not (out / STAGING_DIR).exists() and not (out / LOCK_FILE).exists()
    (tmpfs / "filler").unlink()
    capsys.readouterr()
    assert cli_main(["verify", str(out)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("final student  DAMAGED: model.safetensors is")

    # Mid-run, read-only: the lock cannot be removed, which is not reported over the run's own error.
    shutil.rmtree(out)
    line = assert_one_line_failure(run(f"remount_ro_after_save:2:{tmpfs}"),
                                   f"error: checkpoint: could not write checkpoint-4 in '{out}'")
    assert "Read-only file system" in line
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert checkpoints(out) == ["checkpoint-2"] and verify_checkpoint(out / "checkpoint-2") == []
    OutputDirLock(str(out)).acquire().release()  # the dead run's lock does not refuse the next run


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


def test_a_run_holds_its_folder_from_training_to_its_results_and_an_evaluation_holds_its_own(
    saved_models, imagefolder, tmp_path, monkeypatch
):
    """The final save, the evaluation and results.json are written under the lock, which is gone after the run."""
    import hf_spectralkd.recipe.run as recipe
    from hf_spectralkd import SpectralDistillationTrainer

    owners = []  # (moment, pid in the output folder's lock file)

    def owner(trainer) -> object:
        path = Path(trainer.args.output_dir) / LOCK_FILE
        return json.loads(path.read_text())["pid"] if path.exists() else None

    def watched(name, method):
        def call(trainer, *args, **kwargs):
            if not args and not kwargs.get("output_dir"):  # not a checkpoint's save (into its staging folder)
                owners.append((name, owner(trainer)))
            return method(trainer, *args, **kwargs)
        return call

    monkeypatch.setattr(SpectralDistillationTrainer, "save_model",
                        watched("final save", SpectralDistillationTrainer.save_model))
    monkeypatch.setattr(SpectralDistillationTrainer, "evaluate", watched("evaluation", SpectralDistillationTrainer.evaluate))
    write_results = recipe.write_results

    def results(summary, trainer, *args, **kwargs):
        owners.append(("results", owner(trainer)))
        return write_results(summary, trainer, *args, **kwargs)

    monkeypatch.setattr(recipe, "write_results", results)
    out = tmp_path / "out"
    argv = tiny_run_args(saved_models, imagefolder, out, "--eval_strategy", "no", "--save_steps", "4",
                         "--profile_images", "0", "--evaluate_teacher", "false")
    assert run_distill.main(argv) == 0
    assert owners == [("final save", os.getpid()), ("evaluation", os.getpid()), ("results", os.getpid())]
    assert not (out / LOCK_FILE).exists()

    owners.clear()
    evaluated = tmp_path / "evaluated"
    assert run_distill.main(["--do_train", "false", "--do_eval", "true", "--student", str(out), "--dataset", imagefolder,
                             "--output_dir", str(evaluated), "--use_cpu", "true", "--report_to", "none"]) == 0
    assert owners == [("evaluation", os.getpid()), ("results", os.getpid())]
    assert not (evaluated / LOCK_FILE).exists()


def test_lock_of_another_host_expires_without_heartbeat(tmp_path):
    write_lock(tmp_path / "fresh", 1, "another-host", age_s=10)
    with pytest.raises(OutputDirLockedError, match="on another-host"):
        OutputDirLock(str(tmp_path / "fresh"), stale_after_s=300).acquire()
    write_lock(tmp_path / "old", 1, "another-host", age_s=600)
    lock = OutputDirLock(str(tmp_path / "old"), stale_after_s=300).acquire()
    lock.release()


def test_a_lock_file_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    import hf_spectralkd.checkpointing.run_lock as checkpointing

    def disk_full(record, handle):
        handle.write("{")  # part of it was buffered, then the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing.json, "dump", disk_full)
        with pytest.raises(WriteFailedError, match=r"^output_dir: cannot write the run's lock file in .*No space left"):
            OutputDirLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    OutputDirLock(str(tmp_path)).acquire().release()  # nothing refuses the next run


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = OutputDirLock(str(tmp_path), heartbeat_s=0.05).acquire()
    try:
        os.utime(lock.path, (0, 0))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5
    finally:
        lock.release()


def _contend(folders: list[str], barrier, results) -> None:
    """One of several processes that all try to take over each folder's stale lock at the same moment."""
    for index, folder in enumerate(folders):
        barrier.wait(timeout=30)
        lock = OutputDirLock(folder)
        try:
            lock.acquire()
            owner = json.loads(lock.path.read_text())["pid"]
        except OutputDirLockedError:
            owner = None
        except Exception as error:  # noqa: BLE001 - e.g. its lock file removed by another holder: reported, not hung
            owner = repr(error)
        results.put((index, os.getpid(), owner))
        barrier.wait(timeout=30)  # every contender has tried before the holder lets go
        lock.release()


def test_several_processes_taking_over_one_stale_lock_leave_exactly_one_holder(tmp_path):
    import multiprocessing

    contenders, rounds = 6, 100  # about 1 s; before the take-over was serialised, 4 to 6 rounds in 100 had two holders
    stale = dead_pid()
    folders = [str(write_lock(tmp_path / f"round-{index}", stale, socket.gethostname()).parent) for index in range(rounds)]
    context = multiprocessing.get_context("fork")  # the workers start in milliseconds, with the module imported
    barrier, results = context.Barrier(contenders), context.Queue()
    workers = [context.Process(target=_contend, args=(folders, barrier, results), daemon=True) for _ in range(contenders)]
    for worker in workers:
        worker.start()
    try:
        outcomes = [results.get(timeout=60) for _ in range(contenders * rounds)]
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()
    holders = {index: [pid for i, pid, owner in outcomes if i == index and owner is not None] for index in range(rounds)}
    not_one = {index: pids for index, pids in holders.items() if len(pids) != 1}
    assert not not_one, f"rounds without exactly one holder: {not_one}"
    # Each holder found its own pid in the lock file, and released it.
    assert all(owner == pid for _, pid, owner in outcomes if owner is not None)
    assert not any((Path(folder) / LOCK_FILE).exists() for folder in folders)


@pytest.mark.slow
def test_a_full_disk_after_training_is_one_line_and_a_resume_writes_the_missing_student(saved_models, imagefolder,
                                                                                         tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from hf_spectralkd.checkpointing.atomic import AtomicCheckpointWriter
    from hf_spectralkd.io.run_summary import RunSummary

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write's close() raises it: no file name

    out = tmp_path / "out"
    argv = tiny_run_args(saved_models, imagefolder, out, "--max_steps", "2", "--eval_strategy", "no",
                         "--profile_images", "0", "--evaluate_teacher", "false")
    # The disk fills while the final student is written: one line; checkpoint-2 is the run's end, no student.
    save_final = AtomicCheckpointWriter.save_final  # the final student's save; a checkpoint's goes through it staged
    with monkeypatch.context() as patch:
        patch.setattr(AtomicCheckpointWriter, "save_final", lambda writer, folder, write: save_final(
            writer, folder, write if writer._staging_root is not None else disk_full))
        code, err = run_and_capture(run_distill.main, argv, capsys)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: output_dir: could not write the final student in '{out}': [Errno 28] No space left on device; "
        "checkpoint-2 is the last complete checkpoint. Free space (or make the file system writable again) and run "
        "the same command with --resume_from_checkpoint true: a checkpoint at the last step is saved as the final "
        "student without training again")
    assert checkpoints(out) == ["checkpoint-2"] and not (out / "model.safetensors").exists()

    # Resumed: nothing is trained, checkpoint-2's weights become the final student; then results.json fails.
    with monkeypatch.context() as patch:
        patch.setattr(RunSummary, "write_json", disk_full)
        code, err = run_and_capture(run_distill.main, argv + ["--resume_from_checkpoint", "true"], capsys)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: output_dir: could not write README.md, results.json in '{out}': [Errno 28] No space left on device; "
        "the trained student and the checkpoints are intact (`hf-spectralkd verify OUTPUT_DIR`); free space (or make "
        "the file system writable again) and score it with --do_train false --do_eval true --student OUTPUT_DIR to "
        "write its results")
    final, saved = load_file(out / "model.safetensors"), load_file(out / "checkpoint-2" / "model.safetensors")
    assert final.keys() == saved.keys() and all(final[k].equal(saved[k]) for k in saved)
    assert checkpoints(out) == ["checkpoint-2"] and json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((out / "eval_results.json").read_text())["eval_images"] > 0 and not (out / "results.json").exists()
    assert not (out / LOCK_FILE).exists()
