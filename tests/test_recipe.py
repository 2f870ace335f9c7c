"""recipes/run_distill.py end to end on tiny local data, the shipped configs, and the data layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import run_distill
import torch
from helpers import naive_bootstrap, streaming_args, tiny_run_args, tiny_vit
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, ViTImageProcessor

from hf_spectralkd.cli import main
from hf_spectralkd.data import (
    DataArguments,
    ImageClassificationCollator,
    TransformedImageDataset,
    build_eval_transform,
    build_train_transform,
    load_image_datasets,
)
from hf_spectralkd.data.demo import load_mnist_demo
from hf_spectralkd.io.model_loading import load_model
from hf_spectralkd.layer_map import build_layer_map
from hf_spectralkd.metrics import load_predictions

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "hf_spectralkd" / "configs").glob("*.yaml"))


def check_finished_run(output_dir: Path) -> dict:
    results = json.loads((output_dir / "results.json").read_text())
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "run_config.json",
                 "train_results.json", "eval_results.json", "all_results.json", "trainer_state.json"):
        assert (output_dir / name).exists(), name
    assert results["student_accuracy"] is not None and results["teacher_accuracy"] is not None
    assert [pair["teacher"] for pair in results["layer_map"]] == [0, 3]
    student = AutoModelForImageClassification.from_pretrained(output_dir)
    assert student.config.id2label == {0: "a", 1: "b", 2: "c"}
    return results


def test_recipe_on_local_imagefolder(imagefolder, saved_models, tmp_path):
    assert run_distill.main(tiny_run_args(saved_models, imagefolder, tmp_path / "out")) == 0
    results = check_finished_run(tmp_path / "out")
    assert results["global_steps"] == 4
    assert (tmp_path / "out" / "checkpoint-4").is_dir() and not (tmp_path / "out" / ".checkpoint-staging").exists()


def test_evaluate_only_scores_a_saved_student_as_pipeline_does(saved_models, tmp_path, capsys):
    from helpers import make_imagefolder
    from transformers import pipeline

    data = make_imagefolder(tmp_path / "data", per_class=8, eval_per_class=70)  # 210 evaluation images
    trained = tmp_path / "trained"
    # Trained enough to tell the classes apart, so that a preprocessing mismatch would change predictions.
    assert run_distill.main(tiny_run_args(saved_models, data, trained, "--max_steps", "60", "--learning_rate", "3e-3",
                                          "--distillation_type", "none", "--beta", "0", "--eval_strategy", "no",
                                          "--profile_images", "0")) == 0
    out = tmp_path / "evaluated"
    assert run_distill.main(["--do_train", "false", "--do_eval", "true", "--student", str(trained), "--dataset", data,
                             "--teacher", saved_models["teacher"], "--output_dir", str(out), "--use_cpu", "true",
                             "--report_to", "none", "--per_device_eval_batch_size", "64", "--disable_tqdm", "true"]) == 0
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_top1"] > 0.5  # well above chance (1/3): not a constant prediction
    assert json.loads((out / "all_results.json").read_text())["eval_top1"] == metrics["eval_top1"]
    results = json.loads((out / "results.json").read_text())
    assert results["student_accuracy"] == metrics["eval_top1"] and results["teacher_accuracy"] is not None
    assert results["global_steps"] == 0 and not (out / "model.safetensors").exists()  # nothing was trained or saved

    alone = tmp_path / "alone"  # a pushed student on its own: no teacher given, none needed
    assert run_distill.main(["--do_train", "false", "--do_eval", "true", "--student", str(trained), "--dataset", data,
                             "--output_dir", str(alone), "--use_cpu", "true", "--report_to", "none"]) == 0
    assert json.loads((alone / "eval_results.json").read_text())["eval_top1"] == metrics["eval_top1"]
    assert json.loads((alone / "results.json").read_text())["teacher"] is None

    files = sorted((Path(data) / "validation").rglob("*.png"))

    def logits_by_name(model):  # per image, {class name: logit}, from the pipeline as users call it
        # batched: one image per forward took 8-30 s here for 210 images on 2 busy cores, 64 per forward 1 s
        outputs = pipeline("image-classification", model=str(model))([Image.open(f) for f in files], top_k=3,
                                                                       function_to_apply="none", batch_size=64)
        return [{entry["label"]: entry["score"] for entry in output} for output in outputs]

    student_logits = logits_by_name(trained)
    expected = np.mean([max(scores, key=scores.get) == f.parent.name for scores, f in zip(student_logits, files)])
    assert metrics["eval_top1"] == pytest.approx(expected, abs=0.005)

    # The evaluate-only run reports its top-1 with the 95 % interval of a naive bootstrap over its 210 images.
    labels, top_k = load_predictions(out)
    assert len(labels) == 210 and np.mean(top_k[:, 0] == labels) == pytest.approx(metrics["eval_top1"])
    interval = (metrics["eval_top1_ci_low"], metrics["eval_top1_ci_high"])
    assert interval == pytest.approx(naive_bootstrap(top_k[:, 0] == labels), abs=1e-12) and interval[0] < interval[1]
    assert results["student_top1_ci"] == pytest.approx(list(interval))

    # `hf-spectralkd evaluate` scores the student through its own pipeline: the same top-1 and interval; with a
    # --teacher whose classes are in another order, the agreement and KL of a naive computation over class names.
    other = tiny_vit(num_labels=3, seed=1)
    other.config.id2label, other.config.label2id = {0: "c", 1: "a", 2: "b"}, {"c": 0, "a": 1, "b": 2}
    other.save_pretrained(tmp_path / "other")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "other")
    capsys.readouterr()
    scored = tmp_path / "scored.json"
    assert main(["evaluate", str(trained), "--dataset", data, "--batch_size", "50", "--output_file", str(scored),
                 "--teacher", str(tmp_path / "other")]) == 0
    report = json.loads(scored.read_text())
    agree, kl = [], []
    for s, t in zip(student_logits, logits_by_name(tmp_path / "other")):
        agree.append(max(s, key=s.get) == max(t, key=t.get))
        zs, zt = sum(np.exp(v) for v in s.values()), sum(np.exp(v) for v in t.values())
        kl.append(sum(np.exp(t[c]) / zt * (t[c] - np.log(zt) - s[c] + np.log(zs)) for c in "abc"))
    assert report["eval_agreement"] == pytest.approx(np.mean(agree))
    assert report["eval_kl"] == pytest.approx(np.mean(kl), rel=1e-4)
    assert 0 < report["eval_agreement"] < 1  # the two models differ: a wrong class order would change both numbers
    assert report["images"] == 210 and report["eval_top1"] == pytest.approx(metrics["eval_top1"])
    assert (report["eval_top1_ci_low"], report["eval_top1_ci_high"]) == pytest.approx(interval)
    printed = capsys.readouterr()
    assert f"top1: {100 * metrics['eval_top1']:.2f} % (95 % CI {100 * interval[0]:.2f}–{100 * interval[1]:.2f} %)" in printed.out
    assert "evaluating trained" in printed.err  # the progress bar


def test_recipe_on_local_parquet_with_custom_columns(parquet_dataset, saved_models, tmp_path):
    args = tiny_run_args(saved_models, parquet_dataset, tmp_path / "out", "--image_column", "img", "--label_column", "target")
    assert run_distill.main(args) == 0
    check_finished_run(tmp_path / "out")


def test_yaml_config_with_command_line_overrides(imagefolder, saved_models, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"teacher: {saved_models['teacher']}\nstudent: {saved_models['student_config']}\ndataset: {imagefolder}\n"
        "alpha: 0.5\nbeta: 0.3\nstudent_layers: [0, 2]\nteacher_layers: [0, 3]\nmax_steps: 2\n"
    )
    model_args, data_args, args = run_distill.parse_arguments([str(config), "--beta", "0.7", "--output_dir", "x"])
    assert (args.alpha, args.beta, args.student_layers, args.max_steps) == (0.5, 0.7, [0, 2], 2)
    assert model_args.teacher == saved_models["teacher"] and data_args.dataset == imagefolder
    _, _, same = run_distill.parse_arguments(["--config", str(config), "--output_dir", "x"])
    assert same.beta == 0.3


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_runs_with_max_steps_and_resumes_exactly(workers, parquet_dataset, saved_models, tmp_path):
    import shutil

    # 24 images at batch 4: a pass is 6 steps, so step 8 lies in the second (reshuffled) pass.
    options = ["--max_steps", "12", "--save_steps", "4", "--dataloader_num_workers", str(workers), "--profile_images", "0"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_distill.main(streaming_args(saved_models, parquet_dataset, full, *options)) == 0
    # Continue from the full run's step-8 checkpoint in a fresh folder: the stream is fast-forwarded
    # to step 8 and steps 9-12 must reproduce the uninterrupted run.
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-8", resumed / "checkpoint-8")
    assert run_distill.main(streaming_args(saved_models, parquet_dataset, resumed, *options, "--resume_from_checkpoint", "true")) == 0
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    full_state = json.loads((full / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    resumed_state = json.loads((resumed / "checkpoint-12" / "trainer_state.json").read_text())["log_history"]
    losses = lambda history: [(e["step"], e["loss"], e["loss_fft"]) for e in history if "loss" in e]  # noqa: E731
    assert losses(resumed_state)[-1] == pytest.approx(losses(full_state)[-1], rel=1e-5)
    # the image totals continue from the checkpoint: 12 steps of 4 images, whichever run
    for folder in (full, resumed):
        assert json.loads((folder / "results.json").read_text())["train_images"] == 48


def test_streamed_parquet_derives_max_steps_from_epochs(parquet_dataset, saved_models, tmp_path):
    # parquet footers give the split size (24 images): one epoch at batch 4 is 6 optimizer steps
    args = streaming_args(saved_models, parquet_dataset, tmp_path / "out", "--max_steps", "-1", "--num_train_epochs", "1",
                          "--save_strategy", "no")
    assert run_distill.main(args) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["global_steps"] == 6


def test_streamed_dataset_of_unknown_size_needs_max_steps(imagefolder, saved_models, tmp_path, capsys):
    import shutil

    fresh = tmp_path / "images"  # a folder datasets has never built, so no cached split sizes
    shutil.copytree(imagefolder, fresh)
    args = tiny_run_args(saved_models, str(fresh), tmp_path / "out", "--streaming", "true", "--max_steps", "-1")
    assert run_distill.main(args) == 2
    assert "max_steps: a streamed dataset of unknown size needs --max_steps" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Shipped configs
# ------------------------------------------------------------------------------------------------
def _regnety_160(id2label):
    from transformers import AutoModelForImageClassification, TimmWrapperConfig

    return AutoModelForImageClassification.from_config(TimmWrapperConfig(architecture="regnety_160",
                                                                         num_labels=len(id2label)))


def _dinov2_base_linear(id2label):
    """DINOv2 ViT-B/14 with its linear head, as its Hub config builds it: image_size 518 (the size the run
    feeds it; its processor's 224-px crop is not what the teacher's input adapter uses)."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    return Dinov2ForImageClassification(Dinov2Config(image_size=518, patch_size=14, hidden_size=768, num_hidden_layers=12,
                                                     num_attention_heads=12, num_labels=len(id2label)))


