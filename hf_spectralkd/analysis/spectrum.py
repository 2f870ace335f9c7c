"""Channel spectrum ``S(X)`` and frequency intensity ``ℓ(X)`` per layer (SKD eqs. 1-5; docs/method.md#analysis-measures).

For one layer's ``X ∈ R^{B×C×H×W}``:

1. ``F[b,k,h,w] = (1/C) Σ_c X[b,c,h,w] e^{-2πi kc/C}``: a 1-D FFT along channels at every token;
2. ``A = |F|`` (magnitude before any averaging);
3. ``S[k] = mean_{b,h,w} A[b,k,h,w]`` (length ``C``, all bins including the mirrored half);
4. ``ℓ = mean_k S[k]``.

``S`` is linear in ``A``, so a dataset is processed batch by batch: each batch adds ``Σ_{b,h,w} A``
and its token count to float64 accumulators, and no feature map outlives its batch.
This is *not* the loss FFT (2-D over space, ortho, complex coefficients; see ``losses.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from ..features import describe_taps, extract_features, feature_forward_kwargs
from ..utils import unwrap_model

Batches = Union[torch.Tensor, Iterable[Any]]


@dataclass
class SpectralProfile:
    """Per-layer spectral statistics of one model.

    Attributes:
        layers: 0-based block (Swin: stage) indices, ascending.
        intensity: ``ℓ`` per layer.
        spectrum: ``S`` per layer, one list of ``C_l`` floats (all FFT bins, natural order).
        num_images: images the statistics average over.
        model_name: where the model came from, when known.
        family: feature-tap family (the adapter's ``family``: ``vit``, ``swin``, ``timm_wrapper``, …).
        divide_by_channels: whether the FFT was scaled by ``1/C`` (the reference code does).
    """

    layers: list[int]
    intensity: list[float]
    spectrum: list[list[float]]
    num_images: int
    model_name: Optional[str] = None
    family: Optional[str] = None
    divide_by_channels: bool = True
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SpectralProfile":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        extras = {k: v for k, v in data.items() if k not in cls.__dataclass_fields__}
        profile = cls(**known)
        profile.extras.update(extras)
        return profile

    def save(self, path: Union[str, Path]) -> None:
        payload = {**self.extras, **{k: v for k, v in self.to_dict().items() if k != "extras"}}
        Path(path).write_text(json.dumps(payload, indent=2))

    @classmethod
    def load(cls, path: Union[str, Path], argument: str = "profile") -> "SpectralProfile":
        """Read a ``profile.json``; a missing, cut or foreign file is a one-line error naming ``argument``."""
        from ..errors import ConfigurationError
        from ..io.integrity import damaged, read_json

        if not Path(path).is_file():
            raise ConfigurationError(f"{argument}: file '{path}' does not exist")
        data, problem = read_json(Path(path))
        if problem is None and not isinstance(data, dict):
            problem = f"{Path(path).name} is not a JSON object"
        if problem is None:
            missing = [key for key in ("layers", "intensity", "spectrum", "num_images") if key not in data]
            problem = f"{Path(path).name} lacks {', '.join(missing)}" if missing else None
        if problem:
            raise damaged(argument, path, [problem], "write it again with `hf-spectralkd analyze`")
        return cls.from_dict(data)


def channel_spectrum_sum(features: torch.Tensor, divide_by_channels: bool = True) -> torch.Tensor:
    """``Σ_{b,h,w} |FFT_c(X)|`` of one ``B×C×H×W`` map: a float64 vector of length ``C``.

    The FFT runs in float32 (or float64 if ``features`` is float64) along the contiguous channel
    axis of a channels-last view; magnitudes are summed in float64.
    """
    channels = features.shape[1]
    tokens_by_channel = features.permute(0, 2, 3, 1).reshape(-1, channels)  # (B·H·W)×C
    if tokens_by_channel.dtype not in (torch.float32, torch.float64):
        tokens_by_channel = tokens_by_channel.float()
    magnitude = torch.fft.fft(tokens_by_channel, dim=-1).abs()
    if divide_by_channels:
        magnitude = magnitude / channels
    return magnitude.sum(dim=0, dtype=torch.float64)


class ProfileAccumulator:
    """Running ``Σ A`` and token counts per layer; call :meth:`add` per batch, then :meth:`result`."""

    def __init__(self, layers: Sequence[int], divide_by_channels: bool = True):
        self.layers = list(layers)
        self.divide_by_channels = divide_by_channels
        self.sums: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        self.tokens = [0] * len(self.layers)
        self.num_images = 0

    def add(self, feature_maps: Sequence[torch.Tensor]) -> None:
        """Add one batch: ``feature_maps[i]`` is the ``B×C×H×W`` map of ``self.layers[i]``."""
        for i, features in enumerate(feature_maps):
            spectrum_sum = channel_spectrum_sum(features.detach(), self.divide_by_channels).cpu()
            self.sums[i] = spectrum_sum if self.sums[i] is None else self.sums[i] + spectrum_sum
            self.tokens[i] += features.shape[0] * features.shape[2] * features.shape[3]
        self.num_images += feature_maps[0].shape[0] if feature_maps else 0

    def result(self, model_name: Optional[str] = None, family: Optional[str] = None) -> SpectralProfile:
        if self.num_images == 0:
            raise ValueError("no images were analysed")
        spectra = [(s / n) for s, n in zip(self.sums, self.tokens)]
        return SpectralProfile(
            layers=self.layers,
            intensity=[float(s.mean()) for s in spectra],
            spectrum=[s.tolist() for s in spectra],
            num_images=self.num_images,
            model_name=model_name,
            family=family,
            divide_by_channels=self.divide_by_channels,
        )


def iterate_pixel_batches(pixel_values: Batches, batch_size: int) -> Iterable[torch.Tensor]:
    """Yield ``N×3×H×W`` tensors from a tensor (split in chunks) or an iterable of tensors/batch dicts."""
    if isinstance(pixel_values, torch.Tensor):
        yield from pixel_values.split(batch_size)
        return
    for batch in pixel_values:
        yield batch["pixel_values"] if isinstance(batch, dict) else batch


@torch.no_grad()
def collect_feature_maps(model: nn.Module, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
    """Feature maps of ``layers`` for one batch, from an eval-mode float32 forward."""
    device = next(unwrap_model(model).parameters()).device
    outputs = model(pixel_values=pixel_values.to(device, torch.float32), **feature_forward_kwargs(model, layers))
    return extract_features(model, outputs, layers)


def resolve_layers(model: nn.Module, layers: Optional[Sequence[int]]) -> list[int]:
    taps = describe_taps(model)
    if layers is None:
        return list(range(taps.num_layers))
    resolved = sorted(set(int(layer) for layer in layers))
    for layer in resolved:
        if not 0 <= layer < taps.num_layers:
            raise ValueError(f"layers: index {layer} is out of range for a model with {taps.num_layers} layers")
    return resolved


def spectral_profile(
    model: nn.Module,
    pixel_values: Batches,
    layers: Optional[Sequence[int]] = None,
    batch_size: int = 32,
    divide_by_channels: bool = True,
    progress: bool = False,
    model_name: Optional[str] = None,
) -> SpectralProfile:
    """The spectral profile (``S`` and ``ℓ`` per layer) of ``model`` on some images.

    Args:
        model: any model the feature taps support; it is put in eval mode for the duration.
        pixel_values: an ``N×3×H×W`` tensor (processed ``batch_size`` at a time) or an iterable of
            tensors or ``{"pixel_values": ...}`` batches (a DataLoader), consumed once.
        layers: 0-based layer indices; default all.
        divide_by_channels: scale the channel FFT by ``1/C`` as the reference code does.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    layers = resolve_layers(model, layers)
    accumulator = ProfileAccumulator(layers, divide_by_channels)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(iterate_pixel_batches(pixel_values, batch_size), desc="spectral profile", disable=not progress, unit="batch"):
            accumulator.add(collect_feature_maps(model, batch, layers))
    finally:
        model.train(was_training)
    name = model_name or getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", None) or None
    return accumulator.result(model_name=name, family=describe_taps(model).family)
