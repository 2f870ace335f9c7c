"""Spectral analysis numerics against naive numpy references, layer selection and follow-up measures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_spectralkd import ConfigurationError
from hf_spectralkd.analysis import (
    SpectralProfile,
    activation_gradient_magnitude,
    compare_profiles,
    entropy_profile,
    select_layers,
    spectral_energy_pattern,
    spectral_profile,
    svd_energy_ranks,
    svd_rank_summary,
    token_entropy,
)


def naive_profile(token_matrices: list[np.ndarray]) -> tuple[list[float], list[np.ndarray]]:
    """S and ℓ from per-layer (tokens × C) arrays, one explicit FFT per token position."""
    intensities, spectra = [], []
    for tokens in token_matrices:
        channels = tokens.shape[1]
        magnitudes = np.stack([np.abs(np.fft.fft(token.astype(np.float64))) / channels for token in tokens])
        spectrum = magnitudes.mean(axis=0)
        spectra.append(spectrum)
        intensities.append(float(spectrum.mean()))
    return intensities, spectra


def test_vit_profile_matches_numpy_reference(vit, pixel_values):
    profile = spectral_profile(vit, pixel_values)
    with torch.no_grad():
        hidden = vit.eval()(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    tokens = [h[:, 1:, :].reshape(-1, h.shape[-1]).numpy() for h in hidden[1:]]  # drop embeddings and CLS
    intensity, spectra = naive_profile(tokens)
    assert profile.layers == [0, 1, 2] and profile.num_images == 4 and profile.family == "vit"
    np.testing.assert_allclose(profile.intensity, intensity, rtol=1e-5)
    for got, expected in zip(profile.spectrum, spectra):
        assert len(got) == 32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


def test_swin_profile_is_stage_by_stage_and_matches_reference(swin, pixel_values):
    profile = spectral_profile(swin, pixel_values, layers=[2, 0])
    with torch.no_grad():
        maps = swin.eval()(pixel_values=pixel_values, output_hidden_states=True,
                           output_hidden_states_before_downsampling=True).reshaped_hidden_states
    tokens = [maps[s + 1].permute(0, 2, 3, 1).reshape(-1, maps[s + 1].shape[1]).numpy() for s in (0, 2)]
    intensity, spectra = naive_profile(tokens)
    assert profile.layers == [0, 2]
    assert [len(s) for s in profile.spectrum] == [8, 32]
    np.testing.assert_allclose(profile.intensity, intensity, rtol=1e-5)
    np.testing.assert_allclose(profile.spectrum[1], spectra[1], rtol=1e-5, atol=1e-9)


def test_profile_over_batches_equals_one_batch(cait, pixel_values):
    whole = spectral_profile(cait, pixel_values)
    in_chunks = spectral_profile(cait, pixel_values, batch_size=1)
    as_loader = spectral_profile(cait, [{"pixel_values": pixel_values[:3]}, {"pixel_values": pixel_values[3:]}])
    for other in (in_chunks, as_loader):
        assert other.num_images == 4
        np.testing.assert_allclose(other.intensity, whole.intensity, rtol=1e-6)
        np.testing.assert_allclose(other.spectrum[2], whole.spectrum[2], rtol=1e-6)


def test_profile_divide_by_channels_flag_scales_by_c(vit, pixel_values):
    scaled = spectral_profile(vit, pixel_values, layers=[1])
    raw = spectral_profile(vit, pixel_values, layers=[1], divide_by_channels=False)
    assert raw.intensity[0] == pytest.approx(32 * scaled.intensity[0], rel=1e-6)


def test_profile_json_round_trip(tmp_path, vit, pixel_values):
    profile = spectral_profile(vit, pixel_values)
    profile.extras["model_id"] = "tiny"
    profile.save(tmp_path / "p.json")
    loaded = SpectralProfile.load(tmp_path / "p.json")
    assert loaded.intensity == profile.intensity and loaded.layers == profile.layers and loaded.extras["model_id"] == "tiny"


# ------------------------------------------------------------------------------------------------
# Layer selection
# ------------------------------------------------------------------------------------------------
def cait_like_u_profile() -> list[float]:
    """High first two blocks, a long low middle, rising last six (the shape of SKD Fig. 1a)."""
    return [3.0, 2.4] + [1.0 + 0.02 * i for i in range(16)] + [2.0, 2.2, 2.4, 2.6, 2.9, 3.2]


def test_select_layers_reproduces_paper_map_for_cait_s24_to_deit_tiny():
    selection = select_layers(cait_like_u_profile(), student_num_layers=12)
    assert selection.teacher_layers == [0, 1, 18, 19, 20, 21, 22, 23]
    assert selection.student_layers == [0, 1, 6, 7, 8, 9, 10, 11]
    assert selection.as_arguments() == "--student_layers 0 1 6 7 8 9 10 11 --teacher_layers 0 1 18 19 20 21 22 23"


def test_select_layers_symmetric_u_and_k_limit():
    u = [abs(i - 11.5) for i in range(24)]
    selection = select_layers(u, student_num_layers=12, k=4)
    assert len(selection.teacher_layers) == 4
    assert set(selection.teacher_layers) == {0, 1, 22, 23}
    assert selection.student_layers == [0, 1, 10, 11]


def test_select_layers_flat_profile_falls_back_to_paper_shape():
    selection = select_layers([1.0] * 24, student_num_layers=12)
    assert selection.teacher_layers == [0, 1, 18, 19, 20, 21, 22, 23]
    assert selection.student_layers == [0, 1, 6, 7, 8, 9, 10, 11]
    assert "flat" in selection.rule


def test_select_layers_monotone_profiles_pick_the_intense_end():
    increasing = select_layers([float(i) for i in range(24)], student_num_layers=12)
    assert increasing.teacher_layers == list(range(12, 24)) and increasing.student_layers == list(range(12))
    decreasing = select_layers([float(24 - i) for i in range(24)], student_num_layers=12)
    assert decreasing.teacher_layers == list(range(12)) and decreasing.student_layers == list(range(12))


def test_select_layers_pairs_are_valid_and_ascending():
    rng = np.random.default_rng(0)
    for _ in range(50):
        teacher_depth, student_depth = int(rng.integers(1, 30)), int(rng.integers(1, 15))
        selection = select_layers(rng.random(teacher_depth) + 0.1, student_depth)
        assert len(selection.student_layers) == len(selection.teacher_layers) >= 1
        assert selection.student_layers == sorted(selection.student_layers)
        assert len(set(selection.student_layers)) == len(selection.student_layers)
        assert all(0 <= s < student_depth for s in selection.student_layers)
        assert all(0 <= t < teacher_depth for t in selection.teacher_layers)


def test_select_layers_swin_is_stage_by_stage():
    profile = SpectralProfile(layers=[0, 1, 2, 3], intensity=[1, 3, 2, 4], spectrum=[[1]] * 4, num_images=1, family="swin")
    selection = select_layers(profile, student_num_layers=4)
    assert selection.student_layers == selection.teacher_layers == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------
# Follow-up measures
# ------------------------------------------------------------------------------------------------
def test_token_entropy_matches_numpy_histograms():
    rng = np.random.default_rng(1)
    features = torch.tensor(rng.normal(size=(2, 40, 3, 2)))
    low, high = float(features.min()) - 0.5, float(features.max()) + 0.25
    got = token_entropy(features, low, high, bins=10)
    for b in range(2):
        for h in range(3):
            for w in range(2):
                counts, _ = np.histogram(features[b, :, h, w].numpy(), bins=10, range=(low, high))
                p = counts[counts > 0] / 40
                assert got[b, h, w].item() == pytest.approx(-(p * np.log2(p)).sum(), rel=1e-9)


def test_token_entropy_extremes():
    constant = torch.ones(1, 16, 1, 1)
    assert token_entropy(constant, 0.0, 2.0).item() == pytest.approx(0.0)
    spread = torch.arange(16, dtype=torch.float64).reshape(1, 16, 1, 1)  # one value per bin
    assert token_entropy(spread, 0.0, 16.0, bins=16).item() == pytest.approx(4.0)


def test_entropy_profile_uses_one_global_range(vit, pixel_values):
    entropies = entropy_profile(vit, pixel_values, bins=100)
    assert len(entropies) == 3 and all(0 <= e <= math.log2(100) for e in entropies)


def test_svd_rank_one_matrix_has_rank_one_everywhere():
    u, v = torch.randn(20, 1), torch.randn(1, 12)
    assert svd_energy_ranks(u @ v).tolist() == [[1, 1, 1, 1]]


def test_svd_ranks_of_equal_energy_directions_and_percentile_summary():
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))  # 10 orthonormal rows, equal energy
    ranks = svd_energy_ranks(q)
    assert ranks.tolist() == [[8, 9, 10, 10]]  # ceil(t·10) with 0.95 → 10 (9.5 rounds up)
    per_image = np.array([[1, 2, 3, 4]] * 99 + [[5, 6, 7, 8]])
    assert svd_rank_summary(per_image) == {"80%": 1, "90%": 2, "95%": 3, "99%": 4}
    assert svd_rank_summary(per_image, percentile=100) == {"80%": 5, "90%": 6, "95%": 7, "99%": 8}


def test_sep_flat_spectrum_and_dc_token():
    delta = torch.zeros(3, 20)
    delta[:, 0] = 1.0  # |fft|² = 1 in every bin: a flat spectrum
    sep = spectral_energy_pattern(delta)
    assert {k: v["bins"] for k, v in sep.items()} == {"50": 10, "60": 12, "70": 14, "80": 16, "90": 18}
    assert sep["70"]["fraction"] == pytest.approx(0.7)
    constant = torch.ones(2, 16)  # all energy at DC
    assert all(v["bins"] == 1 for v in spectral_energy_pattern(constant).values())
    folded = spectral_energy_pattern(delta, mode="folded")  # 11 rfft bins, interior ones doubled: 1,2,...,2,1
    assert folded["50"]["bins"] == 6 and folded["50"]["fraction"] == pytest.approx(6 / 11)


def test_activation_and_gradient_magnitude_shapes_and_values(vit, pixel_values):
    activation, gradient = activation_gradient_magnitude(vit, pixel_values, targets=torch.tensor([0, 1, 2, 3]))
    assert activation.shape == gradient.shape == (4, 3)
    with torch.no_grad():
        hidden = vit.eval()(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    expected = np.stack([h[:, 1:, :].abs().mean(dim=(1, 2)).numpy() for h in hidden[1:]], axis=1)
    np.testing.assert_allclose(activation, expected, rtol=1e-5)
    # Reference gradient: differentiate the chosen logits with respect to the hidden states directly.
    outputs = vit(pixel_values=pixel_values, output_hidden_states=True)
    chosen = outputs.logits[torch.arange(4), torch.tensor([0, 1, 2, 3])].sum()
    grads = torch.autograd.grad(chosen, outputs.hidden_states[1:])
    expected_grad = np.stack([g[:, 1:, :].abs().mean(dim=(1, 2)).numpy() for g in grads], axis=1)
    np.testing.assert_allclose(gradient, expected_grad, rtol=1e-5, atol=1e-10)
    # A CLS-pooled ViT reads only the CLS token of its last block: patch tokens there get no gradient.
    assert (gradient[:, :2] > 0).all() and (gradient[:, 2] == 0).all()


# ------------------------------------------------------------------------------------------------
# Comparing profiles
# ------------------------------------------------------------------------------------------------
def test_compare_profiles_shape_similarity():
    teacher = [3.0, 1.0, 1.0, 1.5, 3.0]
    same = compare_profiles([6.0, 2.0, 2.0, 3.0, 6.0], teacher)
    assert same.pearson == pytest.approx(1.0) and same.mean_abs_distance == pytest.approx(0.0)
    flipped = compare_profiles([0.0, 2.0, 2.0, 1.5, 0.0], teacher)
    assert flipped.pearson == pytest.approx(-1.0)
    shallower = compare_profiles(list(np.linspace(0, 1, 12)), list(np.linspace(5, 9, 24)))
    assert shallower.pearson == pytest.approx(1.0) and len(shallower.per_layer_distance) == 12
    assert math.isnan(compare_profiles([1.0, 1.0, 1.0], teacher).pearson)


def test_compare_refuses_profiles_too_short_to_have_a_shape(tmp_path, pixel_values, capsys):
    from helpers import run_and_capture, tiny_vit

    from hf_spectralkd.cli import main

    paths = {}
    for name, layers, seed in (("student", 2, 0), ("teacher", 2, 1), ("deeper", 3, 2)):
        spectral_profile(tiny_vit(layers=layers, seed=seed), pixel_values).save(tmp_path / f"{name}.json")
        paths[name] = str(tmp_path / f"{name}.json")
    # Two points min-max normalise to 0 and 1, whatever the models: this pair would read "pearson 1, distance 0".
    code, err = run_and_capture(main, ["compare", paths["student"], paths["teacher"]], capsys)
    assert code == 2 and "the student profile has 2 layer(s); comparing the shapes of spectral profiles needs at least 3" in err
    assert "Traceback" not in err
    code, err = run_and_capture(main, ["compare", paths["deeper"], paths["teacher"]], capsys)
    assert code == 2 and "the teacher profile has 2 layer(s)" in err
    assert run_and_capture(main, ["compare", paths["deeper"], paths["deeper"]], capsys)[0] == 0  # 3 layers: compared


def test_spectral_dynamics_reach_the_trackers_through_trainer_log(saved_models, imagefolder, tmp_path):
    """TensorBoard receives the per-layer intensities, the final similarity and both figures; `none` sends nothing."""
    import run_distill
    from helpers import tiny_run_args
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    argv = tiny_run_args(saved_models, imagefolder, out, "--spectral_dynamics_steps", "2", "--report_to", "tensorboard",
                         "--profile_images", "8")
    assert run_distill.main(argv) == 0
    events = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"train/spectral/intensity_layer_00", "train/spectral/intensity_layer_02",
            "train/spectral/final_pearson_to_teacher"} <= scalars, scalars
    assert {"spectral/intensity", "spectral/teacher_vs_student"} <= images
    logged = [e for e in json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
              if "spectral/intensity_layer_00" in e]
    assert [e["step"] for e in logged] == [0, 2, 4]  # start, every 2 steps (the end is step 4 too)

    quiet = tmp_path / "quiet"
    assert run_distill.main(tiny_run_args(saved_models, imagefolder, quiet, "--spectral_dynamics_steps", "2")) == 0
    assert not (quiet / "runs").exists()  # report_to none: no tracker files at all
    assert len((quiet / "spectral_dynamics.jsonl").read_text().splitlines()) == 3


# ------------------------------------------------------------------------------------------------
# layer_map="auto" proposes only what a run accepts
# ------------------------------------------------------------------------------------------------
def _auto_config(tmp_path, grid_alignment="spectral"):
    from hf_spectralkd import SpectralDistillationConfig

    return SpectralDistillationConfig(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[], use_cpu=True,
                                      disable_tqdm=True, save_strategy="no", eval_strategy="no", layer_map="auto",
                                      teacher_check_images=0, grid_alignment=grid_alignment)


def _teachers_at_another_input_size():
    """Teachers whose grid is the student's 4×4 at a larger input: a ViT at 64 px (patch 16), a timm DINOv2 at 56 px."""
    from helpers import tiny_vit
    from transformers import AutoModelForImageClassification, TimmWrapperConfig, ViTConfig, ViTForImageClassification

    vit = tiny_vit(num_labels=5, layers=4, seed=1).config.to_dict()
    yield "vit_64px", ViTForImageClassification(ViTConfig(**{**vit, "image_size": 64, "patch_size": 16}))
    dinov2 = TimmWrapperConfig(architecture="vit_small_patch14_dinov2", num_labels=5,
                               model_args={"img_size": 56, "patch_size": 14, "embed_dim": 32, "depth": 4, "num_heads": 2})
    yield "dinov2_56px", AutoModelForImageClassification.from_config(dinov2)


