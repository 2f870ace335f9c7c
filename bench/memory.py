"""Peak memory of a teacher forward that keeps every hidden state vs only the tapped ones.

A DeiT-Base-sized teacher (ViT-B/16, 224×224, built from its config with random weights) runs one
forward under ``no_grad`` at ``--batch-size`` images, asked either for all hidden states
(``output_hidden_states=True``) or only for the tapped blocks (the list the library passes,
transformers >= 5.23). Each measurement runs in a fresh process; the figure is the growth of the
process's peak resident memory during the forward (``ru_maxrss`` after minus the resident size
before), so allocator reuse between the two modes cannot mix them. Modes alternate over
``--repeats`` rounds; medians are printed, then one JSON line.

    .venv/bin/python bench/memory.py --batch-size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAPS = [0, 1, 6, 7, 8, 9, 10, 11]  # 8 of the 12 blocks, the shape of the paper's map


def _resident_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, batch_size: int) -> None:
    import torch

    sys.path.insert(0, ROOT)
    from hf_spectralkd.features import extract_features, feature_forward_kwargs
    from hf_spectralkd.io.model_loading import load_model

    torch.manual_seed(0)
    model = load_model("deit_base_patch16_224", argument="teacher").model.eval()
    pixel_values = torch.randn(batch_size, 3, 224, 224)
    with torch.no_grad():
        model(pixel_values=pixel_values[:1], **feature_forward_kwargs(model, TAPS))  # warm-up: kernels, allocator
    before = _resident_mib()
    kwargs = {"output_hidden_states": True} if mode == "all" else feature_forward_kwargs(model, TAPS)
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, **kwargs)
        maps = extract_features(model, outputs, TAPS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    kept = sum(h.numel() * h.element_size() for h in outputs.hidden_states if h is not None) / 2**20
    print(json.dumps({"mode": mode, "peak_growth_mib": round(peak - before, 1), "hidden_states_kept_mib": round(kept, 1),
                      "maps": len(maps)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["all", "tapped"], help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        return child(options.child, options.batch_size)
    runs: dict[str, list[dict]] = {"all": [], "tapped": []}
    for _ in range(options.repeats):
        for mode in ("all", "tapped"):
            result = subprocess.run([sys.executable, __file__, "--child", mode, "--batch-size", str(options.batch_size)],
                                    capture_output=True, text=True, check=True)
            runs[mode].append(json.loads(result.stdout.strip().splitlines()[-1]))
    summary = {}
    for mode, entries in runs.items():
        growth = statistics.median(e["peak_growth_mib"] for e in entries)
        summary[mode] = {"peak_growth_mib": growth, "hidden_states_kept_mib": entries[0]["hidden_states_kept_mib"],
                         "runs": [e["peak_growth_mib"] for e in entries]}
        print(f"{mode:>6}: peak growth {growth:8.1f} MiB (runs {summary[mode]['runs']}), "
              f"hidden states kept {entries[0]['hidden_states_kept_mib']:.1f} MiB")
    saved = summary["all"]["peak_growth_mib"] - summary["tapped"]["peak_growth_mib"]
    print(f"tapped blocks only ({len(TAPS)} of 12): {saved:.1f} MiB less peak memory "
          f"({100 * saved / summary['all']['peak_growth_mib']:.1f} % of the forward's growth)")
    print(json.dumps({"batch_size": options.batch_size, "taps": TAPS, **summary, "saved_mib": round(saved, 1)}))


if __name__ == "__main__":
    main()
