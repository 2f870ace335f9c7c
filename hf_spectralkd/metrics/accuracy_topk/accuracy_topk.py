"""Top-1 and top-5 accuracy of an image classifier, with a percentile-bootstrap interval over images.

An ``evaluate`` module shipped inside hf_spectralkd and loaded by its path
(``hf_spectralkd.metrics.load_metric("accuracy_topk")``): nothing is read from the Hub.
"""

import datasets
import evaluate
import numpy as np

# evaluate copies this file into its modules cache and checks each import it finds, one per line:
# the interval is the package's own computation (imported from the installed hf_spectralkd).
from hf_spectralkd.metrics.bootstrap import CONFIDENCE_LEVEL, N_RESAMPLES, SEED, percentile_bootstrap

_DESCRIPTION = """
Top-k accuracy: the share of images whose label is among the model's k best classes (k = 1 and 5),
each with a percentile-bootstrap interval over the evaluation images (seeded, hence reproducible).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per image, class indices best first (``N×k``, k ≥ 1; top-5 needs k ≥ 5). A class
        index of -1 never matches a label.
    references: per image, the label (``N`` integers).
    confidence_level: the interval's coverage, default 0.95; ``n_resamples=0`` skips the interval.
    n_resamples: bootstrap resamples, default 1000.
    seed: the bootstrap generator's seed, default 0.
Returns:
    top1, top5 (when k ≥ 5) in [0, 1], and top1_ci_low, top1_ci_high, top5_ci_low, top5_ci_high.
"""


class AccuracyTopk(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, confidence_level=CONFIDENCE_LEVEL, n_resamples=N_RESAMPLES, seed=SEED):
        top_k = np.asarray(predictions, dtype=np.int64).reshape(len(references), -1)
        labels = np.asarray(references, dtype=np.int64).reshape(-1, 1)
        names = ["top1"] + (["top5"] if top_k.shape[1] >= 5 else [])
        correct = np.stack([(top_k[:, :k] == labels).any(axis=1) for k in (1, 5)[: len(names)]], axis=1)
        result = {name: float(value) for name, value in zip(names, correct.mean(axis=0))}
        if n_resamples:
            low, high = percentile_bootstrap(correct, confidence_level, n_resamples, seed)
            for name, lo, hi in zip(names, low, high):
                result[f"{name}_ci_low"], result[f"{name}_ci_high"] = float(lo), float(hi)
        return result
