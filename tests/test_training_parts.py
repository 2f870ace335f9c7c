"""Unit tests of the trainer's parts, each against its own contract (no training runs, no subprocesses).

The trainer delegates to small owned parts (``hf_spectralkd.training.*``, ``hf_spectralkd.checkpointing.*``); the
end-to-end tests cover them through whole runs, these pin each part's behaviour on its own, with expected values
computed here independently.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import fake_checkpoint, flip_byte, tiny_deit, tiny_vit

from hf_spectralkd.checkpointing.atomic import STAGING_DIR, AtomicCheckpointWriter
from hf_spectralkd.checkpointing.manifest import (
    MANIFEST_FILE,
    manifest_problems,
    newest_verified_checkpoint,
    resolve_resume,
    write_manifest,
)
from hf_spectralkd.checkpointing.run_lock import LOCK_FILE, OutputDirLock
from hf_spectralkd.errors import (
    CheckpointSaveError,
    ConfigurationError,
    DamagedFileError,
    NonFiniteLossError,
    OutputDirLockedError,
    TooManyBadImagesError,
)
from hf_spectralkd.training.data_order import DataOrder
from hf_spectralkd.training.image_counter import ImageCounter
from hf_spectralkd.training.model_card import ModelCardWriter
from hf_spectralkd.training.nonfinite import NonFiniteWatch
from hf_spectralkd.training.optimizer import DeiTOptimization, deit_lr_lambda
from hf_spectralkd.training.output_dir import OutputDirHold, check_writable, clear_previous_run
from hf_spectralkd.training.preemption import PreemptionWatch
from hf_spectralkd.training.run_record import RunRecord, record_differences

#: One process: the parts skip their collectives (no process group is needed).
ONE_PROCESS = SimpleNamespace(num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)


def batch(images: int, skipped: int = 0) -> dict:
    """A collated batch of ``images`` decoded images (``images×3×2×2``) whose collator dropped ``skipped``."""
    return {"pixel_values": torch.zeros(images, 3, 2, 2), "num_skipped": skipped}


# ------------------------------------------------------------------------------------------------
# ImageCounter
# ------------------------------------------------------------------------------------------------
def test_image_counter_counts_attempted_and_skipped_images_per_mode():
    counter = ImageCounter(ONE_PROCESS, "cpu", max_skipped_fraction=0.9)
    counter.count("train", batch(4, skipped=1))  # 5 attempted, 1 undecodable
    counter.count("train", {**batch(2), "num_images": 3})  # an explicit count wins over the batch length
    counter.count("eval", batch(6, skipped=2))
    logs = {"loss": 1.0}
    counter.add_to_log(logs, "train")
    assert logs == {"loss": 1.0, "train_images": 5 + 3, "skipped_images": 1}
    metrics = {"eval_runtime": 0.1, "eval_top1": 0.5}
    counter.add_to_log(metrics, None)
    # eval_images are the images scored: attempted minus undecodable
    assert metrics["eval_images"] == 6 and metrics["eval_skipped_images"] == 2
    # the training totals are the whole run's: a later log adds to them, the evaluation counts start again
    counter.count("train", batch(2))
    later = {}
    counter.add_to_log(later, "train")
    assert later == {"train_images": 10, "skipped_images": 1}
    teacher = {"teacher_runtime": 0.1}
    counter.add_to_log(teacher, None)
    assert teacher == {"teacher_runtime": 0.1, "teacher_images": 0, "teacher_skipped_images": 0}


def _wilson_lower(count: int, total: int, z: float = 3.09) -> float:
    share = count / total
    return (share + z * z / (2 * total) - z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total))) / (
        1 + z * z / total)


def test_image_counter_stops_above_the_limit_on_a_whole_split_and_only_when_sure_in_training(caplog):
    limit = 0.2
    evaluation = ImageCounter(ONE_PROCESS, "cpu", max_skipped_fraction=limit)
    evaluation.count("eval", batch(7, skipped=3))  # 3 of 10: above 20 % on the whole split
    with pytest.raises(TooManyBadImagesError) as error:
        evaluation.add_to_log({"eval_runtime": 0.1}, None)
    assert "3 of 10 evaluation images (30.0%) could not be decoded, above the limit of 20.0%" in str(error.value)

    # Training so far is a sample: 2 of 4 (50 %) is not enough evidence, 500 of 1,000 is.
    assert _wilson_lower(2, 4) < limit < _wilson_lower(500, 1000)
    training = ImageCounter(ONE_PROCESS, "cpu", max_skipped_fraction=limit)
    training.count("train", batch(2, skipped=2))
    with caplog.at_level(logging.WARNING, logger="hf_spectralkd.training.image_counter"):
        training.add_to_log({}, "train")
        training.add_to_log({}, "train")
    warnings = [r for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 4 training images" in warnings[0].getMessage()  # once, not per log
    training.count("train", batch(498, skipped=498))
    with pytest.raises(TooManyBadImagesError, match="500 of 1,000 training images"):
        training.add_to_log({}, "train")


def test_image_counter_state_round_trip_continues_the_totals_exactly():
    batches = [batch(4, 1), batch(3), batch(5, 2), batch(1, 1)]
    uninterrupted = ImageCounter(ONE_PROCESS, "cpu", 0.9)
    for b in batches:
        uninterrupted.count("train", b)
    first = ImageCounter(ONE_PROCESS, "cpu", 0.9)
    for b in batches[:2]:
        first.count("train", b)
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint's image_counts.json holds it
    assert state == {"train_images": 5 + 3, "skipped_images": 1}
    resumed = ImageCounter(ONE_PROCESS, "cpu", 0.9)
    resumed.load_state_dict(state)
    for b in batches[2:]:
        resumed.count("train", b)
    assert resumed.training_totals() == uninterrupted.training_totals() == (5 + 3 + 7 + 2, 4)
    fresh = ImageCounter(ONE_PROCESS, "cpu", 0.9)
    fresh.load_state_dict(None)  # a run from the start
    assert fresh.training_totals() == (0, 0)


# ------------------------------------------------------------------------------------------------
# AtomicCheckpointWriter
# ------------------------------------------------------------------------------------------------
class Part:
    """A trainer part with state: records what it was restored with."""

    def __init__(self, state):
        self.state, self.restored = state, "not called"

    def state_dict(self):
        return self.state

    def load_state_dict(self, payload):
        self.restored = payload


def writer_for(parts, save_total_limit=None):
    args = SimpleNamespace(should_save=True, device="cpu", save_total_limit=save_total_limit)
    return AtomicCheckpointWriter(ONE_PROCESS, args, parts)


def trainer_save(writer, run_dir, step, seen, fail=None):
    """What ``Trainer._save_checkpoint`` does: write ``checkpoint-N`` into the folder ``writer.run_dir`` names."""

    def write():
        folder = Path(writer.run_dir(str(run_dir))) / f"checkpoint-{step}"
        seen.append((folder, (Path(run_dir) / f"checkpoint-{step}").exists()))
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(bytes(range(step)))
        if fail is not None:
            raise fail

    return write


def test_atomic_writer_stages_renames_and_writes_the_parts_state_beside_the_checkpoint(tmp_path):
    counts, record = Part({"train_images": 12, "skipped_images": 1}), Part({"seed": 3})
    writer = writer_for({"image_counts.json": counts, "run_config.json": record})
    seen = []
    writer.save(str(tmp_path), SimpleNamespace(global_step=7, best_model_checkpoint=None),
                trainer_save(writer, tmp_path, 7, seen))
    # The Trainer wrote into the staging folder, and nothing was at the final place meanwhile.
    assert seen == [(tmp_path / STAGING_DIR / "checkpoint-7", False)]
    assert writer.run_dir("default") == "default"  # outside save, the Trainer's own folder
    final = tmp_path / "checkpoint-7"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]  # the staging folder is gone
    assert json.loads((final / "image_counts.json").read_text()) == {"train_images": 12, "skipped_images": 1}
    manifest = json.loads((final / MANIFEST_FILE).read_text())["files"]
    assert sorted(manifest) == ["image_counts.json", "run_config.json", "weights.bin"]
    assert manifest["weights.bin"] == {"size": 7, "sha256": hashlib.sha256(bytes(range(7))).hexdigest()}

    counts.state, record.state = None, None
    writer.restore(str(final))
    assert counts.restored == {"train_images": 12, "skipped_images": 1} and record.restored == {"seed": 3}
    writer.restore(None)  # no checkpoint: every part starts from None
    assert counts.restored is None and record.restored is None


def test_atomic_writer_replaces_a_checkpoint_and_rotates_old_ones(tmp_path):
    writer = writer_for({"image_counts.json": Part({"n": 1})}, save_total_limit=2)
    for step in (1, 2, 2, 3):  # step 2 saved again (a resumed run): the copy is replaced, not merged
        writer.save(str(tmp_path), SimpleNamespace(global_step=step, best_model_checkpoint=None),
                    trainer_save(writer, tmp_path, step, []))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "checkpoint-2" / "weights.bin").read_bytes() == bytes(range(2))
    assert manifest_problems(tmp_path / "checkpoint-2") == []


def test_a_part_without_load_state_dict_is_saved_but_not_restored(tmp_path):
    class SaveOnly:
        def state_dict(self):
            return {"written": True}

    writer = writer_for({"record.json": SaveOnly()})
    writer.save(str(tmp_path), SimpleNamespace(global_step=1, best_model_checkpoint=None),
                trainer_save(writer, tmp_path, 1, []))
    assert json.loads((tmp_path / "checkpoint-1" / "record.json").read_text()) == {"written": True}
    writer.restore(str(tmp_path / "checkpoint-1"))  # nothing to call, and no error


def test_a_failed_checkpoint_write_leaves_no_staging_folder_and_names_the_last_complete_one(tmp_path):
    writer = writer_for({"image_counts.json": Part({"n": 1})})
    writer.save(str(tmp_path), SimpleNamespace(global_step=1, best_model_checkpoint=None),
                trainer_save(writer, tmp_path, 1, []))
    full = OSError(28, "No space left on device")
    with pytest.raises(CheckpointSaveError) as error:
        writer.save(str(tmp_path), SimpleNamespace(global_step=2, best_model_checkpoint=None),
                    trainer_save(writer, tmp_path, 2, [], fail=full))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    message = str(error.value)
    assert message.startswith(f"checkpoint: could not write checkpoint-2 in '{tmp_path}': ")
    assert "No space left on device" in message and "checkpoint-1 is the last complete checkpoint" in message
    assert error.value.__cause__ is full
    assert writer.run_dir("default") == "default"  # the staging redirect ends with the failed save


def test_a_bug_in_a_checkpoint_write_keeps_its_traceback(tmp_path):
    writer = writer_for({})
    with pytest.raises(KeyError, match="a bug"):
        writer.save(str(tmp_path), SimpleNamespace(global_step=1, best_model_checkpoint=None),
                    trainer_save(writer, tmp_path, 1, [], fail=KeyError("a bug")))
    assert not (tmp_path / "checkpoint-1").exists()
    assert not (tmp_path / STAGING_DIR / "checkpoint-1").exists()  # the partial copy is removed, bug or not


# ------------------------------------------------------------------------------------------------
# Manifest and resume point
# ------------------------------------------------------------------------------------------------
def test_manifest_records_every_file_and_names_each_changed_one(tmp_path):
    files = {"a.bin": b"\x00" * 1000, "sub/b.json": b'{"x": 1}', "c.txt": b"hello"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    write_manifest(str(tmp_path))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["files"] == {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                 for name, data in files.items()}
    assert manifest_problems(tmp_path) == []
    flip_byte(tmp_path / "a.bin", 500)
    (tmp_path / "c.txt").write_bytes(b"hello!")
    (tmp_path / "sub" / "b.json").unlink()
    assert manifest_problems(tmp_path) == [
        f"a.bin has changed since it was saved (its SHA-256 differs from {MANIFEST_FILE})",
        f"c.txt has 6 bytes, {MANIFEST_FILE} says 5",
        "sub/b.json is missing",
    ]
    (tmp_path / MANIFEST_FILE).unlink()
    assert manifest_problems(tmp_path) == []  # a checkpoint from before manifests: structure only


def test_resume_picks_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    with pytest.raises(ConfigurationError, match="no checkpoint-\\* folder"):
        newest_verified_checkpoint(str(tmp_path))
    for step in (2, 9, 10):  # numeric order: checkpoint-10 is newer than checkpoint-9
        fake_checkpoint(tmp_path / f"checkpoint-{step}", step)
    assert newest_verified_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    flip_byte(tmp_path / "checkpoint-10" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("true", str(tmp_path)) == str(tmp_path / "checkpoint-9")
    assert any("checkpoint-10" in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
    assert resolve_resume(True, str(tmp_path)) == str(tmp_path / "checkpoint-9")
    for off in (None, False, "false", ""):
        assert resolve_resume(off, str(tmp_path)) is None
    # An explicit path must verify: never silently replaced by another checkpoint.
    assert resolve_resume(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(DamagedFileError, match="checkpoint-10' is damaged \\(model.safetensors"):
        resolve_resume(str(tmp_path / "checkpoint-10"), str(tmp_path))
    with pytest.raises(ConfigurationError, match="is not a checkpoint folder"):
        resolve_resume(str(tmp_path / "checkpoint-11"), str(tmp_path))


# ------------------------------------------------------------------------------------------------
# OutputDirLock and OutputDirHold
# ------------------------------------------------------------------------------------------------
def test_output_dir_lock_refuses_a_second_holder_in_the_same_process_and_is_gone_when_released(tmp_path):
    lock = OutputDirLock(str(tmp_path), heartbeat_s=3600)
    with lock:
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(OutputDirLockedError) as error:
            OutputDirLock(str(tmp_path)).acquire()
        assert f"is in use by another run (pid {os.getpid()} on {socket.gethostname()})" in str(error.value)
        assert (tmp_path / LOCK_FILE).exists()  # the refused holder left the owner's lock alone
    assert not (tmp_path / LOCK_FILE).exists()
    with OutputDirLock(str(tmp_path), heartbeat_s=3600):  # free again
        assert (tmp_path / LOCK_FILE).exists()


def test_output_dir_lock_taken_twice_by_the_same_object_is_an_error_that_keeps_the_lock(tmp_path):
    lock = OutputDirLock(str(tmp_path), heartbeat_s=3600).acquire()
    with pytest.raises(RuntimeError, match=r"already held by this object; it is not re-entrant"):
        lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()  # still held, by the first take
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()  # one release frees it: the second take counted nothing
    lock.acquire().release()  # and the object can take it again once released


def test_output_dir_lock_takes_over_the_lock_of_a_dead_process_only(tmp_path):
    dead_pid = 2**31 - 2  # above any pid_max: no such process
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname()}))
    with OutputDirLock(str(tmp_path), heartbeat_s=3600):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    # A lock of another host is judged by its age: a fresh one is kept.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(OutputDirLockedError, match="pid 1 on another-host"):
        OutputDirLock(str(tmp_path), stale_after_s=300).acquire()


def test_output_dir_hold_keeps_the_outer_hold_when_nested(tmp_path):
    hold = OutputDirHold(ONE_PROCESS, str(tmp_path))
    lock_file = tmp_path / LOCK_FILE
    with hold.holding() as holds:
        assert holds and lock_file.exists()
        with hold.holding() as inner:
            assert inner
        assert lock_file.exists()  # the inner block did not release the run's hold
        with pytest.raises(OutputDirLockedError):  # another trainer on the same folder is another run
            with OutputDirHold(ONE_PROCESS, str(tmp_path)).holding():
                pass
        assert lock_file.exists()
    assert not lock_file.exists()
    with pytest.raises(RuntimeError, match="inside"):  # a failing block still releases the hold
        with hold.holding():
            raise RuntimeError("inside")
    assert not lock_file.exists()


def test_check_writable_refuses_a_folder_inside_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match=r"output_dir: '.*file/run' is inside a file \('.*file'\)"):
        check_writable(str(tmp_path / "file" / "run"))
    assert check_writable(str(tmp_path / "new" / "run")) == tmp_path / "new" / "run"  # created later


def test_clear_previous_run_removes_the_previous_run_and_nothing_else(tmp_path):
    previous = ["checkpoint-3", "checkpoint-12", STAGING_DIR]
    previous_files = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "README.md",
                      "results.json", "run_config.json", "trainer_state.json"]
    kept = ["checkpoint-best", "notes.txt", "runs", "model.safetensors.bak"]
    for name in previous + ["runs"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    for name in previous_files + ["notes.txt", "model.safetensors.bak"]:
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint-best").mkdir()
    removed = clear_previous_run(str(tmp_path))
    assert removed == sorted(previous + previous_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert clear_previous_run(str(tmp_path / "absent")) == []


# ------------------------------------------------------------------------------------------------
# DataOrder
# ------------------------------------------------------------------------------------------------
class Stream(torch.utils.data.IterableDataset):
    """A stream that resumes itself: records where it was positioned."""

    resumes_itself = True
    layout = "cached"

    def __init__(self):
        self.positions = []

    def __iter__(self):
        return iter(())

    def fast_forward(self, batches, batch_size):
        self.positions.append((batches, batch_size))


def data_order_args(ignore_data_skip=False):
    return SimpleNamespace(world_size=1, seed=0, gradient_accumulation_steps=3, per_device_train_batch_size=4,
                           ignore_data_skip=ignore_data_skip,
                           main_process_first=lambda desc: contextlib.nullcontext())


def test_data_order_skips_batches_of_map_style_data_only():
    map_style = list(range(10))
    assert DataOrder.batches_to_skip(map_style, 7) == 7
    assert DataOrder.batches_to_skip(Stream(), 7) == 0


def test_data_order_positions_a_stream_at_the_checkpoints_step(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    stream = Stream()
    DataOrder(data_order_args()).resume(stream, str(tmp_path))
    DataOrder(data_order_args()).resume(stream, None)
    DataOrder(data_order_args(ignore_data_skip=True)).resume(stream, str(tmp_path))
    # 5 optimizer steps × 3 accumulated batches of 4; from the start without a checkpoint or with ignore_data_skip
    assert stream.positions == [(15, 4), (0, 4), (0, 4)]
    DataOrder(data_order_args()).resume(list(range(10)), str(tmp_path))  # map-style: nothing to position


def test_data_order_samples_repeats_only_for_map_style_data_that_asks():
    class Repeated(torch.utils.data.Dataset):
        def __init__(self, repeats):
            self.repeated_augmentation = repeats

        def __len__(self):
            return 12

    order = DataOrder(data_order_args())
    assert order.sampler(Repeated(1), 4) is None
    stream = Stream()
    stream.repeated_augmentation = 3
    assert order.sampler(stream, 4) is None
    sampler = order.sampler(Repeated(3), 4)
    items = list(sampler)  # (index, copy): 12 images per epoch, one step of 3 batches of 4, as DeiT repeats them
    assert len(items) == len(sampler) == 12
    groups = [items[i:i + 3] for i in range(0, 12, 3)]  # each image 3 times in place, each copy augmented apart
    assert all(len({index for index, _ in group}) == 1 and [c for _, c in group] == [0, 1, 2] for group in groups)
    assert len({group[0][0] for group in groups}) == 4 and {group[0][0] for group in groups} <= set(range(12))


# ------------------------------------------------------------------------------------------------
# DeiT optimisation
# ------------------------------------------------------------------------------------------------
def test_weight_decay_applies_to_the_weights_of_linear_and_conv_layers_only():
    model = tiny_deit()
    # Independently: the weight matrices of Linear and Conv layers decay; biases, norms, the position embeddings
    # and the class and distillation tokens do not.
    expected = {f"{module_name}.weight" for module_name, module in model.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    names = DeiTOptimization.decay_parameter_names(model)
    assert set(names) == expected
    all_names = {name for name, _ in model.named_parameters()}
    kept_out = all_names - set(names)
    assert {"deit.embeddings.cls_token", "deit.embeddings.distillation_token",
            "deit.embeddings.position_embeddings"} <= kept_out
    assert any(name.endswith("layernorm_before.weight") for name in kept_out)


def _deit_lr(step, peak, warmup_lr, min_lr, warmup, total):
    if step < warmup:
        return warmup_lr + (peak - warmup_lr) * step / warmup
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * min(step, total) / total)) / 2


def test_deit_schedule_is_a_linear_warmup_inside_a_cosine(tmp_path):
    from hf_spectralkd.config import SpectralDistillationConfig

    args = SpectralDistillationConfig(output_dir=str(tmp_path), learning_rate=1e-3, warmup_lr=1e-6, min_lr=1e-5,
                                      warmup_steps=10, lr_schedule="deit", report_to="none")
    total = 100
    multiplier = deit_lr_lambda(args, total)
    for step in (0, 1, 5, 9, 10, 11, 50, 99, 100, 150):
        assert multiplier(step) * 1e-3 == pytest.approx(_deit_lr(step, 1e-3, 1e-6, 1e-5, 10, total), rel=1e-12)
    assert multiplier(0) * 1e-3 == pytest.approx(1e-6) and multiplier(150) * 1e-3 == pytest.approx(1e-5)

    # The scheduler drives a real optimizer through the same values.
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1e-3)
    scheduler = DeiTOptimization(args).scheduler(optimizer, total)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([_deit_lr(t, 1e-3, 1e-6, 1e-5, 10, total) for t in range(total)], rel=1e-12)
    args.lr_schedule = "trainer"
    assert DeiTOptimization(args).scheduler(optimizer, total) is None


# ------------------------------------------------------------------------------------------------
# ModelCardWriter, RunRecord
# ------------------------------------------------------------------------------------------------
def test_model_card_writer_records_the_trainer_state_and_names_the_run(tmp_path):
    from hf_spectralkd.io.run_summary import RunSummary

    summary = RunSummary(student="tiny", student_kind="scratch", student_architecture="ViTForImageClassification",
                         student_parameters=1234, num_classes=3)
    args = SimpleNamespace(output_dir=str(tmp_path / "my-run"), hub_model_id=None)
    state = SimpleNamespace(global_step=12, epoch=3.0, max_steps=12, log_history=[
        {"eval_top1": 0.625, "eval_top5": 1.0}, {"loss": 1.0, "train_images": 48, "skipped_images": 2},
        {"eval_top1": 0.5, "eval_top5": 0.875}])
    path = ModelCardWriter(summary, args).write(str(tmp_path / "checkpoint-12"), state)
    assert path == tmp_path / "checkpoint-12" / "README.md"
    assert (summary.global_steps, summary.student_accuracy, summary.best_student_accuracy) == (12, 0.5, 0.625)
    assert (summary.train_images, summary.skipped_images) == (48, 2)
    card = path.read_text()
    assert "my-run" in card and "checkpoint-12" not in card  # titled by the run, not the checkpoint folder
    assert "50.00 %" in card and "62.50 %" in card and "1,234" in card


def run_record(tmp_path, learning_rate=1e-3, logging_steps=10, hidden=32):
    training = {"learning_rate": learning_rate, "logging_steps": logging_steps, "output_dir": str(tmp_path)}
    args = SimpleNamespace(to_dict=lambda: dict(training), world_size=1, output_dir=str(tmp_path))
    model = tiny_vit(num_labels=3, hidden=hidden)
    record = RunRecord(args, lambda: model)
    record.add(data={"dataset": "beans", "eval_split": "validation"})
    return record


def test_run_record_names_the_differences_that_change_the_result(tmp_path):
    saved = run_record(tmp_path).state_dict()
    assert saved["training"]["learning_rate"] == 1e-3 and saved["launch"] == {"world_size": 1}
    assert saved["student_config"]["hidden_size"] == 32 and saved["data"]["dataset"] == "beans"
    assert json.loads(json.dumps(saved)) == saved  # what run_config.json holds
    assert record_differences(saved, run_record(tmp_path, logging_steps=1).state_dict()) == []  # neutral
    changed = run_record(tmp_path, learning_rate=2e-3, logging_steps=1, hidden=64).state_dict()
    changed["data"]["eval_split"] = "test"  # neutral
    changed["data"]["dataset"] = "cifar10"
    differences = record_differences(saved, changed)
    assert "data dataset 'beans' → 'cifar10'" not in differences  # data fields carry no prefix
    assert "dataset 'beans' → 'cifar10'" in differences
    assert "learning_rate 0.001 → 0.002" in differences
    assert "student config hidden_size 32 → 64" in differences
    assert not any(d.startswith(("logging_steps", "eval_split")) for d in differences)


def test_run_record_refuses_to_resume_another_runs_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    record = run_record(tmp_path / "out")
    (checkpoint / "run_config.json").write_text(json.dumps(record.state_dict()))
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 8}))
    record.check_resume(str(checkpoint), lambda: (8, None), is_main_process=False)  # the same run
    with pytest.raises(ConfigurationError, match="learning_rate 0.001 → 0.002"):
        run_record(tmp_path / "out", learning_rate=2e-3).check_resume(str(checkpoint), lambda: (8, None), False)
    with pytest.raises(ConfigurationError, match="max_steps: 3 is not above step 4"):
        record.check_resume(str(checkpoint), lambda: (3, None), False)
    record.check_resume(str(checkpoint), lambda: (16, None), is_main_process=True)  # a run continued further
    assert json.loads((tmp_path / "out" / "run_config.json").read_text()) == record.state_dict()


# ------------------------------------------------------------------------------------------------
# PreemptionWatch, NonFiniteWatch
# ------------------------------------------------------------------------------------------------
def test_preemption_watch_records_sigterm_and_restores_the_previous_handler():
    received = []

    def previous(signum, frame):
        received.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        watch = PreemptionWatch()
        watch.install()
        assert not watch.requested(ONE_PROCESS)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.received and watch.requested(ONE_PROCESS)
        assert received == []  # the watch, not the previous handler, took it
        watch.restore()
        assert signal.getsignal(signal.SIGTERM) is previous
        watch.install()  # a new training run starts without the old request
        assert not watch.received
        watch.restore()
        assert signal.getsignal(signal.SIGTERM) is previous

        other = PreemptionWatch()
        thread = threading.Thread(target=other.install)  # signals are the main thread's: a no-op elsewhere
        thread.start()
        thread.join()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)


def test_nonfinite_watch_keeps_the_first_step_of_each_component():
    watch = NonFiniteWatch(("loss_ce", "loss_kd"))
    watch.update(torch.tensor([0.5, 0.25]), step=1)
    watch.check(ONE_PROCESS, 1, "/nonexistent")  # finite: nothing raised
    watch.update(torch.tensor([0.5, float("inf")]), step=4)
    watch.update(torch.tensor([float("nan"), float("nan")]), step=6)  # loss_kd keeps its first value, inf at 4
    with pytest.raises(NonFiniteLossError) as error:
        watch.check(ONE_PROCESS, 6, "/nonexistent")
    message = str(error.value)
    assert message.startswith("non-finite loss at step 4: loss_kd=inf. Detected at step 6")
    assert "loss_ce" not in message  # it went non-finite later


# ------------------------------------------------------------------------------------------------
# Scoring: what an evaluation alone scores, decided by the trainer
# ------------------------------------------------------------------------------------------------
def test_an_evaluation_alone_scores_student_and_teacher_in_the_datas_class_order(tmp_path):
    from hf_spectralkd import ConfigurationError, SpectralDistillationConfig, SpectralDistillationTrainer
    from hf_spectralkd.teacher import TeacherClassifier
    from hf_spectralkd.training.scoring import DataClasses

    def named(model, names):
        model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
        return model

    data = DataClasses({0: "a", 1: "b", 2: "c"}, "my-data")
    args = SpectralDistillationConfig(output_dir=str(tmp_path), do_train=False, use_cpu=True, report_to="none",
                                      student_layers=[0], teacher_layers=[0])  # a distilling config: dropped here
    student, teacher = named(tiny_vit(num_labels=3), ["c", "a", "b"]), named(tiny_vit(num_labels=3, seed=1), ["b", "c", "a"])
    trainer = SpectralDistillationTrainer(model=student, teacher_model=teacher, args=args, classes=data)
    assert isinstance(trainer.model, TeacherClassifier) and trainer.model.teacher is student
    assert trainer.model.label_order.tolist() == [1, 2, 0]  # logits[:, order]: a, b, c from the student's c, a, b
    assert trainer.teacher_label_order.tolist() == [2, 0, 1]  # and from the teacher's b, c, a
    assert trainer.teacher is None and trainer.layer_map == []  # scored at the end, never distilled from
    assert (trainer.args.distillation_type, trainer.args.beta, trainer.args.push_to_hub) == ("none", 0.0, False)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(trainer.model(pixel_values=pixels).logits, student(pixel_values=pixels).logits[:, [1, 2, 0]])
    for role, five in (("student", {"model": tiny_vit(num_labels=5), "teacher_model": teacher}),
                       ("teacher", {"model": student, "teacher_model": tiny_vit(num_labels=5)})):
        with pytest.raises(ConfigurationError) as error:
            SpectralDistillationTrainer(args=args, classes=data, **five)
        assert str(error.value) == (f"{role}: the {role} predicts 5 classes but dataset 'my-data' has 3; evaluate it on "
                                    f"the data set it was trained for (or a --{role} trained on these 3 classes)")
