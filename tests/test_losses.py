"""Loss numerics against naive references written here, independently of hf_spectralkd.losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_spectralkd import distillation_loss, spectral_alignment_loss
from hf_spectralkd.losses import (
    align_channels,
    classification_loss,
    distillation_objective,
    hard_kd_loss,
    mse_alignment_loss,
    pool_channels,
    soft_kd_loss,
)


# ----------------------------------------------------------------------------------------------
# Naive references: explicit loops, explicit pooling windows, numpy FFT in float64.
# ----------------------------------------------------------------------------------------------
def naive_pool(x: np.ndarray, channels: int) -> np.ndarray:
    """Adaptive average pool along axis 1 with PyTorch's window rule, one window at a time."""
    big = x.shape[1]
    out = np.empty((x.shape[0], channels) + x.shape[2:], dtype=np.float64)
    for i in range(channels):
        start = (i * big) // channels
        end = -((-(i + 1) * big) // channels)  # ceil((i+1)·big/channels)
        out[:, i] = x[:, start:end].mean(axis=1)
    return out


def naive_spectral_loss(student_maps, teacher_maps) -> float:
    total = 0.0
    for s, t in zip(student_maps, teacher_maps):
        s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
        width = min(s.shape[1], t.shape[1])
        s, t = naive_pool(s, width), naive_pool(t, width)
        fs = np.fft.rfft2(s, axes=(2, 3), norm="ortho")
        ft = np.fft.rfft2(t, axes=(2, 3), norm="ortho")
        stacked_s = np.stack([fs.real, fs.imag], axis=-1)
        stacked_t = np.stack([ft.real, ft.imag], axis=-1)
        total += np.mean((stacked_s - stacked_t) ** 2)
    return total / len(student_maps)


def torch_naive_spectral_loss(student_maps, teacher_maps) -> torch.Tensor:
    """Differentiable naive reference (float64, two FFTs, explicit window loop) for gradients."""
    losses = []
    for s, t in zip(student_maps, teacher_maps):
        width = min(s.shape[1], t.shape[1])

        def pool(x, width=width):
            big = x.shape[1]
            return torch.stack(
                [x[:, (i * big) // width : -((-(i + 1) * big) // width)].mean(1) for i in range(width)], dim=1
            )

        fs = torch.view_as_real(torch.fft.rfft2(pool(s.double()), norm="ortho"))
        ft = torch.view_as_real(torch.fft.rfft2(pool(t.double()), norm="ortho"))
        losses.append(((fs - ft) ** 2).mean())
    return torch.stack(losses).mean()


def naive_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def naive_distillation(student, teacher, labels, alpha, temperature, kind, smoothing) -> float:
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    batch, classes = student.shape
    log_p = naive_log_softmax(student)
    ce = 0.0
    for b in range(batch):
        nll = -log_p[b, labels[b]]
        uniform = -log_p[b].mean()
        ce += (1 - smoothing) * nll + smoothing * uniform
    ce /= batch
    if kind == "soft":
        log_ps, log_pt = naive_log_softmax(student / temperature), naive_log_softmax(teacher / temperature)
        kl = sum(np.exp(log_pt[b, k]) * (log_pt[b, k] - log_ps[b, k]) for b in range(batch) for k in range(classes))
        kd = temperature**2 * kl / batch
    else:
        kd = -np.mean([log_p[b, teacher[b].argmax()] for b in range(batch)])
    return (1 - alpha) * ce + alpha * kd


def random_maps(seed, pairs):
    generator = torch.Generator().manual_seed(seed)
    student, teacher = [], []
    for (cs, ct, h, w) in pairs:
        student.append(torch.randn(3, cs, h, w, generator=generator))
        teacher.append(torch.randn(3, ct, h, w, generator=generator) * 1.5 + 0.2)
    return student, teacher


PAIR_CASES = {
    "wider_teacher_divisible": [(8, 16, 4, 4), (8, 16, 4, 4)],
    "wider_teacher_uneven": [(6, 10, 5, 6), (7, 19, 3, 3)],
    "wider_student": [(12, 4, 4, 5), (9, 9, 4, 4)],
    "odd_and_even_widths_mixed_shapes": [(4, 8, 7, 7), (4, 8, 14, 14), (16, 8, 2, 8)],
    "wide_window": [(2, 40, 4, 4)],
}


@pytest.mark.parametrize("case", sorted(PAIR_CASES))
@pytest.mark.parametrize("implementation", ["closed_form", "rfft2"])
def test_spectral_loss_matches_naive_reference(case, implementation):
    student, teacher = random_maps(1, PAIR_CASES[case])
    got = spectral_alignment_loss(student, teacher, implementation=implementation)
    expected = naive_spectral_loss([s.numpy() for s in student], [t.numpy() for t in teacher])
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("case", ["wider_teacher_uneven", "wider_student", "odd_and_even_widths_mixed_shapes"])
def test_spectral_loss_gradients_match_reference(case):
    student, teacher = random_maps(2, PAIR_CASES[case])
    student_fast = [s.clone().requires_grad_(True) for s in student]
    student_ref = [s.clone().double().requires_grad_(True) for s in student]
    spectral_alignment_loss(student_fast, teacher).backward()
    torch_naive_spectral_loss(student_ref, teacher).backward()
    for fast, ref in zip(student_fast, student_ref):
        assert fast.grad is not None
        np.testing.assert_allclose(fast.grad.double().numpy(), ref.grad.numpy(), rtol=1e-4, atol=1e-8)


def test_spectral_loss_zero_for_identical_maps_and_only_student_gets_gradients():
    maps, _ = random_maps(3, [(8, 8, 4, 4)])
    student = [maps[0].clone().requires_grad_(True)]
    loss = spectral_alignment_loss(student, [maps[0].clone()])
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert torch.count_nonzero(student[0].grad) == 0


def test_spectral_loss_accepts_bf16_and_noncontiguous_inputs():
    student, teacher = random_maps(4, [(8, 16, 4, 6)])
    expected = spectral_alignment_loss(student, teacher)
    # channels-last memory seen as NCHW, the way token-derived feature maps arrive
    nhwc = [t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for t in teacher]
    assert spectral_alignment_loss(student, nhwc).item() == pytest.approx(expected.item(), rel=1e-6)
    bf16 = spectral_alignment_loss([s.bfloat16() for s in student], [t.bfloat16() for t in teacher])
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(expected.item(), rel=2e-2)


def test_spectral_loss_spatial_mismatch_names_pair_and_sizes():
    student = [torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 7, 7)]
    teacher = [torch.zeros(2, 16, 4, 4), torch.zeros(2, 16, 14, 14)]
    with pytest.raises(ValueError, match=r"feature pair 1: student map is \(7, 7\).*teacher map is \(14, 14\)"):
        spectral_alignment_loss(student, teacher, grid_alignment="error")
    with pytest.raises(ValueError, match=r"feature pair 0: student map is \(4, 4\) \(H×W\) with batch 2 but teacher map is "
                                         r"\(4, 4\) with batch 3"):
        spectral_alignment_loss(student[:1], [torch.zeros(3, 16, 4, 4)])


def test_spectral_loss_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="2 student and 1 teacher"):
        spectral_alignment_loss([torch.zeros(1, 2, 2, 2)] * 2, [torch.zeros(1, 2, 2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        spectral_alignment_loss([], [])


def test_pool_channels_matches_naive_windows_and_pairs_384_to_192():
    x = torch.randn(2, 10, 3, 3)
    for width in (10, 5, 3, 7, 1):
        np.testing.assert_allclose(pool_channels(x, width).numpy(), naive_pool(x.numpy(), width), rtol=1e-6, atol=1e-7)
    big = torch.randn(1, 384, 2, 2)
    pooled = pool_channels(big, 192)
    np.testing.assert_allclose(pooled[:, 5].numpy(), ((big[:, 10] + big[:, 11]) / 2).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="cannot pool 4 channels up to 8"):
        pool_channels(torch.zeros(1, 4, 2, 2), 8)


def test_align_channels_pools_the_wider_side():
    s, t = align_channels(torch.randn(1, 12, 2, 2), torch.randn(1, 4, 2, 2))
    assert s.shape == t.shape == (1, 4, 2, 2)
    s, t = align_channels(torch.randn(1, 4, 2, 2), torch.randn(1, 12, 2, 2))
    assert s.shape == t.shape == (1, 4, 2, 2)


def test_mse_alignment_loss_matches_naive():
    student, teacher = random_maps(5, PAIR_CASES["wider_teacher_uneven"])
    expected = np.mean([
        np.mean((naive_pool(s.numpy(), min(s.shape[1], t.shape[1])) - naive_pool(t.numpy(), min(s.shape[1], t.shape[1]))) ** 2)
        for s, t in zip(student, teacher)
    ])
    assert mse_alignment_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize("alpha,temperature,smoothing", [(0.9, 1.0, 0.1), (0.5, 4.0, 0.0), (0.0, 2.0, 0.2), (1.0, 1.0, 0.1)])
def test_distillation_loss_matches_naive(kind, alpha, temperature, smoothing):
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(6, 5, generator=generator) * 2
    teacher = torch.randn(6, 5, generator=generator) * 3
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    got = distillation_loss(student, teacher, labels, alpha=alpha, temperature=temperature, kind=kind, label_smoothing=smoothing)
    expected = naive_distillation(student.numpy(), teacher.numpy(), labels.numpy(), alpha, temperature, kind, smoothing)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_soft_labels_use_soft_target_cross_entropy_without_extra_smoothing():
    logits = torch.randn(4, 3)
    targets = torch.softmax(torch.randn(4, 3), dim=-1)
    expected = -(targets.numpy() * naive_log_softmax(logits.numpy())).sum(axis=1).mean()
    assert classification_loss(logits, targets, label_smoothing=0.1).item() == pytest.approx(expected, rel=1e-5)


def test_kd_terms_are_zero_when_student_equals_teacher_and_gradients_flow_to_student_only():
    logits = torch.randn(3, 4, requires_grad=True)
    teacher = logits.detach().clone()
    assert soft_kd_loss(logits, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    hard = hard_kd_loss(logits, teacher)
    assert hard.item() == pytest.approx(-naive_log_softmax(teacher.numpy())[np.arange(3), teacher.numpy().argmax(1)].mean(), rel=1e-5)
    distillation_loss(logits, teacher, torch.tensor([0, 1, 2])).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "distillation_type,alpha,feature_loss",
    [("soft", 0.9, "fft"), ("hard", 0.5, "fft"), ("soft", 0.0, "mse"), ("none", 0.9, "fft"), ("soft", 1.0, "mse")],
)
def test_objective_total_and_components_match_naive_references(distillation_type, alpha, feature_loss):
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(3, 6, generator=generator) * 2
    teacher = torch.randn(3, 6, generator=generator) * 3
    labels = torch.tensor([0, 5, 2])
    student_maps, teacher_maps = random_maps(4, PAIR_CASES["wider_teacher_uneven"])
    beta, temperature, smoothing = 0.3, 2.0, 0.1
    got = distillation_objective(
        student, labels, teacher, student_maps, teacher_maps, alpha=alpha, beta=beta, temperature=temperature,
        distillation_type=distillation_type, feature_loss=feature_loss, label_smoothing=smoothing,
    )
    s_np, t_np, y_np = student.numpy(), teacher.numpy(), labels.numpy()
    ce = naive_distillation(s_np, t_np, y_np, 0.0, temperature, "soft", smoothing)
    if feature_loss == "fft":
        feature = naive_spectral_loss([m.numpy() for m in student_maps], [m.numpy() for m in teacher_maps])
    else:
        feature = np.mean([
            np.mean((naive_pool(a.numpy(), min(a.shape[1], b.shape[1])) - naive_pool(b.numpy(), min(a.shape[1], b.shape[1]))) ** 2)
            for a, b in zip(student_maps, teacher_maps)
        ])
    if distillation_type == "none" or alpha == 0:
        kd, logit_part = 0.0, ce
    else:
        logit_part = naive_distillation(s_np, t_np, y_np, alpha, temperature, distillation_type, smoothing)
        kd = (logit_part - (1 - alpha) * ce) / alpha
    assert got.ce.item() == pytest.approx(ce, rel=1e-5)
    assert got.kd.item() == pytest.approx(kd, rel=1e-4, abs=1e-6)
    assert got.feature.item() == pytest.approx(feature, rel=1e-5)
    assert got.total.item() == pytest.approx(logit_part + beta * feature, rel=1e-5)


def test_objective_without_teacher_or_maps_is_the_cross_entropy_at_full_weight():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    got = distillation_objective(logits, labels, None, alpha=0.9, label_smoothing=0.0)
    expected = -naive_log_softmax(logits.numpy())[np.arange(4), labels.numpy()].mean()
    assert got.total.item() == pytest.approx(expected, rel=1e-5) and got.kd.item() == 0.0 and got.feature.item() == 0.0
    with pytest.raises(ValueError, match="2 student and 1 teacher feature maps"):
        distillation_objective(logits, labels, None, [torch.zeros(4, 2, 2, 2)] * 2, [torch.zeros(4, 2, 2, 2)])


def test_distillation_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'soft' or 'hard'"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), kind="medium")


def test_fft_scale_is_between_paper_bounds_of_spatial_mse():
    # The ortho rfft2 loss is a re-weighted spatial MSE: for 14×14 maps between 14/32 and 28/32 of it
    # (docs/method.md#spectral-alignment-loss).
    student, teacher = random_maps(8, [(16, 16, 14, 14)])
    ratio = spectral_alignment_loss(student, teacher).item() / mse_alignment_loss(student, teacher).item()
    assert 14 / 32 - 1e-6 <= ratio <= 28 / 32 + 1e-6
    assert not math.isclose(ratio, 1.0)
