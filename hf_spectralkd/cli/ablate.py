"""``hf-spectralkd ablate CONFIG``: the paper's ablation rows on one config, same budget, several seeds.

Trains the config's student four ways, each over the same seeds with the same data, schedule and
number of steps, and writes a table (mean ± sample std of the top-1 over seeds, mean wall time) as
Markdown and JSON, and a bar plot:

==================  ===================================================================
row                 change to the config
==================  ===================================================================
no KD               ``--distillation_type none --beta 0`` (the student alone)
soft KD             ``--beta 0`` (logit distillation only)
SpectralKD          the config as it is (soft KD + spectral feature alignment)
feature MSE only    ``--alpha 0 --feature_loss mse`` (spatial feature-map KD, no logit KD)
==================  ===================================================================

Nothing is tuned per row: every option but the row's own change comes from the config and the
options given after it (which apply to every run).

Each row is also compared with the no-KD row image by image: every run saves its per-image predictions
(``eval_predictions.npz``), each image's top-1 correctness is averaged over the seeds, and the mean
difference between the two rows gets a 95 % paired percentile-bootstrap interval over the evaluation
images. A difference whose interval excludes 0 is reported as distinguishable from the noise of the
evaluation sample; the spread over training seeds is the table's ± std.

    hf-spectralkd ablate demo [--seeds 0 1 2] [--output_dir outputs/ablation] [--option value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigurationError, RunFailedError
from ..metrics import load_predictions, percentile_bootstrap
from ..recipe.command_parser import CommandParser

ROWS: dict[str, list[str]] = {
    "no KD": ["--distillation_type", "none", "--beta", "0"],
    "soft KD": ["--beta", "0"],
    "SpectralKD": [],
    "feature MSE only": ["--alpha", "0", "--feature_loss", "mse"],
}
BASELINE = "no KD"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="hf-spectralkd ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="A recipe config (path or shipped name) whose student the rows train.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of every row. Default: 0 1 2.")
    parser.add_argument("--output_dir", default="outputs/ablation", help="Runs, table and plot go here.")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="Rows to train. Default: all.")
    return parser


def run_rows(config: str, seeds: Sequence[int], output_dir: Path, rows: Sequence[str], extra: Sequence[str]) -> dict:
    """Train every (row, seed) with the recipe in this process; returns the per-run results."""
    from tqdm.auto import tqdm

    from .distill import main as distill

    runs: dict[str, list[dict]] = {}
    # The runs' own Trainer bars show each run's steps; this one counts the runs (rows × seeds).
    bar = tqdm(total=len(rows) * len(seeds), desc="ablation runs", unit="run")
    for row in rows:
        for seed in seeds:
            folder = output_dir / row.lower().replace(" ", "_") / f"seed{seed}"
            started = time.time()
            code = distill([config, *extra, *ROWS[row], "--seed", str(seed), "--output_dir", str(folder),
                            "--overwrite_output_dir", "true", "--results_file", str(folder / "results.json"),
                            "--save_strategy", "no", "--report_to", "none", "--spectral_dynamics_steps", "0"])
            if code != 0:
                raise ConfigurationError(f"ablate: the '{row}' run with seed {seed} failed (exit code {code}); see above")
            results = json.loads((folder / "results.json").read_text())
            runs.setdefault(row, []).append({"seed": seed, "top1": results["student_accuracy"],
                                              "wall_time_s": round(time.time() - started, 1), "folder": str(folder)})
            bar.write(f"{row:<18} seed {seed}: top-1 {100 * results['student_accuracy']:.2f} %")
            bar.update()
    bar.close()
    return runs


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """Mean and sample standard deviation of the top-1 (in %) and mean wall time per row."""
    table = []
    for row, entries in runs.items():
        top1 = [100 * e["top1"] for e in entries]
        table.append({"row": row, "seeds": [e["seed"] for e in entries], "top1": [round(v, 2) for v in top1],
                      "mean": round(statistics.mean(top1), 2), "std": round(statistics.stdev(top1), 2) if len(top1) > 1 else 0.0,
                      "wall_time_s": round(statistics.mean(e["wall_time_s"] for e in entries), 1)})
    return table


def _seed_mean_correct(entries: list[dict], labels: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the top-1 correctness averaged over a row's seeds (``N``), and the labels every run scored."""
    correct = []
    for entry in entries:
        run_labels, top_k = load_predictions(entry["folder"])
        if labels is None:
            labels = run_labels
        elif not np.array_equal(run_labels, labels):
            raise RunFailedError(f"ablate: the run in {entry['folder']} scored other evaluation images than the others; "
                                 "runs can only be paired on the same images")
        correct.append(top_k[:, 0] == run_labels)
    return np.mean(correct, axis=0), labels


