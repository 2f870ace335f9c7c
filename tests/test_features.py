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

    from transformers import ResNetConfig, ResNetForImageClassification

    with pytest.raises(ValueError, match=r"model_type='resnet'"):
        model_family(ResNetForImageClassification(ResNetConfig(num_labels=2)))


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
