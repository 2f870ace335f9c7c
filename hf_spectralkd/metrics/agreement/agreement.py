"""How closely a student follows its teacher: top-1 agreement and the mean KL(teacher ‖ student).

An ``evaluate`` module shipped inside hf_spectralkd and loaded by its path
(``hf_spectralkd.metrics.load_metric("agreement")``): nothing is read from the Hub.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Teacher-student agreement on the same images: the share of images on which both predict the same
class, and the mean over images of KL(softmax(t/T) ‖ softmax(s/T)), the divergence soft KD minimises.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the student's logits, ``N×K``.
    references: the teacher's logits in the same class order, ``N×K``.
    temperature: T, default 1.
Returns:
    agreement in [0, 1] and kl (nats, ≥ 0).
"""


def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class Agreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, predictions, references, temperature=1.0):
        student = np.asarray(predictions, dtype=np.float64)
        teacher = np.asarray(references, dtype=np.float64)
        if student.shape != teacher.shape or student.ndim != 2:
            raise ValueError(f"predictions and references: expected two N×K arrays, got {student.shape} and {teacher.shape}")
        log_s, log_t = _log_softmax(student / temperature), _log_softmax(teacher / temperature)
        kl = (np.exp(log_t) * (log_t - log_s)).sum(axis=1)
        return {"agreement": float((student.argmax(axis=1) == teacher.argmax(axis=1)).mean()), "kl": float(kl.mean())}
