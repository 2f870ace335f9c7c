"""``hf-spectralkd analyze``: the paper's analyses of one model on some images, as JSON and PNG plots."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..analysis import (
    SpectralProfile,
    compare_profiles,
    entropy_profile,
    plots,
    spectral_energy_pattern,
    svd_energy_curves,
    svd_rank_summary,
)
from ..analysis.measures import (
    SVD_THRESHOLDS,
    energy_ranks,
    feature_maps_and_gradients,
    feature_tokens,
    feature_value_range,
    mean_magnitude,
)
from ..analysis.spectrum import ProfileAccumulator, collect_feature_maps, resolve_layers
from ..errors import ConfigurationError
from ..features import describe_taps
from ..io.model_loading import load_model
from .images import load_images, preprocess

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="Model to analyse: Hub id, local folder or built-in architecture name.")
    parser.add_argument("--dataset", required=True,
                        help="Images: a folder of image files (any nesting), a local imagefolder/parquet dataset or a Hub dataset id.")
    parser.add_argument("--split", default="validation", help="Dataset split to read (ignored for a plain folder). Default: validation.")
    parser.add_argument("--num_images", type=int, default=64, help="Number of images to analyse. Default: 64.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per forward pass. Default: 32.")
    parser.add_argument("--sample", choices=["balanced", "first"], default="balanced",
                        help="'balanced' takes classes (or sub-folders) round-robin; 'first' the first images in sorted "
                             "order (the reference setting: first 32 ImageNet-val images). Default: balanced.")
    parser.add_argument("--image_column", default="image", help="Image column of a dataset. Default: image.")
    parser.add_argument("--label_column", default="label", help="Label column of a dataset. Default: label.")
    parser.add_argument("--streaming", action="store_true",
                        help="Stream a local dataset too (Hub datasets are always streamed: only the images used are read).")
    parser.add_argument("--output_dir", default="spectral_analysis", help="Where profile.json and the plots go. Default: spectral_analysis.")
    parser.add_argument("--compare", default=None, metavar="OTHER_PROFILE.json",
                        help="Another model's profile.json (e.g. the teacher's) to overlay and compare with.")
    parser.add_argument("--revision", default=None, help="Model revision (branch, tag or commit) on the Hub.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the Hub to run (off by default).")
    parser.add_argument("--no_divide_by_channels", action="store_true",
                        help="Do not scale the channel FFT by 1/C (the reference code scales; the paper's equations do not).")
    parser.add_argument("--with_gradients", action="store_true",
                        help="Also measure gradient magnitudes (one backward pass per batch).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")


def _batches(pixel_values: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(pixel_values.split(batch_size))


def _one_pass_measures(model, batches: list[torch.Tensor], options):
    """Everything but the entropy from one forward per batch (plus one backward with gradients).

    Returns ``(profile, activation N×L, gradient N×L or None, last-layer tokens N×T×C, (min, max) of
    all maps)``; the range lets the entropy pass skip its own first pass.
    """
    layers = resolve_layers(model, None)
    accumulator = ProfileAccumulator(layers, divide_by_channels=not options.no_divide_by_channels)
    value_range = (math.inf, -math.inf)
    activation, gradient, tokens = [], [], []
    model.eval()
    for batch in tqdm(batches, desc="spectral profile", unit="batch"):
        if options.with_gradients:
            maps, grads = feature_maps_and_gradients(model, batch, layers)
            gradient.append(mean_magnitude(grads).cpu().numpy())
        else:
            maps = collect_feature_maps(model, batch, layers)
        accumulator.add(maps)
        activation.append(mean_magnitude(maps).cpu().numpy())
        tokens.append(feature_tokens(maps[-1]).cpu())
        value_range = feature_value_range(maps, value_range)
    profile = accumulator.result(model_name=options.model, family=describe_taps(model).family)
    gradient_matrix = np.concatenate(gradient) if gradient else None
    return profile, np.concatenate(activation), gradient_matrix, torch.cat(tokens), value_range


def run(options) -> int:
    if options.batch_size <= 0:
        raise ConfigurationError(f"batch_size: must be positive, got {options.batch_size}")
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_model(options.model, argument="model", revision=options.revision, trust_remote_code=options.trust_remote_code)
    model = loaded.model.to(device).eval()
    images, used = load_images(options.dataset, options.split, options.num_images, options.sample,
                               options.image_column, options.label_column, options.streaming)
    pixel_values = preprocess(images, model, options.model if loaded.kind == "pretrained" else None, options.revision)
    batches = _batches(pixel_values, options.batch_size)
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    profile, activation_matrix, gradient_matrix, tokens, value_range = _one_pass_measures(model, batches, options)
    # The entropy's own forward pass over the same batches (its histograms need the range found above).
    entropy = entropy_profile(model, tqdm(batches, desc="entropy", unit="batch"), profile.layers, value_range=value_range)
    energy_curves = svd_energy_curves(tokens)  # one SVD per image, for the ranks and the plot
    per_image_ranks = energy_ranks(energy_curves)

    report: dict[str, Any] = {
        **{k: v for k, v in profile.to_dict().items() if k != "extras"},
        "model_id": options.model,
        "model_revision": loaded.revision or options.revision,
        "dataset": options.dataset,
        "split": options.split,
        "sample": options.sample,
        "images_used": len(used),
        "image_ids": used,
        "entropy_bits": entropy,
        "activation_magnitude": activation_matrix.mean(axis=0).tolist(),
        "activation_magnitude_per_image": activation_matrix.tolist(),
        "svd_energy_rank_p99": svd_rank_summary(per_image_ranks, SVD_THRESHOLDS),
        "svd_energy_rank_note": "99th percentile over images of the per-image rank (uncentred SVD of the last layer's tokens)",
        "spectral_energy_pattern": spectral_energy_pattern(tokens),
    }
    if gradient_matrix is not None:
        report["gradient_magnitude"] = gradient_matrix.mean(axis=0).tolist()
        report["gradient_magnitude_per_image"] = gradient_matrix.tolist()

    plots.plot_intensity_bars(profile, out / "intensity.png")
    plots.plot_intensity_histogram(profile, out / "intensity_histogram.png")
    plots.plot_spectrum_grid(profile, out / "spectrum_grid.png")
    plots.plot_svd_energy(energy_curves.numpy(), out / "svd_energy.png")
    if options.compare:
        other = SpectralProfile.load(options.compare, argument="compare")
        comparison = compare_profiles(profile, other)
        report["comparison"] = {"other": options.compare, "other_model": other.model_name, **comparison.to_dict()}
        plots.plot_profile_comparison([other, profile], [other.model_name or "other", options.model], out / "comparison.png")
        print(f"similarity to {other.model_name or options.compare}: pearson {comparison.pearson:.3f}, "
              f"mean distance {comparison.mean_abs_distance:.3f}")
    (out / "profile.json").write_text(json.dumps(report, indent=2))
    intensity = ", ".join(f"{v:.4g}" for v in profile.intensity)
    print(f"analysed {len(used)} images; ℓ per layer: [{intensity}]")
    print(f"wrote {out / 'profile.json'} and plots to {out}")
    return 0
