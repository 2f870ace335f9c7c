"""Pushing students (Hub API patched where transformers calls it), model cards, pipelines, tokens."""

from __future__ import annotations

import fnmatch
import json
import os
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import run_distill
from helpers import SyntheticImageDataset, tiny_cait, tiny_run_args, tiny_vit
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModelForImageClassification, ViTImageProcessor, pipeline

from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer
from hf_spectralkd.cli import main as cli_main

TOKEN = "hf_DoNotLeakThisToken1234567890"


class FakeHubApi:
    """Records what would be sent: the files of the uploaded folder after the ignore patterns."""

    def __init__(self):
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id, url=f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        root = Path(folder_path)
        files = []
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(relative, p) for p in ignore_patterns or ()):
                files.append(relative)
        self.uploads.append({"repo_id": repo_id, "files": files, "folder": str(root), **kwargs})
        result = SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")
        if kwargs.get("run_as_future"):  # checkpoint pushes during training are asynchronous
            future = Future()
            future.set_result(result)
            return future
        return result


def card_metadata(folder: Path) -> dict:
    return ModelCard.load(str(folder / "README.md")).data.to_dict()


def test_trainer_push_sends_only_the_student_with_a_complete_card(tmp_path):
    fake = FakeHubApi()
    args = SpectralDistillationConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        save_strategy="no", push_to_hub=True, hub_model_id="someone/tiny-spectralkd", student_layers=[0, 2],
        teacher_layers=[0, 3], disable_tqdm=True, teacher_check_images=0,  # a random teacher is near chance
    )
    with mock.patch("transformers.trainer.hf_api", return_value=fake):
        trainer = SpectralDistillationTrainer(
            model=tiny_vit(), teacher_model=tiny_cait(), args=args, train_dataset=SyntheticImageDataset(8),
            eval_dataset=SyntheticImageDataset(8, seed=1), processing_class=ViTImageProcessor(size={"height": 32, "width": 32}),
        )
        trainer.train()
        evaluated = trainer.evaluate()
        trainer.push_to_hub()
    upload = fake.uploads[-1]
    assert upload["repo_id"] == "someone/tiny-spectralkd"
    assert set(upload["files"]) == {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "training_args.bin"}
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_type"] == "vit" and "timm" not in json.dumps(config)  # the student, never the teacher

    metadata = card_metadata(tmp_path / "run")
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-classification"
    assert {"knowledge-distillation", "spectralkd", "vision-transformer"} <= set(metadata["tags"])
    assert metadata["teacher_model"]
    results = metadata["model-index"][0]["results"][0]
    assert results["task"]["type"] == "image-classification"
    assert {m["type"] for m in results["metrics"]} == {"accuracy", "top_5_accuracy"}
    text = (tmp_path / "run" / "README.md").read_text()
    for fragment in ("## Teacher", "Layer map", "| α (logit KD weight) | 0.9 |", "| β (feature weight) | 0.2 |",
                     "label smoothing", "someone/tiny-spectralkd", "arXiv:2412.19055", "@article{tian2024spectralkd"):
        assert fragment in text
    low, high = evaluated["eval_top1_ci_low"], evaluated["eval_top1_ci_high"]  # the evaluation's 95 % interval
    assert f"- Top-1: {100 * evaluated['eval_top1']:.2f} % (95 % CI {100 * low:.2f}–{100 * high:.2f} %)" in text


def test_recipe_writes_card_with_teacher_revision_and_profile_plot(saved_models, imagefolder, tmp_path):

    out = tmp_path / "out"
    assert run_distill.main(tiny_run_args(saved_models, imagefolder, out)) == 0
    metadata = card_metadata(out)
    assert metadata["teacher_model"] == Path(saved_models["teacher"]).name  # a local teacher by its folder name
    assert not metadata.get("datasets")  # a local folder is no Hub dataset
    for published in ("README.md", "results.json"):  # no local path is ever published
        assert str(tmp_path.parent) not in (out / published).read_text(), published
    assert metadata["model-index"][0]["results"][0]["dataset"]["split"] == "validation"
    text = (out / "README.md").read_text()
    assert "spectral_profiles.png" in text and (out / "spectral_profiles.png").exists()
    assert "Top-1 on the evaluation split:" in text and "n/a" not in text.split("Top-1 on the evaluation split:")[1].split("\n")[0]
    results = json.loads((out / "results.json").read_text())
    assert "teacher_revision" in results and results["profile_similarity"]["pearson"] == pytest.approx(
        json.loads((out / "spectral_profiles.json").read_text())["comparison"]["pearson"])


