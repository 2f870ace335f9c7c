"""Any teacher: its own normalisation and resolution, its labels matched by name, a check before training."""

from __future__ import annotations

import copy
import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SyntheticImageDataset, make_imagefolder, tiny_cait, tiny_classifier, tiny_vit
from PIL import Image
from transformers import ConvNextImageProcessor, ViTConfig, ViTImageProcessor

from hf_spectralkd import ConfigurationError, SpectralDistillationConfig, SpectralDistillationTrainer
from hf_spectralkd.data import DataArguments, build_eval_transform, build_image_processor, load_image_datasets
from hf_spectralkd.teacher import TeacherCheckError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def config(tmp_path, **overrides) -> SpectralDistillationConfig:
    options = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                   report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", eval_strategy="no",
                   student_layers=[0, 2], teacher_layers=[0, 2], teacher_check_images=0)
    options.update(overrides)
    return SpectralDistillationConfig(**options)


def with_labels(model, names):
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    return model


def record_teacher_inputs(teacher) -> list:
    received = []
    teacher.register_forward_pre_hook(lambda module, args, kwargs: received.append(kwargs["pixel_values"]), with_kwargs=True)
    return received


def imagenet_processor(size: int = 32):
    return build_image_processor(DataArguments(eval_crop_pct=1.0), size)


# ------------------------------------------------------------------------------------------------
# Normalisation and resolution
# ------------------------------------------------------------------------------------------------
def test_teacher_with_its_own_normalisation_receives_what_its_processor_gives(tmp_path):
    teacher_dir = tmp_path / "vit_half"  # like most google/vit-* checkpoints: mean = std = 0.5
    teacher = with_labels(tiny_vit(num_labels=3, seed=1), ["a", "b", "c"])
    teacher.save_pretrained(teacher_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(teacher_dir)
    crop = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    student_batch = build_eval_transform(DataArguments(eval_crop_pct=1.0), 32)(crop)[None]  # ImageNet statistics
    expected = ViTImageProcessor.from_pretrained(teacher_dir)(crop, do_resize=False, return_tensors="pt")["pixel_values"]

    trainer = SpectralDistillationTrainer(
        model=with_labels(tiny_vit(num_labels=3), ["a", "b", "c"]), teacher_model=str(teacher_dir), args=config(tmp_path),
        processing_class=imagenet_processor(),
    )
    received = record_teacher_inputs(trainer.teacher)
    trainer.compute_loss(trainer.model.train(), {"pixel_values": student_batch, "labels": torch.tensor([0])})
    assert not torch.allclose(student_batch, expected, atol=1e-3)  # the two normalisations really differ
    torch.testing.assert_close(received[0], expected, atol=1e-5, rtol=0)


def test_nothing_is_applied_when_teacher_and_student_inputs_agree(tmp_path):
    trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(), args=config(tmp_path, teacher_layers=[0, 3]),
                                          processing_class=imagenet_processor())
    assert trainer.teacher_inputs is None and trainer.teacher_label_order is None
    received = record_teacher_inputs(trainer.teacher)
    batch = torch.randn(2, 3, 32, 32)
    trainer.compute_loss(trainer.model.train(), {"pixel_values": batch, "labels": torch.tensor([0, 1])})
    assert received[0] is batch  # the very tensor: no copy, no arithmetic


