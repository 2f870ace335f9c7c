"""Feature taps: shapes and equality with the corresponding slice of hidden_states."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_spectralkd.features import (
    describe_taps,
    extract_features,
    feature_forward_kwargs,
    forward_with_features,
    model_family,
    tokens_to_grid,
)


def _reference_grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Token sequence → map, written with explicit indexing: map[b, c, i, j] = tokens[b, prefix + i·W + j, c]."""
    batch, length, channels = tokens.shape
    side = int(round((length - prefix) ** 0.5))
    out = torch.empty(batch, channels, side, side)
    for i in range(side):
        for j in range(side):
            out[:, :, i, j] = tokens[:, prefix + i * side + j, :]
    return out


@pytest.mark.parametrize("family,prefix", [("vit", 1), ("deit", 2)])
def test_vit_and_deit_taps_drop_prefix_tokens_and_follow_block_index(family, prefix, vit, deit, pixel_values):
    model = vit if family == "vit" else deit
    model.eval()
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, output_hidden_states=True)
        maps = extract_features(model, outputs, [0, 2, 1])
    for layer, features in zip([0, 2, 1], maps):
        assert features.shape == (4, 32, 4, 4)
        torch.testing.assert_close(features, _reference_grid(outputs.hidden_states[layer + 1], prefix))


def test_swin_taps_are_stage_outputs_before_patch_merging(swin, pixel_values):
    swin.eval()
    with torch.no_grad():
        outputs, maps = forward_with_features(swin, pixel_values, [0, 1, 2])
    assert [tuple(m.shape) for m in maps] == [(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)]
    for stage, features in enumerate(maps):
        torch.testing.assert_close(features, outputs.reshaped_hidden_states[stage + 1])
    # Stage 0's tap is at the stage's own resolution: the plain hidden state of stage 0 is already merged.
    with torch.no_grad():
        merged = swin(pixel_values=pixel_values, output_hidden_states=True).reshaped_hidden_states[1]
    assert merged.shape == (4, 16, 8, 8)


def test_timm_cait_taps_request_only_needed_blocks_and_match_all_blocks(cait, pixel_values):
    cait.eval()
    assert feature_forward_kwargs(cait, [3, 0, 3]) == {"output_hidden_states": [0, 3]}
    with torch.no_grad():
        every = cait(pixel_values=pixel_values, output_hidden_states=True)
        outputs, maps = forward_with_features(cait, pixel_values, [3, 0, 3])
    assert len(every.hidden_states) == 4 and len(outputs.hidden_states) == 2
    for layer, features in zip([3, 0, 3], maps):
        assert features.shape == (4, 64, 4, 4)
        torch.testing.assert_close(features, every.hidden_states[layer])
    torch.testing.assert_close(outputs.logits, every.logits)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("vit", ("vit", 3, (32,) * 3, ((4, 4),) * 3)),
        ("deit", ("deit", 3, (32,) * 3, ((4, 4),) * 3)),
        ("swin", ("swin", 3, (8, 16, 32), ((16, 16), (8, 8), (4, 4)))),
        ("cait", ("timm_wrapper", 4, (64,) * 4, ((4, 4),) * 4)),
        ("lift", ("lift_vit", 3, (32, 32, 64), ((4, 4),) * 3)),  # last tap: the lifted tokens
        ("widelast", ("widelast_vit", 3, (32, 32, 64), ((4, 4),) * 3)),  # last tap: the wide block
    ],
)
def test_describe_taps_agrees_with_real_feature_maps(name, expected, request, pixel_values):
    model = request.getfixturevalue(name)
    taps = describe_taps(model)
    assert (taps.family, taps.num_layers, taps.channels, taps.grids) == expected
    assert taps.image_size == (32, 32)
    with torch.no_grad():
        _, maps = forward_with_features(model.eval(), pixel_values, list(range(taps.num_layers)))
    assert [tuple(m.shape[1:]) for m in maps] == [taps.shape(i) for i in range(taps.num_layers)]


