"""Damaged files: header checks of weights, checkpoint manifests, resume past a damaged checkpoint, `verify`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import run_distill
import torch
from helpers import (
    SyntheticImageDataset,
    fake_checkpoint,
    flip_byte,
    run_and_capture,
    tiny_run_args,
    tiny_vit,
    truncate,
)
from safetensors.torch import load_file

from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer
from hf_spectralkd.checkpointing import (
    MANIFEST_FILE,
    file_sha256,
    newest_verified_checkpoint,
    verify_checkpoint,
)
from hf_spectralkd.cli import main as cli_main
from hf_spectralkd.cli.common import read_config_file
from hf_spectralkd.errors import ConfigurationError, DamagedFileError
from hf_spectralkd.io.hub import push_run
from hf_spectralkd.io.integrity import model_folder_problems, safetensors_problem

RUN_OPTIONS = ("--max_steps", "6", "--eval_strategy", "no", "--profile_images", "0", "--evaluate_teacher", "false")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, saved_models, imagefolder):
    """An uninterrupted 6-step run with checkpoints 2, 4, 6 (tests damage copies of it)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    assert run_distill.main(tiny_run_args(saved_models, imagefolder, out, *RUN_OPTIONS)) == 0
    return out


def copy_run(run: Path, destination: Path) -> Path:
    return Path(shutil.copytree(run, destination))