def test_auto_layer_map_profiles_a_teacher_of_another_input_size_on_its_own_inputs(tmp_path):
    from helpers import SyntheticImageDataset, tiny_vit

    from hf_spectralkd import SpectralDistillationTrainer
    from hf_spectralkd.features import describe_taps

    for name, teacher in _teachers_at_another_input_size():
        sizes = []
        teacher.register_forward_pre_hook(lambda m, a, kw, sizes=sizes: sizes.append(tuple(kw["pixel_values"].shape[-2:])),
                                          with_kwargs=True)
        trainer = SpectralDistillationTrainer(model=tiny_vit(), teacher_model=teacher, args=_auto_config(tmp_path),
                                              train_dataset=SyntheticImageDataset(16))
        expected = describe_taps(teacher).image_size
        assert sizes and set(sizes) == {expected}, name  # profiled through the input adapter: the teacher's size
        assert trainer.layer_map and all(p.student_shape[1:] == p.teacher_shape[1:] == (4, 4) for p in trainer.layer_map)


def test_auto_layer_map_and_select_layers_pair_only_equal_grids_with_a_swin_teacher(tmp_path, capsys):
    from helpers import SyntheticImageDataset, make_imagefolder, tiny_swin, tiny_vit

    from hf_spectralkd import SpectralDistillationTrainer
    from hf_spectralkd.cli import main
    from hf_spectralkd.features import describe_taps

    student, teacher = tiny_vit(), tiny_swin()
    student_grids, teacher_grids = describe_taps(student).grids, describe_taps(teacher).grids
    shared = [t for t, grid in enumerate(teacher_grids) if grid in student_grids]  # independent: stages a run accepts
    assert shared == [2] and teacher_grids[0] != student_grids[0]  # 16×16, 8×8, 4×4 against 4×4
    trainer = SpectralDistillationTrainer(model=student, teacher_model=teacher, args=_auto_config(tmp_path, "error"),
                                          train_dataset=SyntheticImageDataset(16))
    assert trainer.layer_map and {p.teacher for p in trainer.layer_map} <= set(shared)
    assert all(student_grids[p.student] == teacher_grids[p.teacher] for p in trainer.layer_map)
    # Across grids (the default), a 2-block student: stage t of 3 at block ⌈(t+1)·2/3⌉ - 1 = 0, 1, 1 (the later stage wins)
    trainer = SpectralDistillationTrainer(model=tiny_vit(layers=2), teacher_model=teacher, args=_auto_config(tmp_path),
                                          train_dataset=SyntheticImageDataset(16))
    assert [(p.student, p.teacher) for p in trainer.layer_map] == [(0, 0), (1, 2)]
    assert [p.teacher_shape[1:] for p in trainer.layer_map] == [(16, 16), (4, 4)]

    teacher.save_pretrained(tmp_path / "swin")
    student.config.save_pretrained(tmp_path / "student")
    data = make_imagefolder(tmp_path / "data", per_class=2, eval_per_class=2)
    assert main(["select-layers", "--teacher", str(tmp_path / "swin"), "--dataset", data, "--num-images", "4",
                 "--student", str(tmp_path / "student" / "config.json")]) == 0
    printed = capsys.readouterr().out
    assert "teacher_layers: [2]" in printed and "token grids not checked" not in printed

    with pytest.raises(ConfigurationError, match=r"layer_map: 'auto' found no teacher layer with a token grid of the student's "
                                                 r"\(student grids 4×4; teacher grids 16×16, 8×8\)"):
        select_layers([1.0, 2.0], 3, student_grids=student_grids, teacher_grids=teacher_grids[:2])