def test_unsupported_model_names_supported_families():
    with pytest.raises(ValueError, match=r"Unsupported model.*Linear.*ViT.*DeiT.*Swin.*TimmWrapper"):
        model_family(nn.Linear(2, 2))

    from transformers import PerceiverConfig, PerceiverForImageClassificationLearned

    # A known family left out: the message names it and says why, on one line.
    perceiver = PerceiverForImageClassificationLearned(PerceiverConfig(d_model=16, d_latents=16, num_latents=4,
                                                                       num_blocks=1, num_self_attends_per_block=1,
                                                                       image_size=8, num_labels=2))
    with pytest.raises(ValueError, match=r"model_type='perceiver'\): its blocks update a latent array") as raised:
        model_family(perceiver)
    assert "\n" not in str(raised.value)


def test_wrappers_are_unwrapped(vit):
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert model_family(Wrapper(vit)) == "vit"


def test_tokens_to_grid_non_square_needs_grid():
    tokens = torch.randn(2, 1 + 6, 5)
    with pytest.raises(ValueError, match="square grid"):
        tokens_to_grid(tokens, 1)
    grid = tokens_to_grid(tokens, 1, grid=(2, 3))
    assert grid.shape == (2, 5, 2, 3)
    assert torch.equal(grid[:, :, 1, 2], tokens[:, 6, :])


def test_every_registered_adapter_has_a_hand_written_reading_test():
    """Adding a family means adding its adapter *and* a test comparing its maps to a hand-written reading."""
    from hf_spectralkd.features import supported_families

    hand_written = {
        "vit": "test_vit_and_deit_taps_drop_prefix_tokens_and_follow_block_index",
        "deit": "test_vit_and_deit_taps_drop_prefix_tokens_and_follow_block_index",
        "swin": "test_swin_taps_are_stage_outputs_before_patch_merging",
        "timm_wrapper": "test_timm_cait_taps_request_only_needed_blocks_and_match_all_blocks",
        "lift_vit": "test_students.py::test_lift_forward_and_taps_match_reference",
        "widelast_vit": "test_students.py::test_widelast_forward_and_taps_match_reference",
    }
    every_family = "test_every_transformers_family_taps_match_a_hand_written_reading"
    hand_written.update({family: every_family for family in HAND_WRITTEN_READINGS})
    assert set(supported_families()) == set(hand_written)


def test_adapters_read_prefix_tokens_from_the_model(vit, deit, swin, cait, lift, widelast):
    from hf_spectralkd.features import adapter_for

    # ViT-likes: one token per prefix parameter of the embeddings; map families have none in their outputs.
    expected = {"vit": 1, "deit": 2, "swin": 0, "timm_wrapper": 0, "lift_vit": 1, "widelast_vit": 1}
    for model in (vit, deit, swin, cait, lift, widelast):
        adapter = adapter_for(model)
        assert adapter.prefix_tokens(model) == expected[adapter.family], adapter.family
    with torch.no_grad():  # the count matches the tokens in front of the 16 patch tokens of a 32 px input
        tokens = deit(pixel_values=torch.zeros(1, 3, 32, 32), output_hidden_states=True).hidden_states[1]
    assert tokens.shape[1] - 16 == 2
    # The count comes from the config, so a DeepSpeed ZeRO-3 partition (parameters emptied) does not change it.
    token = deit.deit.embeddings.distillation_token
    token.data = torch.empty(0)
    assert adapter_for(deit).prefix_tokens(deit) == 2