# ------------------------------------------------------------------------------------------------
# Weights headers
# ------------------------------------------------------------------------------------------------
def test_every_cut_of_a_safetensors_file_is_reported_and_the_whole_file_is_not(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "model")
    original = (tmp_path / "model" / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    path = tmp_path / "cut.safetensors"
    for cut in (0, 5, 8, header_end // 2, header_end, header_end + 1, len(original) // 2, len(original) - 1):
        path.write_bytes(original[:cut])
        names, problem = safetensors_problem(path)
        assert problem and problem.startswith("cut.safetensors is truncated:") and not names, (cut, problem)
    path.write_bytes(original)
    names, problem = safetensors_problem(path)
    assert problem is None and "classifier.weight" in names
    path.write_bytes(original + b"\0" * 10)  # a copy that wrote past the end
    assert "has 10 bytes its header does not describe" in safetensors_problem(path)[1]


def test_a_shard_that_lacks_the_tensors_its_index_names_is_damaged(tmp_path):
    model = tiny_vit()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2
    shutil.copy(shards[0], shards[1])  # a shard overwritten by its neighbour: sizes and headers are valid
    problems = model_folder_problems(tmp_path / "sharded")
    assert len(problems) == 1 and problems[0].startswith(f"{shards[1].name} lacks"), problems


def test_analyze_and_push_refuse_a_truncated_model_with_one_line(tmp_path, capsys, monkeypatch):
    tiny_vit(num_labels=3).save_pretrained(tmp_path / "student")
    truncate(tmp_path / "student" / "model.safetensors")
    capsys.readouterr()  # the save's progress bar
    code, err = run_and_capture(cli_main, ["analyze", "--model", str(tmp_path / "student"), "--dataset", str(tmp_path)], capsys)
    assert code == 2 and err.startswith(f"error: model: '{tmp_path / 'student'}' is damaged (model.safetensors is truncated")
    assert err.count("\n") == 1

    import hf_spectralkd.io.hub as hub

    monkeypatch.setattr(hub, "hf_api", lambda: pytest.fail("a damaged student must not reach the Hub"))
    with pytest.raises(DamagedFileError, match=r"output_dir: '.*' is damaged \(model.safetensors is truncated"):
        push_run(str(tmp_path / "student"), "someone/student")


def test_compare_refuses_a_cut_or_foreign_profile_with_one_line(tmp_path, capsys):
    student, teacher = tmp_path / "student.json", tmp_path / "teacher.json"
    student.write_text('{"layers": [0, 1], "intensity": [1.0, ')
    teacher.write_text('{"layers": [0, 1]}')
    code, err = run_and_capture(cli_main, ["compare", str(student), str(teacher)], capsys)
    assert code == 2 and err.startswith(f"error: student_profile: '{student}' is damaged (student.json is not valid JSON")
    student.write_text(teacher.read_text())
    code, err = run_and_capture(cli_main, ["compare", str(student), str(teacher)], capsys)
    assert code == 2 and "(student.json lacks intensity, spectrum, num_images)" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# Manifests and verification
# ------------------------------------------------------------------------------------------------
def test_every_checkpoint_has_a_manifest_of_all_its_files(finished_run):
    for step in (2, 4, 6):
        folder = finished_run / f"checkpoint-{step}"
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}
        assert set(files) == on_disk and {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= on_disk
        assert all(files[name]["sha256"] == file_sha256(folder / name) for name in files)
        assert verify_checkpoint(folder) == []


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_a_flipped_byte_is_caught_by_the_manifest_and_resume_falls_back(name, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    flip_byte(run / "checkpoint-6" / name)
    # Same size, valid structure: only the checksum can tell.
    assert model_folder_problems(run / "checkpoint-6") == []
    assert verify_checkpoint(run / "checkpoint-6") == [
        f"{name} has changed since it was saved (its SHA-256 differs from {MANIFEST_FILE})"
    ]
    assert newest_verified_checkpoint(str(run)) == str(run / "checkpoint-4")


def test_missing_and_unloadable_files_of_a_checkpoint_are_each_reported(finished_run, tmp_path):
    folder = copy_run(finished_run / "checkpoint-4", tmp_path / "checkpoint-4")
    (folder / "scheduler.pt").unlink()
    truncate(folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text("{")
    problems = verify_checkpoint(folder)
    assert problems[0].startswith("trainer_state.json is not valid JSON")
    assert problems[1:] == ["rng_state.pth is truncated (the end of its zip archive is missing)", "scheduler.pt is missing"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp_checkpoint_files_are_checked_as_the_trainer_reads_them(tmp_path):
    """Under FSDP, FULL_STATE_DICT checkpoints add accelerate's gathered student and optimizer state
    (pytorch_model_fsdp.bin, optimizer.bin), which a resume reads with torch.load: a cut one is reported by that load,
    as optimizer.pt is. SHARDED_STATE_DICT keeps both in torch.distributed.checkpoint folders, with no
    model.safetensors: whole, they verify; a changed shard is caught by the manifest."""
    import torch.distributed.checkpoint as dcp
    from accelerate.utils.constants import FSDP_MODEL_NAME, OPTIMIZER_NAME

    from hf_spectralkd.checkpointing import write_manifest
    model = tiny_vit(num_labels=3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    optimizer.step()
    full = tmp_path / "full" / "checkpoint-2"
    model.save_pretrained(full)
    torch.save(model.state_dict(), full / f"{FSDP_MODEL_NAME}.bin")
    torch.save(optimizer.state_dict(), full / f"{OPTIMIZER_NAME}.bin")
    (full / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    write_manifest(str(full))
    assert verify_checkpoint(full) == []
    for name in (f"{FSDP_MODEL_NAME}.bin", f"{OPTIMIZER_NAME}.bin"):
        cut = copy_run(full, tmp_path / name / "checkpoint-2")
        truncate(cut / name)
        assert verify_checkpoint(cut) == [f"{name} is truncated (the end of its zip archive is missing)"]

    sharded = tmp_path / "sharded" / "checkpoint-2"
    dcp.save({"model": model.state_dict()}, checkpoint_id=sharded / f"{FSDP_MODEL_NAME}_0")
    dcp.save({"optimizer": optimizer.state_dict()["state"]}, checkpoint_id=sharded / f"{OPTIMIZER_NAME}_0")
    (sharded / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    write_manifest(str(sharded))
    assert not (sharded / "model.safetensors").exists() and verify_checkpoint(sharded) == []
    shard = next((sharded / f"{FSDP_MODEL_NAME}_0").glob("*.distcp"))
    flip_byte(shard)
    name = shard.relative_to(sharded).as_posix()
    assert verify_checkpoint(sharded) == [f"{name} has changed since it was saved (its SHA-256 differs from {MANIFEST_FILE})"]


def test_verify_command_reports_each_checkpoint_and_exits_by_the_newest(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    assert cli_main(["verify", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["checkpoint-2   OK", "checkpoint-4   OK", "checkpoint-6   OK", "final student  OK"]

    truncate(run / "checkpoint-2" / "optimizer.pt")  # an older checkpoint: resume is unaffected
    assert cli_main(["verify", str(run)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "checkpoint-2   DAMAGED: optimizer.pt is truncated (the end of its zip archive is missing)"

    truncate(run / "checkpoint-6" / "model.safetensors")
    assert cli_main(["verify", str(run)]) == 1
    assert "checkpoint-6   DAMAGED: model.safetensors is truncated: header says" in capsys.readouterr().out

    (run / "checkpoint-6").rename(run / "not-a-checkpoint")
    (run / "config.json").write_text("")  # the final student's config cut to nothing
    assert cli_main(["verify", str(run)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "final student  DAMAGED: config.json is empty"

    code, err = run_and_capture(cli_main, ["verify", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and err == f"error: output_dir: '{tmp_path / 'nowhere'}' does not exist\n"


def test_verify_refuses_a_final_student_without_weights_and_checks_a_checkpoint_folder_given_itself(
    finished_run, tmp_path, capsys
):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "model.safetensors").unlink()  # what a final save cut short by a full disk leaves
    assert cli_main(["verify", str(run)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "final student  DAMAGED: model.safetensors is missing"

    checkpoint = run / "checkpoint-6"
    truncate(checkpoint / "optimizer.pt")
    assert cli_main(["verify", str(checkpoint)]) == 1  # not taken for a final student, whose files are whole
    assert capsys.readouterr().out == (
        "checkpoint-6  DAMAGED: optimizer.pt is truncated (the end of its zip archive is missing)\n"
    )


# ------------------------------------------------------------------------------------------------
# Resume past a damaged newest checkpoint
# ------------------------------------------------------------------------------------------------
def test_resume_skips_a_truncated_newest_checkpoint_and_ends_with_the_uninterrupted_weights(
    finished_run, saved_models, imagefolder, tmp_path, caplog
):
    run = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoint-6")
    for name in ("model.safetensors", "results.json"):
        (run / name).unlink()
    truncate(run / "checkpoint-4" / "model.safetensors")  # a partial rsync of the newest checkpoint
    with caplog.at_level(logging.WARNING, logger="hf_spectralkd.checkpointing"):
        code = run_distill.main(tiny_run_args(saved_models, imagefolder, run, *RUN_OPTIONS, "--resume_from_checkpoint", "true"))
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "checkpoint" in r.name]
    assert any(m.startswith(f"checkpoint-4 in '{run}' is damaged (model.safetensors is truncated") for m in warnings), warnings
    assert any(m.startswith("resuming from checkpoint-2,") for m in warnings), warnings
    # Trained again from step 2: the same weights as the run that was never interrupted.
    expected, resumed = load_file(finished_run / "model.safetensors"), load_file(run / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-7)
    assert json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert verify_checkpoint(run / "checkpoint-4") == []  # written again, whole


def test_trainer_train_true_resumes_from_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    def trainer(max_steps: int) -> SpectralDistillationTrainer:
        args = SpectralDistillationConfig(
            output_dir=str(tmp_path / "run"), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
            report_to=[], use_cpu=True, disable_tqdm=True, distillation_type="none", beta=0.0, seed=0,
        )
        return SpectralDistillationTrainer(model=tiny_vit(), args=args, train_dataset=SyntheticImageDataset(16))

    trainer(4).train()
    (tmp_path / "run" / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4,')
    resumed = trainer(4)
    with caplog.at_level(logging.WARNING, logger="hf_spectralkd.checkpointing"):
        resumed.train(resume_from_checkpoint=True)
    assert "resuming from checkpoint-2," in caplog.text and resumed.state.global_step == 4
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(ConfigurationError, match="no checkpoint-\\* folder in"):
        trainer(4).train(resume_from_checkpoint=True)


def test_all_checkpoints_damaged_lists_each_one(tmp_path):
    truncate(fake_checkpoint(tmp_path / "checkpoint-3", 3) / "model.safetensors")
    (fake_checkpoint(tmp_path / "checkpoint-10", 10) / "config.json").unlink()
    with pytest.raises(DamagedFileError) as raised:
        newest_verified_checkpoint(str(tmp_path))
    message = str(raised.value)
    # Newest first, by step number (10 after 3, not before it as text would sort).
    assert message.startswith(f"resume_from_checkpoint: '{tmp_path}' is damaged (checkpoint-10: config.json is missing")
    assert "| checkpoint-3: model.safetensors is truncated" in message and "\n" not in message


# ------------------------------------------------------------------------------------------------
# Config files
# ------------------------------------------------------------------------------------------------
def test_unreadable_config_names_the_config_argument(tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("alpha: 0.5\n")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # chmod cannot stop root, who runs the tests in CI
    with pytest.raises(ConfigurationError, match=r"^config: cannot read '.*run.yaml' \(Permission denied\)$"):
        read_config_file(str(config))


def test_a_config_with_a_byte_order_mark_reads_as_utf8(tmp_path):
    config = tmp_path / "windows.yaml"
    config.write_bytes("\ufeffalpha: 0.5\nrun_name: réglé\n".encode("utf-8"))
    assert read_config_file(str(config)) == {"alpha": 0.5, "run_name": "réglé"}