def test_card_license_defaults_to_the_teachers_and_can_be_set(saved_models, imagefolder, tmp_path):
    import shutil

    teacher = tmp_path / "licensed_teacher"
    shutil.copytree(saved_models["teacher"], teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\n---\n# a teacher\n")
    models = {**saved_models, "teacher": str(teacher)}
    assert run_distill.main(tiny_run_args(models, imagefolder, tmp_path / "a", "--profile_images", "0")) == 0
    assert card_metadata(tmp_path / "a")["license"] == "mit"
    assert json.loads((tmp_path / "a" / "results.json").read_text())["license"] == "mit"
    assert run_distill.main(tiny_run_args(models, imagefolder, tmp_path / "b", "--profile_images", "0", "--license",
                                          "apache-2.0")) == 0
    assert card_metadata(tmp_path / "b")["license"] == "apache-2.0"
    assert run_distill.main(tiny_run_args(saved_models, imagefolder, tmp_path / "c", "--profile_images", "0")) == 0
    assert "license" not in card_metadata(tmp_path / "c")  # the teacher's card names none: nothing is made up


def test_cli_push_uploads_a_finished_run_without_checkpoints(saved_models, imagefolder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the fake Hub below is "online"

    out = tmp_path / "out"
    assert run_distill.main(tiny_run_args(saved_models, imagefolder, out)) == 0
    fake = FakeHubApi()
    with mock.patch("hf_spectralkd.io.hub.hf_api", return_value=fake):
        assert cli_main(["push", str(out), "--repo-id", "me/student", "--private"]) == 0
    files = fake.uploads[0]["files"]
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "results.json", "spectral_profiles.png"} <= set(files)
    assert not any(f.startswith("checkpoint-") for f in files)
    assert fake.created[0] == ("me/student", {"token": None, "private": True, "exist_ok": True})
    assert 'model="me/student"' in (out / "README.md").read_text()


def test_demo_sized_student_loads_and_runs_in_a_pipeline(tmp_path):
    out = tmp_path / "student"
    code = run_distill.main([
        "recipes/configs/demo.yaml", "--distillation_type", "none", "--beta", "0", "--student_layers", "", "--teacher_layers", "",
        "--max_steps", "3", "--output_dir", str(out), "--results_file", str(tmp_path / "results.json"),
        "--eval_strategy", "no", "--save_strategy", "no", "--max_eval_samples", "20", "--spectral_dynamics_steps", "0",
        "--disable_tqdm", "true",
    ])
    assert code == 0
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.id2label == {i: str(i) for i in range(10)} and model.config.image_size == 28
    digit = Image.fromarray((255 * (__import__("numpy").eye(28))).astype("uint8"), mode="L")
    predictions = pipeline("image-classification", model=str(out), top_k=3)(digit)
    assert len(predictions) == 3 and all(p["label"] in {str(i) for i in range(10)} for p in predictions)


def test_token_never_appears_in_logs_or_files(saved_models, imagefolder, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the fake Hub below is "online"

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    fake = FakeHubApi()
    with mock.patch("transformers.trainer.hf_api", return_value=fake):
        code = run_distill.main(tiny_run_args(saved_models, imagefolder, out, "--hub_token", TOKEN, "--push_to_hub", "true",
                                              "--hub_model_id", "me/secret-test", "--logging_first_step", "true"))
    assert code == 0 and fake.uploads
    captured = capsys.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err and TOKEN not in caplog.text
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
    assert os.environ["HF_TOKEN"] == TOKEN  # still usable by huggingface_hub for the upload
