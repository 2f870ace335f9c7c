"""Class names meet: a pretrained student's head in the data's order, ImageNet teachers in another order."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import colour_image, make_imagefolder, tiny_vit
from PIL import Image
from transformers import ViTImageProcessor, pipeline

from hf_spectralkd import ConfigurationError, SpectralDistillationConfig, SpectralDistillationTrainer
from hf_spectralkd.io.model_loading import load_model

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def with_labels(model, names):
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    return model


# ------------------------------------------------------------------------------------------------
# A pretrained student whose classes the data lists in another order
# ------------------------------------------------------------------------------------------------
def _train_on_folder(model, processor, folder: Path, steps: int = 20) -> None:
    """Plain full-batch Adam on the imagefolder's train split (class k = the k-th sorted sub-folder)."""
    files = sorted(folder.rglob("*.png"))
    names = sorted({f.parent.name for f in files})
    pixels = processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([names.index(f.parent.name) for f in files])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels).backward()
        optimizer.step()
    model.eval()


def _shuffled_copy(model, order: list[str]):
    """The same classifier with its classes (head rows and names) in ``order``."""
    old = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = [old.index(name) for name in order]
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[rows].clone())
        model.classifier.bias.copy_(model.classifier.bias[rows].clone())
    return with_labels(model, order)


def _pipeline_top1(model_dir, files) -> float:
    """Accuracy by class *name*, as a user of the saved model measures it (transformers' pipeline)."""
    predictions = pipeline("image-classification", model=str(model_dir))([Image.open(f) for f in files], top_k=1)
    return float(np.mean([p[0]["label"] == f.parent.name for p, f in zip(predictions, files)]))


@pytest.fixture(scope="module")
def shuffled_student(tmp_path_factory):
    """A student trained past chance on a/b/c, saved with its classes listed as c, a, b (head rows to match)."""
    root = tmp_path_factory.mktemp("shuffled")
    data = make_imagefolder(root / "data", per_class=8, eval_per_class=10, draw=colour_image)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    model = with_labels(tiny_vit(num_labels=3, seed=3), ["a", "b", "c"])
    _train_on_folder(model, processor, Path(data) / "train")
    student = root / "student"
    _shuffled_copy(model, ["c", "a", "b"]).save_pretrained(student)
    processor.save_pretrained(student)
    return data, student


def test_pretrained_student_with_another_label_order_keeps_its_accuracy(shuffled_student, tmp_path):
    from run_distill import main

    data, student = shuffled_student
    files = sorted((Path(data) / "validation").rglob("*.png"))
    before = _pipeline_top1(student, files)
    assert before > 0.6  # past chance (1/3): relabelling would show

    out = tmp_path / "run"
    assert main(["--student", str(student), "--dataset", data, "--output_dir", str(out), "--max_steps", "1",
                 "--learning_rate", "1e-9", "--distillation_type", "none", "--beta", "0", "--eval_crop_pct", "1.0",
                 "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "32", "--eval_strategy", "no",
                 "--profile_images", "0", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
                 "--auto_augment", "none", "--reprob", "0", "--teacher_check_images", "0"]) == 0
    top1 = json.loads((out / "eval_results.json").read_text())["eval_top1"]
    assert abs(top1 - before) <= 1 / len(files) + 1e-9
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}  # the data's order
    assert abs(_pipeline_top1(out, files) - before) <= 1 / len(files) + 1e-9


def test_classes_new_to_the_student_get_new_rows_named_in_a_warning(shuffled_student, caplog):
    _, student = shuffled_student
    saved = load_model(str(student), argument="student").model  # rows c, a, b
    with caplog.at_level(logging.INFO, logger="hf_spectralkd.labels"):
        model = load_model(str(student), argument="student", id2label={0: "b", 1: "d", 2: "a"}).model
    assert "student: 1 of the data's 3 classes are not among its classes: 'd'" in caplog.text
    assert "1 of its classes are not in the data and leave its head: 'c'" in caplog.text
    assert model.config.id2label == {0: "b", 1: "d", 2: "a"} and model.classifier.out_features == 3
    for row, old in ((0, 2), (2, 1)):  # b was row 2, a row 1
        torch.testing.assert_close(model.classifier.weight[row], saved.classifier.weight[old])
        torch.testing.assert_close(model.classifier.bias[row], saved.classifier.bias[old])
    assert not any(torch.allclose(model.classifier.weight[1], w) for w in saved.classifier.weight)
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)

    caplog.clear()  # data without class names: nothing to match, the rows stay as they are
    with caplog.at_level(logging.WARNING, logger="hf_spectralkd.labels"):
        unnamed = load_model(str(student), argument="student", id2label={0: "0", 1: "1", 2: "2"}).model
    assert "the data's classes have only default names" in caplog.text
    torch.testing.assert_close(unnamed.classifier.weight, saved.classifier.weight)