def test_logit_only_teacher_at_another_resolution_gets_a_resized_batch(tmp_path):
    big = tiny_vit(num_labels=5, seed=2)
    big = type(big)(ViTConfig(**{**big.config.to_dict(), "image_size": 48}))  # 6×6 tokens instead of 4×4
    trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=big, processing_class=imagenet_processor(),
                                          args=config(tmp_path, beta=0.0, student_layers=None, teacher_layers=None))
    received = record_teacher_inputs(trainer.teacher)
    batch = torch.randn(2, 3, 32, 32)
    trainer.compute_loss(trainer.model.train(), {"pixel_values": batch, "labels": torch.tensor([0, 1])})
    expected = F.interpolate(batch, size=(48, 48), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(received[0], expected)
    with pytest.raises(ConfigurationError, match=r"student layer 0 is 4×4 but teacher layer 0 is 6×6, student layer 2 is 4×4 "
                                                 r"but teacher layer 2 is 6×6 \(token grid H×W, inputs 32×32 and 48×48\)"):
        SpectralDistillationTrainer(model=tiny_vit(), teacher_model=big, args=config(tmp_path, grid_alignment="error"))


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_tower_teacher_gets_batches_at_the_size_its_vision_config_states(tmp_path, family):
    """CLIP-like classifiers state their input size in ``config.vision_config`` only; their position embeddings fix it."""
    teacher, side = tiny_classifier(family, num_labels=5, image_size=48)  # 6×6 tokens against the student's 4×4
    trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=teacher, processing_class=imagenet_processor(),
                                          args=config(tmp_path, teacher_layers=[0, 1], student_layers=[0, 2]))
    assert [p.teacher_shape[1:] for p in trainer.layer_map] == [(6, 6), (6, 6)]
    received = record_teacher_inputs(trainer.teacher)
    batch = torch.randn(2, 3, 32, 32)
    trainer.compute_loss(trainer.model.train(), {"pixel_values": batch, "labels": torch.tensor([0, 1])})
    expected = F.interpolate(batch, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(received[0], expected)
    assert torch.isfinite(trainer._loss_sums["train"]).all() and trainer._loss_sums["train"][2] > 0  # the feature loss


# ------------------------------------------------------------------------------------------------
# Labels by name
# ------------------------------------------------------------------------------------------------
def permuted_copy(teacher, permutation: list[int]):
    """The same network with its output classes (rows of the head and names) in another order."""
    other = copy.deepcopy(teacher)
    head = other.classifier
    with torch.no_grad():
        head.weight.copy_(teacher.classifier.weight[permutation])
        head.bias.copy_(teacher.classifier.bias[permutation])
    names = [teacher.config.id2label[i] for i in permutation]
    return with_labels(other, names)


def test_teacher_with_permuted_label_order_gives_the_same_kd_loss(tmp_path):
    names = ["cat", "dog", "fox", "owl", "yak"]
    teacher = with_labels(tiny_vit(num_labels=5, seed=4), names)
    permuted = permuted_copy(teacher, [3, 0, 4, 1, 2])
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    losses = []
    for candidate in (teacher, permuted):
        trainer = SpectralDistillationTrainer(model=with_labels(tiny_vit(num_labels=5), names), teacher_model=candidate,
                                              args=config(tmp_path, beta=0.0, student_layers=None, teacher_layers=None))
        trainer.compute_loss(trainer.model.train(), batch)
        losses.append(trainer._loss_sums["train"])
    assert trainer.teacher_label_order.tolist() == [1, 3, 4, 0, 2]
    assert losses[1][1].item() > 0
    torch.testing.assert_close(losses[1], losses[0])  # ce, kd, feature: identical
    trainer.teacher_label_order, trainer._loss_sums["train"] = None, None  # without the remap the targets differ
    trainer.compute_loss(trainer.model.train(), batch)
    assert abs(trainer._loss_sums["train"][1].item() - losses[0][1].item()) > 1e-3


def test_disjoint_label_sets_are_rejected_unless_only_features_are_distilled(tmp_path):
    student = with_labels(tiny_vit(num_labels=3), ["a", "b", "c"])
    teacher = with_labels(tiny_cait(num_labels=3), ["x", "y", "z"])
    with pytest.raises(ConfigurationError, match=r"teacher and student have different label sets: the teacher has no class"):
        SpectralDistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path, teacher_layers=[0, 3]))
    features_only = config(tmp_path, teacher_layers=[0, 3], distillation_type="none")
    assert SpectralDistillationTrainer(model=student, teacher_model=teacher, args=features_only).layer_map


def test_default_names_fall_back_to_the_class_count_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_spectralkd.teacher"):
        trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(), args=config(tmp_path, teacher_layers=[0, 3]))
    assert trainer.teacher_label_order is None
    assert "only default class names" in caplog.text
    with pytest.raises(ConfigurationError, match="different numbers of classes: teacher 7, student 5"):
        SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(num_labels=7), args=config(tmp_path, teacher_layers=[0, 3]))


def test_imagenet_synset_ids_and_descriptions_name_the_same_classes(tmp_path):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    synsets = [info.index_to_label_name(i) for i in range(1000)]
    descriptions = [info.index_to_description(i) for i in range(1000)]
    student = with_labels(tiny_vit(num_labels=1000, hidden=16, layers=1), synsets)  # an imagefolder of n0…/ folders
    teacher = with_labels(tiny_vit(num_labels=1000, hidden=16, layers=1, seed=1), descriptions)  # a transformers checkpoint
    trainer = SpectralDistillationTrainer(model=student, teacher_model=teacher,
                                          args=config(tmp_path, beta=0.0, student_layers=None, teacher_layers=None))
    assert trainer.teacher_label_order is None