#: Offline stand-ins for the Hub teachers of the shipped configs: same architecture, random weights (a preset
#: name for load_model, or a builder).
HUB_TEACHER_ARCHITECTURES = {
    "timm/cait_s24_224.fb_dist_in1k": "cait_s24_224",
    "microsoft/swin-small-patch4-window7-224": "swin_small_patch4_window7_224",
    "timm/regnety_160.deit_in1k": _regnety_160,
    "facebook/dinov2-base-imagenet1k-1-layer": _dinov2_base_linear,
}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses_and_resolves(config):
    model_args, data_args, args = run_distill.parse_arguments([str(config), "--use_cpu", "true"])  # CI has no GPU for bf16
    assert model_args.student and args.output_dir
    if config.stem.startswith("demo"):
        return  # exercised end to end by `make demo` and `make demo-widelast`
    id2label = {i: str(i) for i in range(1000)}
    student = load_model(model_args.student, argument="student", id2label=id2label, from_scratch=True).model
    if not args.needs_teacher:
        assert args.distillation_type == "none" and args.beta == 0
        return
    stand_in = HUB_TEACHER_ARCHITECTURES[model_args.teacher]
    teacher = stand_in(id2label) if callable(stand_in) else load_model(stand_in, argument="teacher", id2label=id2label).model
    if args.uses_features:
        pairs = build_layer_map(student, teacher, args.student_layers, args.teacher_layers, args.grid_alignment)
        assert len(pairs) == len(args.student_layers)
        if config.stem == "deit_tiny_from_regnety_160":  # CNN stages against 14×14 blocks, compared across grids
            assert [p.teacher_shape[1:] for p in pairs] == [(56, 56), (28, 28), (14, 14), (7, 7)]
        if config.stem == "deit_tiny_from_dinov2":  # patch 14 at 518 px: 37×37 against the student's 14×14
            assert {p.teacher_shape for p in pairs} == {(768, 37, 37)} and {p.student_shape for p in pairs} == {(192, 14, 14)}