@pytest.mark.parametrize("build", ["tiny_cait", "tiny_deit", "tiny_swin", "tiny_widelast"])
def test_every_family_keeps_its_logits_per_class_name(build):
    import helpers

    model = with_labels(getattr(helpers, build)(num_labels=3), ["a", "b", "c"]).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(pixel_values=pixels).logits
    from hf_spectralkd.labels import match_head_to_labels

    match_head_to_labels(model, {0: "c", 1: "d", 2: "a", 3: "b"})
    with torch.no_grad():
        after = model(pixel_values=pixels).logits
    assert after.shape == (2, 4) and model.config.num_labels == 4
    torch.testing.assert_close(after[:, [0, 2, 3]], before[:, [2, 0, 1]])  # c, a, b: the same logits as before


# ------------------------------------------------------------------------------------------------
# ImageNet synsets in another order
# ------------------------------------------------------------------------------------------------
def _config(tmp_path) -> SpectralDistillationConfig:
    return SpectralDistillationConfig(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[], use_cpu=True,
                                      disable_tqdm=True, save_strategy="no", eval_strategy="no", beta=0.0,
                                      teacher_check_images=0)


def test_imagenet_teacher_in_another_synset_order_is_matched_by_synset(tmp_path):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synsets = [info.index_to_label_name(i) for i in range(info.num_classes())]
    assert len(synsets) == 1000
    permutation = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    teacher_synsets = [synsets[i] for i in permutation]
    student = with_labels(tiny_vit(num_labels=1000, hidden=16, layers=1), synsets)
    teacher = with_labels(tiny_vit(num_labels=1000, hidden=16, layers=1, seed=1), teacher_synsets)
    order = SpectralDistillationTrainer(model=student, teacher_model=teacher, args=_config(tmp_path)).teacher_label_order
    # Independent: the teacher output that carries each student class, found by its synset.
    expected = [next(j for j, synset in enumerate(teacher_synsets) if synset == name) for name in synsets]
    assert order.tolist() == expected
    assert [teacher_synsets[i] for i in order.tolist()] == synsets
    both_cranes = [synsets.index("n02012849"), synsets.index("n03126707")]
    assert [teacher_synsets[order[i]] for i in both_cranes] == ["n02012849", "n03126707"]  # the bird, the machine

    # Descriptions in ImageNet's own order name the synsets by position: matched too, cranes included.
    described = with_labels(tiny_vit(num_labels=1000, hidden=16, layers=1, seed=2),
                            [info.index_to_description(i) for i in range(1000)])
    order = SpectralDistillationTrainer(model=described, teacher_model=teacher, args=_config(tmp_path)).teacher_label_order
    assert order.tolist() == expected


def test_repeated_class_names_are_refused_by_name(tmp_path):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    generator = torch.Generator().manual_seed(1)
    student_order, teacher_order = torch.randperm(1000, generator=generator).tolist(), torch.randperm(1000, generator=generator).tolist()
    # The student names its classes by description (two are "crane"), the teacher by synset, each in another order.
    student = with_labels(tiny_vit(num_labels=1000, hidden=16, layers=1), [info.index_to_description(i) for i in student_order])
    teacher_synsets = [info.index_to_label_name(i) for i in teacher_order]
    teacher = with_labels(tiny_vit(num_labels=1000, hidden=16, layers=1, seed=1), teacher_synsets)
    first, second = sorted(("n02012849", "n03126707"), key=teacher_synsets.index)
    with pytest.raises(ConfigurationError, match=rf"class names repeat: the student's 'crane' \(crane, crane\); the "
                                                 rf"teacher's 'crane' \({first}, {second}\).*distinct name"):
        SpectralDistillationTrainer(model=student, teacher_model=teacher, args=_config(tmp_path))