def test_describe_taps_measures_stages_that_round_up():
    """timm efficientvit_m0 at 224 px: its last stage is 4×4, where 224 // 64 (the feature_info reduction) gives 3×3."""
    from helpers import timm_efficientvit_m0

    model = timm_efficientvit_m0().eval()
    taps = describe_taps(model)
    reductions = [int(f["reduction"]) for f in model.timm_model.feature_info]
    arithmetic = tuple((224 // r, 224 // r) for r in reductions)
    assert taps.image_size == (224, 224) and arithmetic[-1] == (3, 3)
    with torch.no_grad():
        _, maps = forward_with_features(model, torch.randn(1, 3, 224, 224), list(range(taps.num_layers)))
    measured = tuple(tuple(m.shape[2:]) for m in maps)
    assert measured[-1] == (4, 4) and taps.grids == measured
    assert [taps.shape(i) for i in range(taps.num_layers)] == [tuple(m.shape[1:]) for m in maps]


def test_layer_map_rejects_a_pair_that_only_the_arithmetic_grid_would_match():
    from helpers import timm_efficientvit_m0
    from transformers import ViTConfig, ViTForImageClassification

    from hf_spectralkd.errors import ConfigurationError
    from hf_spectralkd.layer_map import build_layer_map

    student = ViTForImageClassification(ViTConfig(image_size=48, patch_size=16, hidden_size=32, num_hidden_layers=3,
                                                  num_attention_heads=2, intermediate_size=64, num_labels=5))
    with pytest.raises(ConfigurationError, match=r"student layer 2 is 3×3 but teacher layer 2 is 4×4"):
        build_layer_map(student, timm_efficientvit_m0(), [2], [2], grid_alignment="error")


def test_describe_taps_measures_a_non_square_vit_grid_and_caches_per_model():
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(image_size=(16, 40), patch_size=8, hidden_size=16, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=32, num_labels=3)).eval()
    taps = describe_taps(model)
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(2, 3, 16, 40), **feature_forward_kwargs(model, [0, 1]))
    # Hand-written reading: token n of the 2×5 grid sits at (n // 5, n % 5), after the CLS token.
    tokens = outputs.hidden_states[2][:, 1:]
    reference = torch.stack([torch.stack([tokens[:, r * 5 + c] for c in range(5)], dim=-1) for r in range(2)], dim=-2)
    maps = extract_features(model, outputs, [1], grid=taps.grids[1])
    assert taps.grids == ((2, 5), (2, 5)) and taps.image_size == (16, 40)
    torch.testing.assert_close(maps[0], reference)
    assert describe_taps(model) is taps  # cached: no second measurement
    model.config.num_hidden_layers = 1  # a changed config is measured again
    assert describe_taps(model).num_layers == 1


def test_tap_unit_names_stages_only_for_hierarchical_families():
    from hf_spectralkd.features import tap_unit

    assert [tap_unit(f) for f in ("swin", "vit", "timm_wrapper", "unknown", None)] == ["stage"] + ["block"] * 4


# Hand-written reading of each transformers family's forward output: tap i as the test reads it, from
# transformers 5.23's modeling code. ("tokens", P, S): hidden_states[i + 1] is P prefix tokens then the
# patch tokens in row-major order, on an S×S grid (S = None: the grid of the patch projection, read from the
# model's first Conv2d here; "own": each tap's own √N). ("maps", key, offset, layout): entry i + offset of
# outputs.<key>, laid out NCHW or NHWC.
_TOKENS = ("tokens", 1, None)
HAND_WRITTEN_READINGS = {
    "vit": _TOKENS, "deit": ("tokens", 2, None), "beit": _TOKENS, "data2vec-vision": _TOKENS, "dinov2": _TOKENS,
    "dinov2_with_registers": ("tokens", 1 + 3, None), "ijepa": ("tokens", 0, None), "vit_msn": _TOKENS,
    "clip": _TOKENS, "metaclip_2": _TOKENS, "siglip": ("tokens", 0, None), "levit": ("tokens", 0, "own"),
    "swin": ("maps", "reshaped_hidden_states", 1, "NCHW"), "swinv2": ("maps", "reshaped_hidden_states", 1, "NCHW"),
    "donut-swin": ("maps", "reshaped_hidden_states", 1, "NCHW"), "focalnet": ("maps", "reshaped_hidden_states", 1, "NCHW"),
    "hiera": ("maps", "reshaped_hidden_states", 1, "NHWC"),
    **{family: ("maps", "hidden_states", 1, "NCHW") for family in (
        "convnext", "convnextv2", "resnet", "regnet", "bit", "hgnet_v2", "textnet", "pp_lcnet", "efficientnet")},
    **{family: ("maps", "hidden_states", 0, "NCHW") for family in (
        "mobilenet_v2", "mobilevit", "mobilevitv2", "cvt", "poolformer", "pvt_v2", "segformer")},
}


