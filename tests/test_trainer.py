"""SpectralDistillationTrainer on tiny models and a synthetic dataset (CPU, a few steps)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SyntheticImageDataset, tiny_cait, tiny_swin, tiny_vit
from transformers import AutoModelForImageClassification

from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer
from hf_spectralkd.training.optimizer import deit_lr_lambda


def make_config(tmp_path, **overrides) -> SpectralDistillationConfig:
    options = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=12,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=2e-3,
        logging_steps=4,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        student_layers=[0, 2],
        teacher_layers=[0, 3],
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return SpectralDistillationConfig(**options)


def test_training_logs_components_and_loss_decreases(tmp_path):
    args = make_config(tmp_path, max_steps=24, logging_steps=6)
    trainer = SpectralDistillationTrainer(
        model=tiny_vit(), teacher_model=tiny_cait(), args=args, train_dataset=SyntheticImageDataset(64),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        for key in ("loss_ce", "loss_kd", "loss_fft", "skipped_images"):
            assert key in entry
        combined = (1 - args.alpha) * entry["loss_ce"] + args.alpha * entry["loss_kd"] + args.beta * entry["loss_fft"]
        assert math.isfinite(entry["loss"])
        assert entry["loss"] == pytest.approx(combined, rel=1e-3)
        assert entry["loss_fft"] > 0 and entry["loss_kd"] >= 0
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_teacher_stays_frozen_and_in_eval_mode(tmp_path):
    teacher = tiny_cait()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = SpectralDistillationTrainer(
        model=tiny_vit(), teacher_model=teacher, args=make_config(tmp_path, max_steps=3), train_dataset=SyntheticImageDataset(24)
    )
    trainer.train()
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    for key, value in trainer.teacher.state_dict().items():
        torch.testing.assert_close(value, before[key])


def _one_step_params(tmp_path, name, batch, accumulation):
    args = make_config(
        tmp_path / name, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        optim="sgd", learning_rate=0.5, max_grad_norm=0.0, logging_steps=1, lr_scheduler_type="constant",
    )
    trainer = SpectralDistillationTrainer(
        model=tiny_vit(), teacher_model=tiny_cait(), args=args, train_dataset=SyntheticImageDataset(16)
    )
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}, loss


def test_gradient_accumulation_2x1_equals_1x2(tmp_path):
    # SGD (not Adam, which is invariant to a gradient scale error) and no clipping.
    big_batch, loss_big = _one_step_params(tmp_path, "big", batch=8, accumulation=1)
    accumulated, loss_acc = _one_step_params(tmp_path, "acc", batch=4, accumulation=2)
    initial = {k: v.detach() for k, v in tiny_vit().named_parameters()}
    moved = sum((big_batch[k] - initial[k]).abs().sum().item() for k in initial)
    assert moved > 1e-3  # the step really changed the weights
    for key in big_batch:
        torch.testing.assert_close(accumulated[key], big_batch[key], rtol=1e-4, atol=1e-6)
    assert loss_acc == pytest.approx(loss_big, rel=1e-4)


def test_unrequested_teacher_block_outputs_are_freed_before_the_student_runs(tmp_path):
    """An HF teacher returns every block output with output_hidden_states; only the tapped ones
    may stay alive (as the loss's targets) while the student's activations are being allocated."""
    import weakref

    teacher, student = tiny_vit(layers=4, seed=1), tiny_vit(layers=3)
    block_outputs = {}
    for index, block in enumerate(teacher.vit.layers):
        def remember(module, inputs, output, index=index):
            block_outputs[index] = weakref.ref(output[0] if isinstance(output, tuple) else output)
        block.register_forward_hook(remember)
    alive_when_student_starts = []
    student.register_forward_pre_hook(
        lambda module, args: alive_when_student_starts.append(sorted(i for i, ref in block_outputs.items() if ref() is not None))
    )
    trainer = SpectralDistillationTrainer(
        model=student, teacher_model=teacher, args=make_config(tmp_path, student_layers=[0, 2], teacher_layers=[1, 3]),
    )
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 1])}
    trainer.compute_loss(trainer.model.train(), batch).backward()
    assert alive_when_student_starts == [[1, 3]]


def test_saved_student_reloads_with_identical_logits(tmp_path, pixel_values):
    trainer = SpectralDistillationTrainer(
        model=tiny_vit(), teacher_model=tiny_cait(), args=make_config(tmp_path, max_steps=2), train_dataset=SyntheticImageDataset(16)
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    files = {p.name for p in (tmp_path / "student").iterdir()}
    assert "model.safetensors" in files and "README.md" in files
    assert not any("teacher" in name for name in files)
    reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "student")).eval()
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits, trainer.model(pixel_values=pixel_values).logits)


def test_evaluation_reports_top1_top5_and_component_losses(tmp_path):
    trainer = SpectralDistillationTrainer(
        model=tiny_vit(num_labels=6), teacher_model=tiny_cait(num_labels=6), args=make_config(tmp_path, max_steps=2),
        train_dataset=SyntheticImageDataset(16, num_labels=6), eval_dataset=SyntheticImageDataset(20, num_labels=6, seed=1),
    )
    metrics = trainer.evaluate()
    for key in ("eval_top1", "eval_top5", "eval_loss_ce", "eval_loss_kd", "eval_loss_fft"):
        assert key in metrics
    assert 0.0 <= metrics["eval_top1"] <= metrics["eval_top5"] <= 1.0
    # top-1 against a direct computation
    trainer.model.eval()
    data = SyntheticImageDataset(20, num_labels=6, seed=1)
    with torch.no_grad():
        predictions = trainer.model(pixel_values=data.images).logits.argmax(-1)
    assert metrics["eval_top1"] == pytest.approx((predictions == data.labels).float().mean().item())


def test_training_without_teacher(tmp_path):
    args = make_config(tmp_path, distillation_type="none", beta=0.0, student_layers=None, teacher_layers=None, max_steps=3, logging_steps=1)
    trainer = SpectralDistillationTrainer(model=tiny_vit(), args=args, train_dataset=SyntheticImageDataset(24))
    assert trainer.teacher is None
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["loss"] == pytest.approx(entry["loss_ce"], rel=1e-4) and entry["loss_kd"] == 0.0


def test_swin_student_from_swin_teacher_all_stages(tmp_path):
    args = make_config(tmp_path, student_layers=[0, 1, 2], teacher_layers=[0, 1, 2], beta=0.05, max_steps=2)
    trainer = SpectralDistillationTrainer(
        model=tiny_swin(embed_dim=8), teacher_model=tiny_swin(embed_dim=16, seed=1), args=args, train_dataset=SyntheticImageDataset(16)
    )
    assert [p.teacher_shape for p in trainer.layer_map] == [(16, 16, 16), (32, 8, 8), (64, 4, 4)]
    trainer.train()
    assert all(e["loss_fft"] > 0 for e in trainer.state.log_history if "loss_fft" in e)


# ------------------------------------------------------------------------------------------------
# Validation before training
# ------------------------------------------------------------------------------------------------
def test_layer_index_out_of_range(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_layers: index 9 is out of range.*4 blocks.*\[0, 3\]"):
        SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(), args=make_config(tmp_path, teacher_layers=[0, 9]))
    with pytest.raises(ValueError, match=r"student_layers: index 3 is out of range.*3 blocks"):
        SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(), args=make_config(tmp_path, student_layers=[0, 3]))


def test_layer_lists_of_different_length(tmp_path):
    with pytest.raises(ValueError, match=r"same length.*2 student layers \[0, 1\] and 3 teacher layers"):
        make_config(tmp_path, student_layers=[0, 1], teacher_layers=[0, 1, 2])


def test_spatial_size_mismatch(tmp_path):
    args = make_config(tmp_path, student_layers=[0], teacher_layers=[0], grid_alignment="error")
    with pytest.raises(ValueError, match=r"student layer 0 is 16×16 but teacher layer 0 is 4×4"):
        SpectralDistillationTrainer(model=tiny_swin(), teacher_model=tiny_cait(), args=args)


def test_unsupported_family(tmp_path):
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification

    student = MobileNetV1ForImageClassification(MobileNetV1Config(num_labels=5, image_size=32, depth_multiplier=0.25))
    with pytest.raises(ValueError, match="Unsupported model for spectral feature taps.*mobilenet_v1.*every convolution"):
        SpectralDistillationTrainer(model=student, teacher_model=tiny_cait(), args=make_config(tmp_path))


def test_class_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"different numbers of classes: teacher 7, student 5"):
        SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(num_labels=7), args=make_config(tmp_path))


def test_missing_teacher(tmp_path):
    with pytest.raises(ValueError, match="teacher_model is required"):
        SpectralDistillationTrainer(model=tiny_vit(), args=make_config(tmp_path))


def test_teacher_given_as_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_model: cannot load '.*nowhere'"):
        SpectralDistillationTrainer(model=tiny_vit(), teacher_model=str(tmp_path / "nowhere"), args=make_config(tmp_path))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("alpha", 1.5, r"alpha must be in \[0.0, 1.0\], got 1.5"),
        ("alpha", float("nan"), "alpha must be a finite number"),
        ("beta", -0.1, r"beta must be in \[0.0, inf\)"),
        ("temperature", 0.0, r"temperature must be in \(0.0, inf\)"),
        ("distillation_type", "medium", "distillation_type must be one of"),
        ("feature_loss", "dct", "feature_loss must be one of"),
        ("student_layers", ["x"], "student_layers: expected 0-based block indices"),
        ("teacher_layers", [-1, 2], "teacher_layers: block indices are 0-based and must be >= 0"),
    ],
)
def test_config_rejects_bad_hyperparameters(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, **{field: value})


def test_layer_lists_accept_comma_strings_and_auto(tmp_path):
    args = make_config(tmp_path, student_layers=["0,2"], teacher_layers="1 3")
    assert args.student_layers == [0, 2] and args.teacher_layers == [1, 3]
    auto = make_config(tmp_path, student_layers=None, teacher_layers=["auto"])  # the older spelling of layer_map="auto"
    assert auto.layer_map == "auto" and auto.teacher_layers is None and auto.uses_features


def test_auto_layer_map_from_teacher_profile(tmp_path):
    args = make_config(tmp_path, student_layers=None, teacher_layers=None, layer_map="auto", max_steps=1)
    trainer = SpectralDistillationTrainer(
        model=tiny_vit(), teacher_model=tiny_cait(), args=args, train_dataset=SyntheticImageDataset(16),
    )
    assert trainer.layer_map, "auto selection produced no pairs"
    assert args.student_layers is None and args.teacher_layers is None  # the arguments are not rewritten
    assert all(0 <= p.teacher < 4 and 0 <= p.student < 3 for p in trainer.layer_map)


# ------------------------------------------------------------------------------------------------
# Optimizer details (docs/method.md#training-recipe)
# ------------------------------------------------------------------------------------------------
def test_weight_decay_skips_vectors_embeddings_and_tokens(tmp_path):
    trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(), args=make_config(tmp_path))
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    names = dict(trainer.model.named_parameters())
    assert "vit.embeddings.cls_token" not in decay and "vit.embeddings.position_embeddings" not in decay
    assert all(names[n].ndim > 1 for n in decay)
    assert "vit.layers.0.attention.q_proj.weight" in decay and "classifier.weight" in decay


def test_deit_schedule_matches_formula(tmp_path):
    args = make_config(tmp_path, lr_schedule="deit", learning_rate=2e-3, warmup_steps=5, min_lr=1e-5, warmup_lr=1e-6)
    multiplier = deit_lr_lambda(args, 300)
    lr = lambda t: 2e-3 * multiplier(t)  # noqa: E731
    assert lr(0) == pytest.approx(1e-6)
    assert lr(2) == pytest.approx(1e-6 + 2 * (2e-3 - 1e-6) / 5)
    assert lr(6) == pytest.approx(1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * 6 / 300)))
    assert lr(300) == pytest.approx(1e-5)
    # The learning rates logged by the Distillation Dynamics runs, one step per epoch:
    assert lr(1) == pytest.approx(4.008e-4, rel=1e-4)  # epoch 2
    assert lr(5) == pytest.approx(1.99864e-3, rel=1e-5)  # epoch 6
    assert lr(298) == pytest.approx(1.0218e-5, rel=1e-4)  # epoch 299


def test_label_smoothing_factor_sets_the_cross_entropy(tmp_path):
    import torch.nn.functional as F

    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    for smoothing in (0.0, 0.3):
        trainer = SpectralDistillationTrainer(model=tiny_vit(), args=make_config(
            tmp_path, distillation_type="none", beta=0.0, student_layers=None, teacher_layers=None,
            label_smoothing_factor=smoothing))
        loss = trainer.compute_loss(trainer.model.eval(), batch)
        with torch.no_grad():
            expected = F.cross_entropy(trainer.model(pixel_values=batch["pixel_values"]).logits, batch["labels"],
                                       label_smoothing=smoothing)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# No host-device synchronisation per step
# ------------------------------------------------------------------------------------------------
def test_a_training_step_reads_no_tensor_value_on_the_host(tmp_path, monkeypatch):
    """On a GPU, .item()/bool()/.tolist() wait for every queued kernel: the step must not call them."""
    trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(), args=make_config(tmp_path))
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    trainer.compute_loss(trainer.model.train(), batch)  # first call builds lazily-created state
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])
    for _ in range(3):
        trainer.compute_loss(trainer.model.train(), batch).backward()
    monkeypatch.undo()
    assert reads == []


def test_deferred_nonfinite_check_gives_the_same_run_as_checking_every_step(tmp_path):
    histories = []
    for interval in (0, 1):
        args = make_config(tmp_path / str(interval), max_steps=6, logging_steps=3, nonfinite_check_interval=interval)
        trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=tiny_cait(), args=args,
                                              train_dataset=SyntheticImageDataset(24))
        trainer.train()
        histories.append([{k: v for k, v in e.items() if k.startswith("loss")} for e in trainer.state.log_history if "loss" in e])
        weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        histories[-1].append(weights)
    *logs_deferred, weights_deferred = histories[0]
    *logs_every, weights_every = histories[1]
    assert logs_deferred == logs_every and len(logs_deferred) == 2
    for key in weights_every:
        assert torch.equal(weights_deferred[key], weights_every[key])