# ------------------------------------------------------------------------------------------------
# The teacher check before training
# ------------------------------------------------------------------------------------------------
class StripeTeacher(torch.nn.Module):
    """A perfect teacher of SyntheticImageDataset when fed ImageNet-normalised images: class k is the bright
    band of rows 6k…6k+5. It reads pixels back with ImageNet statistics, whatever it is told it expects."""

    def __init__(self, num_labels: int = 5, order=None):
        super().__init__()
        self.config = ViTConfig(image_size=32, patch_size=8, num_labels=num_labels)  # default names "LABEL_k"
        self.order = list(order or range(num_labels))
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, **_):
        from transformers.modeling_outputs import ImageClassifierOutput

        pixels = pixel_values * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        bright = (pixels.mean(dim=(1, 3)) > 0.75).float()  # B×32 rows
        logits = torch.stack([bright[:, 6 * k : 6 * k + 6].mean(-1) for k in range(self.config.num_labels)], dim=-1)
        return ImageClassifierOutput(logits=10 * logits[:, self.order] + 0 * self.dummy)


def checked_trainer(tmp_path, teacher, **overrides):
    args = config(tmp_path, beta=0.0, student_layers=None, teacher_layers=None, teacher_check_images=32, max_steps=1, **overrides)
    return SpectralDistillationTrainer(model=tiny_vit(), teacher_model=teacher, args=args, processing_class=imagenet_processor(),
                                       train_dataset=SyntheticImageDataset(16), eval_dataset=SyntheticImageDataset(40, seed=1))


def test_teacher_check_passes_a_good_teacher_and_records_its_accuracy(tmp_path):
    trainer = checked_trainer(tmp_path, StripeTeacher())
    trainer.train()
    assert trainer.summary.teacher_check_accuracy == 1.0 and trainer.state.global_step == 1


def test_teacher_with_wrong_normalisation_and_label_order_is_stopped_before_step_1(tmp_path):
    # It declares mean = std = 0.5 (it really reads ImageNet statistics) and its classes are rotated, with
    # default names that cannot reveal it: either fault alone already costs a whole run.
    trainer = checked_trainer(tmp_path, StripeTeacher(order=[1, 2, 3, 4, 0]), teacher_image_mean=[0.5] * 3,
                              teacher_image_std=[0.5] * 3)
    with pytest.raises(TeacherCheckError, match=r"the teacher scores \d+\.\d % top-1 on 32 evaluation images of 5 classes, "
                                                r"below 40\.0 % \(twice chance\).*normalisation.*label order.*checkpoint"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list((tmp_path / "run").glob("checkpoint-*"))
    for fault in ({"order": [1, 2, 3, 4, 0]}, {}):  # each fault alone is caught too
        kwargs = {} if fault else {"teacher_image_mean": [0.5] * 3, "teacher_image_std": [0.5] * 3}
        with pytest.raises(TeacherCheckError):
            checked_trainer(tmp_path, StripeTeacher(**fault), **kwargs).train()


def test_teacher_with_another_crop_and_filter_is_named_with_both_specs_in_the_check(tmp_path, caplog):
    # A ConvNeXt-style teacher: evaluated at crop 0.95 with bilinear resizing; the student's batches are cropped at
    # 0.875 with bicubic resizing. Same normalisation and size: nothing the adapter can change on the device.
    teacher_dir = tmp_path / "convnext_style"
    tiny_vit(num_labels=5, seed=5).save_pretrained(teacher_dir)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.95, resample=Image.Resampling.BILINEAR,
                           image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(teacher_dir)
    args = config(tmp_path, beta=0.0, student_layers=None, teacher_layers=None, teacher_check_images=32, max_steps=1)
    with caplog.at_level(logging.INFO, logger="hf_spectralkd.preprocessing"):
        trainer = SpectralDistillationTrainer(
            model=tiny_vit(), teacher_model=str(teacher_dir), args=args, train_dataset=SyntheticImageDataset(16),
            eval_dataset=SyntheticImageDataset(40, seed=1), processing_class=build_image_processor(DataArguments(), 32))
    both = "crop_pct 0.875 (student) vs 0.95 (teacher), interpolation bicubic (student) vs bilinear (teacher)"
    assert both in caplog.text and "teacher inputs: none" not in caplog.text
    assert "student: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), 32×32, crop_pct 0.875, bicubic" in caplog.text
    assert "teacher: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), 32×32, crop_pct 0.95, bilinear" in caplog.text
    received = record_teacher_inputs(trainer.teacher)
    batch = torch.randn(2, 3, 32, 32)
    trainer.compute_loss(trainer.model.train(), {"pixel_values": batch, "labels": torch.tensor([0, 1])})
    assert received[0] is batch  # nothing is computed on the batch
    with pytest.raises(TeacherCheckError, match=re.escape(f"input adaptation: not adapted: {both}")):
        trainer.train()  # a random teacher: near chance, and the message names the preprocessing it could not adapt


class ConstantTeacher(torch.nn.Module):
    """Always answers class 0, whatever it sees."""

    def __init__(self, num_labels: int = 3):
        super().__init__()
        self.config = ViTConfig(image_size=32, patch_size=8, num_labels=num_labels)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, **_):
        from transformers.modeling_outputs import ImageClassifierOutput

        logits = torch.zeros(len(pixel_values), self.config.num_labels)
        logits[:, 0] = 1.0
        return ImageClassifierOutput(logits=logits + 0 * self.dummy)