def compare_with_baseline(runs: dict[str, list[dict]], seed: int = 0) -> list[dict]:
    """Each row minus the no-KD row, in top-1 points, with a 95 % paired bootstrap interval over images.

    Both rows ran the same seeds on the same evaluation images: the difference of their seed-averaged
    per-image correctness is resampled by image. ``[]`` without a no-KD row.
    """
    if BASELINE not in runs:
        return []
    baseline, labels = _seed_mean_correct(runs[BASELINE], None)
    comparisons = []
    for row, entries in runs.items():
        if row == BASELINE:
            continue
        difference = 100 * (_seed_mean_correct(entries, labels)[0] - baseline)
        low, high = percentile_bootstrap(difference, seed=seed)
        comparisons.append({"row": row, "baseline": BASELINE, "difference": round(float(difference.mean()), 2),
                            "ci_low": round(float(low), 2), "ci_high": round(float(high), 2),
                            "distinguishable": bool(low > 0 or high < 0), "images": int(len(difference))})
    return comparisons


def to_markdown(table: list[dict], config: str, comparisons: Sequence[dict] = ()) -> str:
    paired = {c["row"]: c for c in comparisons}
    lines = [f"Ablation of `{config}` over seeds {table[0]['seeds']} (same data, schedule and steps for every row).", "",
             f"| row | top-1 (mean ± std) | per seed | vs {BASELINE} (95 % CI) | wall time per run |", "|---|--:|---|--:|--:|"]
    for r in table:
        c = paired.get(r["row"])
        versus = f"{c['difference']:+.2f} ({c['ci_low']:+.2f} to {c['ci_high']:+.2f})" if c else "–"
        lines.append(f"| {r['row']} | {r['mean']:.2f} ± {r['std']:.2f} % | {', '.join(f'{v:.1f}' for v in r['top1'])} | "
                     f"{versus} | {r['wall_time_s']:.0f} s |")
    if comparisons:
        lines += ["", f"Paired with {BASELINE} on the same {comparisons[0]['images']:,} evaluation images (top-1 points, "
                  "95 % bootstrap interval over images):", ""]
    for c in comparisons:
        verdict = ("distinguishable from noise (the interval excludes 0)" if c["distinguishable"]
                   else "not distinguishable from noise (the interval includes 0)")
        lines.append(f"- {c['row']} − {BASELINE}: {c['difference']:+.2f} points "
                     f"({c['ci_low']:+.2f} to {c['ci_high']:+.2f}): {verdict}.")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar([r["row"] for r in table], [r["mean"] for r in table], yerr=[r["std"] for r in table], capsize=4,
           color=["#9e9e9e", "#64b5f6", "#1e88e5", "#ffb74d"][: len(table)])
    low = min(r["mean"] - r["std"] for r in table)
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(r["mean"] + r["std"] for r in table) + 2))
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    options, extra = build_parser().parse_known_args(argv)
    if len(options.seeds) != len(set(options.seeds)):
        raise ConfigurationError(f"seeds: each seed once, got {options.seeds}")
    out = Path(options.output_dir)
    started = time.time()
    runs = run_rows(options.config, options.seeds, out, options.rows, extra)
    table = summarise(runs)
    comparisons = compare_with_baseline(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"config": options.config, "extra_options": extra, "rows": table,
                                                   "comparisons": comparisons, "runs": runs,
                                                   "total_wall_time_s": round(time.time() - started, 1)}, indent=2))
    markdown = to_markdown(table, options.config, comparisons)
    (out / "ablation.md").write_text(markdown)
    plot(table, out / "ablation.png", f"{Path(options.config).stem}: top-1 over seeds {options.seeds}")
    print(markdown)
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / 'ablation.png'} "
          f"in {time.time() - started:.0f} s")
    return 0
