"""Feature pairs on different token grids: the spectral crop against a naive float64 reference written here."""

from __future__ import annotations

import importlib.util
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SyntheticImageDataset, timm_regnety, tiny_vit

from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer
from hf_spectralkd.layer_map import format_layer_map
from hf_spectralkd.losses import distillation_objective, mse_alignment_loss, spectral_alignment_loss


# ----------------------------------------------------------------------------------------------
# Naive reference: explicit DFT matrices from cos/sin, explicit crop (with the Nyquist fold), explicit scale
# and MSE, all in float64.
# ----------------------------------------------------------------------------------------------
def dft_matrices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of the ortho DFT matrix, ``X[k] = n^{-1/2} Σ_j x[j] e^{-2πikj/n}``."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    j = torch.arange(n, dtype=torch.float64).view(1, -1)
    angle = 2 * math.pi * k * j / n
    return torch.cos(angle) / math.sqrt(n), -torch.sin(angle) / math.sqrt(n)


def crop_matrix(small: int, large: int) -> torch.Tensor:
    """``small×large`` 0/1 matrix picking, for each frequency bin of the small axis, the bin(s) of the large one.

    Bin ``k < small/2`` is frequency ``k``, bin ``k > small/2`` is ``k - small``; for an even ``small`` its
    Nyquist bin ``small/2`` takes both ``+small/2`` and ``-small/2`` of the large axis (folded).
    """
    crop = torch.zeros(small, large, dtype=torch.float64)
    for k in range(small):
        if small % 2 == 0 and k == small // 2 and small < large:
            crop[k, small // 2] = crop[k, large - small // 2] = 1.0
        else:
            frequency = k if k <= small // 2 else k - small
            crop[k, frequency % large] = 1.0
    return crop


def spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full ortho 2-D spectrum (real, imaginary) of ``...×H×W`` by matrix products."""
    (ch, sh), (cw, sw) = dft_matrices(x.shape[-2]), dft_matrices(x.shape[-1])
    real = ch @ x @ cw.T - sh @ x @ sw.T
    imag = ch @ x @ sw.T + sh @ x @ cw.T
    return real, imag


def cropped_spectrum(x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    real, imag = spectrum(x)
    (height, width), (h, w) = x.shape[-2:], grid
    ph, pw = crop_matrix(h, height), crop_matrix(w, width)
    scale = math.sqrt(h * w / (height * width))
    return scale * (ph @ real @ pw.T), scale * (ph @ imag @ pw.T)


def naive_pool(x: torch.Tensor, channels: int) -> torch.Tensor:
    big = x.shape[1]
    windows = [x[:, (i * big) // channels: -((-(i + 1) * big) // channels)].mean(dim=1) for i in range(channels)]
    return torch.stack(windows, dim=1)


def naive_cross_grid_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Pool channels, crop both spectra to the per-axis smaller grid, MSE over the stacked half spectrum."""
    channels = min(student.shape[1], teacher.shape[1])
    s, t = naive_pool(student.double(), channels), naive_pool(teacher.double(), channels)
    grid = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    (sr, si), (tr, ti) = cropped_spectrum(s, grid), cropped_spectrum(t, grid)
    half = grid[1] // 2 + 1  # rfft2 keeps these columns
    stacked = torch.stack([sr - tr, si - ti], dim=-1)[..., :half, :]
    return stacked.pow(2).mean()


# (student H×W, teacher H×W): both directions, odd/even, non-square, one larger per axis each
GRID_PAIRS = [((14, 14), (16, 16)), ((16, 16), (14, 14)), ((7, 7), (14, 14)), ((14, 14), (37, 37)),
              ((37, 14), (14, 14)), ((6, 9), (8, 12)), ((14, 16), (16, 14)), ((5, 8), (9, 8))]


@pytest.mark.parametrize("student_grid, teacher_grid", GRID_PAIRS)
def test_cross_grid_loss_and_gradients_match_the_naive_crop(student_grid, teacher_grid):
    torch.manual_seed(sum(student_grid + teacher_grid))
    student = torch.randn(2, 6, *student_grid, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 10, *teacher_grid, dtype=torch.float64, requires_grad=True)
    expected = naive_cross_grid_loss(student, teacher)
    expected_grads = torch.autograd.grad(expected, (student, teacher))
    for implementation in ("closed_form", "rfft2"):
        value = spectral_alignment_loss([student], [teacher], implementation=implementation)
        grads = torch.autograd.grad(value, (student, teacher))
        assert abs(value.item() - expected.item()) <= 1e-6 * expected.item(), implementation
        for grad, reference in zip(grads, expected_grads):
            assert (grad.double() - reference).norm() <= 1e-6 * reference.norm(), implementation


def test_crop_is_the_spectrum_of_the_fourier_resampled_map():
    """A map band-limited to the smaller grid's band, sampled on that grid, has the scaled, folded crop as spectrum."""
    torch.manual_seed(0)
    for (big_h, big_w), (h, w) in (((16, 12), (8, 6)), ((14, 15), (7, 5)), ((12, 9), (6, 9))):
        # A real band-limited signal: cosines of every frequency |k| ≤ h/2, |l| ≤ w/2 (the Nyquist ones included),
        # evaluated at any point (u, v) of the unit square by its own formula.
        terms = [(k, l, torch.randn(()).item(), torch.rand(()).item() * 2 * math.pi)
                 for k in range(-(h // 2), h // 2 + 1) for l in range(0, w // 2 + 1)]

        def sampled(height: int, width: int, terms=terms) -> torch.Tensor:
            u = torch.arange(height, dtype=torch.float64).view(-1, 1) / height
            v = torch.arange(width, dtype=torch.float64).view(1, -1) / width
            return sum(a * torch.cos(2 * math.pi * (k * u + l * v) + phase) for k, l, a, phase in terms)

        big, small = sampled(big_h, big_w), sampled(h, w)
        crop_real, crop_imag = cropped_spectrum(big, (h, w))
        real, imag = spectrum(small)
        torch.testing.assert_close(crop_real, real, rtol=0, atol=1e-9)
        torch.testing.assert_close(crop_imag, imag, rtol=0, atol=1e-9)
        # …so the loss between the samples on the two grids vanishes (both directions).
        big_map, small_map = big.view(1, 1, big_h, big_w), small.view(1, 1, h, w)
        assert spectral_alignment_loss([small_map], [big_map]).item() < 1e-12
        assert spectral_alignment_loss([big_map], [small_map]).item() < 1e-12
        assert mse_alignment_loss([small_map], [big_map]).item() < 1e-12


#: The last commit before maps on different grids were accepted: its loss is the equal-grid reference.
BEFORE_CROSS_GRID = "efce76d7"


def _losses_before_cross_grid(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(["git", "show", f"{BEFORE_CROSS_GRID}:hf_spectralkd/losses.py"], cwd=repo,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history (commit {BEFORE_CROSS_GRID}) to load the previous loss")
    (tmp_path / "losses_before.py").write_text(source)
    spec = importlib.util.spec_from_file_location("losses_before", tmp_path / "losses_before.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equal_grids_take_the_unchanged_path_bit_for_bit(tmp_path):
    torch.manual_seed(1)
    student = [torch.randn(2, 8, 14, 14, requires_grad=True), torch.randn(2, 8, 7, 6, requires_grad=True)]
    teacher = [torch.randn(2, 16, 14, 14), torch.randn(2, 12, 7, 6)]
    reference = _losses_before_cross_grid(tmp_path).spectral_alignment_loss(student, teacher)
    reference_grads = torch.autograd.grad(reference, student)
    for alignment in ("spectral", "interpolate", "error"):
        value = spectral_alignment_loss(student, teacher, grid_alignment=alignment)
        assert torch.equal(value, reference)
        assert all(torch.equal(g, r) for g, r in zip(torch.autograd.grad(value, student), reference_grads))
    assert torch.equal(spectral_alignment_loss(student, teacher), reference)  # the default is one of them


def test_interpolate_area_averages_the_larger_map_and_error_refuses():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 4, 7, 14), torch.randn(2, 8, 14, 7)
    pooled = naive_pool(teacher.double(), 4).float()
    # Hand-written box averages: H 14 → 7 pairs rows of the teacher, W 14 → 7 pairs columns of the student.
    t_small = 0.5 * (pooled[:, :, 0::2] + pooled[:, :, 1::2])
    s_small = 0.5 * (student[..., 0::2] + student[..., 1::2])
    expected = torch.view_as_real(torch.fft.rfft2((s_small - t_small).double(), norm="ortho")).pow(2).mean()
    value = spectral_alignment_loss([student], [teacher], grid_alignment="interpolate")
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert mse_alignment_loss([student], [teacher], "interpolate").item() == pytest.approx(
        F.mse_loss(s_small, t_small).item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"feature pair 0: student map is \(7, 14\).*teacher map is \(14, 7\).*'error'"):
        spectral_alignment_loss([student], [teacher], grid_alignment="error")
    with pytest.raises(ValueError, match="grid_alignment must be"):
        spectral_alignment_loss([student], [teacher], grid_alignment="nearest")
    objective = distillation_objective(torch.zeros(2, 3), torch.tensor([0, 1]), None, [student], [teacher],
                                       distillation_type="none", grid_alignment="interpolate")
    assert objective.feature.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Runs: --layer_map auto across families and input sizes
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_auto_layer_map_trains_across_families_and_resolutions(tmp_path, caplog):
    """A timm RegNetY (CNN) teacher at twice the student's resolution, and a ViT teacher at twice it: 3 steps each."""
    from transformers import ViTConfig, ViTForImageClassification

    vit_64px = ViTForImageClassification(ViTConfig(**{**tiny_vit(seed=1).config.to_dict(), "image_size": 64}))  # 8×8
    for name, teacher in (("regnety_64px", timm_regnety(image_size=64)), ("vit_64px", vit_64px)):
        args = SpectralDistillationConfig(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4, logging_steps=1, report_to=[],
            use_cpu=True, disable_tqdm=True, save_strategy="no", eval_strategy="no", layer_map="auto",
            teacher_check_images=0, dataloader_num_workers=0, seed=0,
        )
        with caplog.at_level("INFO", logger="hf_spectralkd.layer_map"):
            trainer = SpectralDistillationTrainer(model=tiny_vit(layers=2), teacher_model=teacher, args=args,
                                                  train_dataset=SyntheticImageDataset(12))
        pairs = trainer.layer_map
        assert pairs and all(p.student_shape[1:] == (4, 4) for p in pairs), name
        assert any(p.teacher_shape[1:] != (4, 4) for p in pairs), name  # on the teacher's own, larger grid
        printed = format_layer_map(pairs)
        assert printed in caplog.text, name
        p = next(p for p in pairs if not p.same_grid)
        assert f"student {p.student:>2} (4×4, 32 ch) ← teacher {p.teacher:>2} ({p.teacher_shape[1]}×{p.teacher_shape[2]}, " \
               f"{p.teacher_shape[0]} ch)" in printed, printed
        trainer.train()
        logged = [entry["loss_fft"] for entry in trainer.state.log_history if "loss_fft" in entry]
        assert trainer.state.global_step == 3 and len(logged) == 3, name
        assert all(math.isfinite(v) and v > 0 for v in logged), (name, logged)