def test_a_constant_teacher_fails_the_check_on_a_class_sorted_imagefolder(tmp_path, caplog):
    # An imagefolder lists its images class by class: its first 20 evaluation images are all of class 'a'.
    folder = make_imagefolder(tmp_path / "data", per_class=2, eval_per_class=24)
    data = load_image_datasets(DataArguments(dataset=folder, auto_augment="none", reprob=0.0), 32)
    assert {data.eval[i]["labels"] for i in range(20)} == {0}
    args = config(tmp_path, beta=0.0, student_layers=None, teacher_layers=None, teacher_check_images=20, max_steps=1)
    trainer = SpectralDistillationTrainer(model=tiny_vit(num_labels=3), teacher_model=ConstantTeacher(), args=args,
                                          train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
                                          processing_class=data.image_processor)
    with caplog.at_level(logging.INFO, logger="hf_spectralkd.teacher"), pytest.raises(
            TeacherCheckError, match=r"scores 3\d\.\d % top-1 on 20 evaluation images of 3 classes, below 66\.7 %"):
        trainer.train()
    assert "teacher check: 3" in caplog.text and "on 20 evaluation images of 3 classes" in caplog.text
    assert trainer.state.global_step == 0


def test_check_sample_is_seeded_and_stratified_by_class():
    from hf_spectralkd.teacher import check_sample

    labels = [0] * 30 + [1] * 5 + [2] * 50 + [3] * 2  # sorted by class, unbalanced
    sample = check_sample(labels, 12, seed=7)
    assert sample == check_sample(labels, 12, seed=7) and sample != check_sample(labels, 12, seed=8)
    assert len(set(sample)) == 12
    counts = np.bincount([labels[i] for i in sample], minlength=4)
    assert counts[3] == 2 and counts.sum() == 12  # class 3 has only 2 images: the others share the rest evenly
    assert max(counts[:3]) - min(counts[:3]) <= 1
    assert sorted(check_sample(labels, 1000, seed=0)) == list(range(len(labels)))  # never more than there are
    assert len({labels[i] for i in check_sample(labels, 3, seed=0)}) == 3  # as many classes as the count allows


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------
def fake_hub_cache(root, repo: str, revisions: dict) -> str:
    """A huggingface_hub cache holding ``repo`` at several revisions (branch → (sha, model)), as downloads leave it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    for branch, (sha, model) in revisions.items():
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / branch).write_text(sha)
        model.save_pretrained(folder / "snapshots" / sha)
    return str(root)


def test_requested_teacher_revision_is_resolved_and_recorded_offline(tmp_path):
    from hf_spectralkd.io.model_loading import load_model

    main_sha, tagged_sha = "a" * 40, "b" * 40
    cache = fake_hub_cache(tmp_path / "cache", "someone/tiny-teacher",
                           {"main": (main_sha, tiny_vit(seed=1)), "v1": (tagged_sha, tiny_vit(seed=2))})
    loaded = load_model("someone/tiny-teacher", argument="teacher", revision="v1", cache_dir=cache)
    assert loaded.revision == tagged_sha  # the requested tag's commit, not main's
    expected = tiny_vit(seed=2).state_dict()
    torch.testing.assert_close(loaded.model.state_dict()["classifier.weight"], expected["classifier.weight"])
    assert load_model("someone/tiny-teacher", argument="teacher", cache_dir=cache).revision == main_sha


def test_scale_lr_follows_the_global_batch_and_survives_replace(tmp_path):
    import dataclasses

    args = config(tmp_path, learning_rate=5e-4, scale_lr=True, per_device_train_batch_size=64, gradient_accumulation_steps=2)
    assert args.global_batch_size == 128 and args.learning_rate == pytest.approx(5e-4 * 128 / 512)
    assert args.base_learning_rate == 5e-4
    again = dataclasses.replace(args, output_dir=str(tmp_path / "other"))  # __post_init__ runs again
    assert again.learning_rate == pytest.approx(5e-4 * 128 / 512)
    assert config(tmp_path, learning_rate=5e-4).learning_rate == 5e-4  # off by default


def test_label_smoothing_is_one_option_with_an_alias(tmp_path):
    assert config(tmp_path).label_smoothing_factor == 0.1
    assert config(tmp_path, label_smoothing=0.2).label_smoothing_factor == 0.2
    assert config(tmp_path, label_smoothing_factor=0.3).label_smoothing_factor == 0.3
    with pytest.raises(ConfigurationError, match="label_smoothing: 0.2 contradicts label_smoothing_factor 0.3"):
        config(tmp_path, label_smoothing=0.2, label_smoothing_factor=0.3)