def _hand_written_reading(model, outputs, reading, tap):
    if reading[0] == "maps":
        _, key, offset, layout = reading
        entry = getattr(outputs, key)[tap + offset]
        return entry if layout == "NCHW" else entry.permute(0, 3, 1, 2)
    _, prefix, side = reading
    tokens = outputs.hidden_states[tap + 1]
    if side is None:
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        height, width = conv(torch.zeros(1, conv.in_channels, *outputs.pixel_size)).shape[-2:]
    else:
        height = width = int(round((tokens.shape[1] - prefix) ** 0.5))
    out = torch.empty(tokens.shape[0], tokens.shape[2], height, width)
    for i in range(height):
        for j in range(width):
            out[:, :, i, j] = tokens[:, prefix + i * width + j, :]
    return out


@pytest.mark.parametrize("family", list(HAND_WRITTEN_READINGS))
def test_every_transformers_family_taps_match_a_hand_written_reading(family):
    """Every tap of a tiny random model of the family equals the test's own reading of its outputs, and the
    shapes describe_taps measured on the meta device equal those of the real maps at the described size."""
    from helpers import tiny_classifier

    model, _ = tiny_classifier(family)
    taps = describe_taps(model)
    layers = list(range(taps.num_layers))
    pixel_values = torch.randn(2, 3, *taps.image_size)
    with torch.no_grad():
        _, maps = forward_with_features(model, pixel_values, layers[::-1])
        every = model(pixel_values=pixel_values, output_hidden_states=True,
                      **({"output_hidden_states_before_downsampling": True} if family == "swin" else {}))
    every.pixel_size = taps.image_size
    assert taps.num_layers >= 2 and model_family(model) == family
    for tap, features in zip(layers[::-1], maps):
        torch.testing.assert_close(features, _hand_written_reading(model, every, HAND_WRITTEN_READINGS[family], tap))
        assert tuple(features.shape[1:]) == taps.shape(tap)


def test_layer_map_pairs_a_vit_student_with_new_families_by_depth_and_grid():
    """--beta > 0 with a transformers-native teacher of another tap count: the layer map gets its measured taps
    (ViT 4×4 blocks; ConvNeXt stages 8×8, 4×4; DINOv2 with registers 4×4 blocks). A stage teacher's stage t
    pairs with the block at the same relative depth; --grid_alignment error keeps only pairs on equal grids."""
    from types import SimpleNamespace

    from helpers import tiny_classifier, tiny_vit

    from hf_spectralkd.layer_map import build_layer_map, resolve_layer_map

    student = tiny_vit().eval()
    convnext, _ = tiny_classifier("convnext")
    pixel_values = torch.randn(4, 3, 32, 32)
    options = dict(uses_features=True, layer_map="auto", student_layers=None, teacher_layers=None)
    pairs = resolve_layer_map(student, convnext, SimpleNamespace(**options, grid_alignment="error"), pixel_values=pixel_values)
    # 3 student blocks, 2 teacher stages: stage 1 is the last block's depth; stage 0 (8×8) has no 4×4 partner
    assert [(p.student, p.teacher) for p in pairs] == [(2, 1)]
    assert pairs[0].teacher_shape == (16, 4, 4) and pairs[0].student_shape == (32, 4, 4)
    pairs = resolve_layer_map(student, convnext, SimpleNamespace(**options, grid_alignment="spectral"),
                              pixel_values=pixel_values)
    assert [(p.student, p.teacher, p.teacher_shape[1:]) for p in pairs] == [(1, 0, (8, 8)), (2, 1, (4, 4))]
    registers, _ = tiny_classifier("dinov2_with_registers")
    pairs = build_layer_map(student, registers, [0, 2], [0, 1])
    assert [p.teacher_shape for p in pairs] == [(16, 4, 4)] * 2