def test_paper_configs_hold_the_paper_hyperparameters():
    _, _, deit = run_distill.parse_arguments([str(ROOT / "recipes/configs/deit_tiny_from_cait_s24.yaml"), "--use_cpu", "true"])
    assert (deit.alpha, deit.beta, deit.temperature, deit.label_smoothing_factor, deit.num_train_epochs) == (0.9, 0.2, 1.0, 0.1, 400)
    assert deit.student_layers == [0, 1, 6, 7, 8, 9, 10, 11] and deit.teacher_layers == [0, 1, 18, 19, 20, 21, 22, 23]
    _, _, swin = run_distill.parse_arguments([str(ROOT / "recipes/configs/swin_tiny_from_swin_small.yaml"), "--use_cpu", "true"])
    assert (swin.beta, swin.num_train_epochs, swin.student_layers, swin.teacher_layers) == (0.05, 500, [0, 1, 2, 3], [0, 1, 2, 3])
    for config in ("deit_tiny_from_cait_s24", "deit_small_from_cait_s24", "swin_tiny_from_swin_small"):  # DeiT's RASampler
        _, data, _ = run_distill.parse_arguments([str(ROOT / f"recipes/configs/{config}.yaml"), "--use_cpu", "true"])
        assert data.repeated_augmentation == 3


def yaml_values(path: Path) -> dict:
    """A config's values read independently of the library: the YAML and its `base:` chain."""
    import yaml

    data = yaml.safe_load(path.read_text())
    base = data.pop("base", None)
    return {**(yaml_values(path.parent / base) if base else {}), **data}


@pytest.mark.parametrize("name", ["deit_tiny_from_cait_s24", "deit_tiny_from_cait_s24_dd300", "deit_tiny_hard_kd"])
def test_load_recipe_gives_the_python_api_exactly_the_shipped_recipe(name):
    from hf_spectralkd import load_recipe

    path = ROOT / "hf_spectralkd" / "configs" / f"{name}.yaml"
    objects = load_recipe(name, output_dir="runs/api", use_cpu=True)  # by name, as after pip install
    expected = yaml_values(path)
    for key, value in expected.items():
        if key in ("output_dir", "dataloader_pin_memory"):  # overridden here; TrainingArguments turns pinning off on CPU
            continue
        holder = next(obj for obj in objects if hasattr(obj, key))
        got = getattr(holder, "base_learning_rate" if key == "learning_rate" else key)
        got = getattr(got, "value", got)  # enums such as lr_scheduler_type / report_to lists
        if key == "report_to":
            got = got[0] if isinstance(got, list) and len(got) == 1 else got
        assert got == value, (key, got, value)
    model_args, data_args, args = objects
    assert args.output_dir == "runs/api" and args.scale_lr
    assert args.learning_rate == pytest.approx(expected["learning_rate"] * args.global_batch_size / 512)
    # epochs of ImageNet, counted as DeiT's repeated-augmentation sampler does (whole global batches only)
    assert args.max_steps == int(args.num_train_epochs) * (1_281_167 // args.global_batch_size)
    if name == "deit_tiny_hard_kd":
        assert (args.distillation_type, args.alpha, args.beta) == ("hard", 0.5, 0.0)
    # The README's API example is this call.
    assert 'load_recipe("deit_tiny_from_cait_s24"' in (ROOT / "README.md").read_text()


# ------------------------------------------------------------------------------------------------
# Data layer
# ------------------------------------------------------------------------------------------------
def test_demo_data_shapes_classes_and_deterministic_split():
    demo = load_mnist_demo()
    assert len(demo["train"]) == 4000 and len(demo["test"]) == 1000
    assert demo["train"].features["label"].names == [str(i) for i in range(10)]
    assert np.bincount(demo["test"]["label"]).tolist() == [100] * 10
    image = demo["train"][0]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    load_mnist_demo.cache_clear()
    again = load_mnist_demo()
    assert again["test"]["label"] == demo["test"]["label"]
    assert np.array_equal(np.asarray(again["train"][5]["image"]), np.asarray(demo["train"][5]["image"]))
    data = load_image_datasets(DataArguments(dataset="demo:mnist5k", eval_split="test", auto_augment="none"), image_size=28)
    batch = data.collator([data.train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 28, 28) and len(data.id2label) == 10


def test_corrupt_image_is_skipped_and_counted(tmp_path, imagefolder):
    import datasets

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    good = sorted((Path(imagefolder) / "train" / "a").glob("*.png"))[0]
    raw = datasets.Dataset.from_dict({"image": [str(good), str(broken), str(good)], "label": [0, 1, 0]},
                                     features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}))
    dataset = TransformedImageDataset(raw, build_eval_transform(DataArguments(), 32), "image", "label")
    assert dataset[1]["pixel_values"] is None
    batch = ImageClassificationCollator()([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["num_skipped"] == 1
    assert batch["labels"].tolist() == [0, 0]


def test_recipe_counts_corrupt_images_in_logs(imagefolder, saved_models, tmp_path):
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(imagefolder, folder)
    (folder / "train" / "a" / "zz_corrupt.png").write_bytes(b"not a png at all")
    args = tiny_run_args(saved_models, str(folder), tmp_path / "out", "--max_steps", "8", "--eval_strategy", "no")
    assert run_distill.main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["skipped_images"] >= 1


def test_augmentation_is_a_function_of_seed_epoch_and_index(imagefolder):
    data = load_image_datasets(DataArguments(dataset=imagefolder), image_size=32, seed=3)
    first = data.train[2]["pixel_values"]
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(data.train[2]["pixel_values"], first)
    data.train.set_epoch(1)
    assert not torch.equal(data.train[2]["pixel_values"], first)
    data.train.set_epoch(0)
    assert torch.equal(data.train[2]["pixel_values"], first)


def test_deit_training_transform_and_pillow13_posterize():
    from timm.data.random_erasing import RandomErasing

    transform = build_train_transform(DataArguments(), 64)
    steps = {type(step).__name__: step for step in transform.transforms}
    rand_augment = steps["RandAugment"]
    assert {op.name for op in rand_augment.ops} >= {"PosterizeIncreasing", "SolarizeIncreasing", "Rotate"}
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in rand_augment.ops)
    erasing = next(step for step in transform.transforms if isinstance(step, RandomErasing))
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    assert "bicubic" in str(steps["RandomResizedCropAndInterpolation"].interpolation).lower()
    # Magnitude 10 asks timm's posterize for 0 bits, which Pillow 13 rejects: the op must cope.
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0.0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert np.asarray(posterize(image)).max() == 0
    for seed in range(20):  # the full transform never raises, whatever the magnitudes drawn
        torch.manual_seed(seed)
        assert transform(image).shape == (3, 64, 64)
