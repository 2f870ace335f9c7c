"""The shipped evaluate modules: loaded by path with no network, values against naive computations."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
from helpers import naive_bootstrap

from hf_spectralkd.metrics import METRICS_DIR, TopKAccuracy, load_metric, load_predictions, percentile_bootstrap


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails loudly, and the Hub libraries are told they are offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    load_metric.cache_clear()  # load from the files again, under the guard
    yield
    load_metric.cache_clear()


def test_metric_modules_load_offline_and_match_a_naive_computation(no_network):
    rng = np.random.default_rng(3)
    n, classes = 37, 8
    labels = rng.integers(0, classes, size=n)
    top_k = np.stack([rng.permutation(classes)[:5] for _ in range(n)])
    top_k[:9, 0] = labels[:9]  # some right at top-1
    top_k[20, :] = -1  # a model output the data lacks never matches

    scores = load_metric("accuracy_topk").compute(predictions=top_k, references=labels)
    hit1 = [int(top_k[i][0] == labels[i]) for i in range(n)]
    hit5 = [int(labels[i] in list(top_k[i][:5])) for i in range(n)]
    assert scores["top1"] == pytest.approx(sum(hit1) / n) and scores["top5"] == pytest.approx(sum(hit5) / n)
    # the interval: the same seed gives the naive bootstrap's interval, each statistic on the same resamples
    assert (scores["top1_ci_low"], scores["top1_ci_high"]) == pytest.approx(naive_bootstrap(hit1, seed=0), abs=1e-12)
    assert (scores["top5_ci_low"], scores["top5_ci_high"]) == pytest.approx(naive_bootstrap(hit5, seed=0), abs=1e-12)
    assert scores["top1_ci_low"] < scores["top1"] < scores["top1_ci_high"]
    other = load_metric("accuracy_topk").compute(predictions=top_k, references=labels, seed=7, n_resamples=300)
    assert (other["top1_ci_low"], other["top1_ci_high"]) == pytest.approx(naive_bootstrap(hit1, 300, seed=7), abs=1e-12)
    assert set(load_metric("accuracy_topk").compute(predictions=top_k[:, :1], references=labels, n_resamples=0)) == {"top1"}

    student, teacher = rng.normal(size=(n, classes)), rng.normal(size=(n, classes))
    teacher[:10] = student[:10] * 3  # same argmax on these
    result = load_metric("agreement").compute(predictions=student, references=teacher, temperature=2.0)
    agree, kl = 0, 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        agree += s.index(max(s)) == t.index(max(t))
        zs, zt = sum(math.exp(v / 2) for v in s), sum(math.exp(v / 2) for v in t)
        kl += sum(math.exp(b / 2) / zt * math.log((math.exp(b / 2) / zt) / (math.exp(a / 2) / zs)) for a, b in zip(s, t))
    assert result["agreement"] == pytest.approx(agree / n) and result["kl"] == pytest.approx(kl / n, rel=1e-5)
    assert agree >= 10


def test_the_bootstrap_resamples_images_and_every_column_alike():
    rng = np.random.default_rng(0)
    values = rng.random((501, 2))  # an odd count: the chunked draws must still be the per-resample draws
    low, high = percentile_bootstrap(values, n_resamples=130, seed=4)
    for column in range(2):
        assert (low[column], high[column]) == pytest.approx(naive_bootstrap(values[:, column], 130, seed=4), abs=1e-12)
    with pytest.raises(ValueError, match="values"):
        percentile_bootstrap(np.zeros(0))


def test_trainer_metrics_keep_the_per_image_predictions(tmp_path):
    from transformers import EvalPrediction

    metric = TopKAccuracy(n_resamples=200)
    labels = np.array([0, 1, 2, 1, 0, 2])
    one_hot = np.eye(3)[labels]  # soft/one-hot labels are read by their argmax
    top_k = np.array([[0, 1, 2], [2, 1, 0], [2, 0, 1], [1, 0, 2], [1, 2, 0], [2, 1, 0]])
    scores = metric(EvalPrediction(predictions=top_k, label_ids=one_hot))
    assert scores["top1"] == pytest.approx(4 / 6) and "top5" not in scores and scores["top1_ci_high"] <= 1.0
    metric.save_predictions(tmp_path)
    saved_labels, saved_top_k = load_predictions(tmp_path)
    assert saved_labels.tolist() == labels.tolist() and saved_top_k.tolist() == top_k.tolist()
    assert sorted(p.name for p in METRICS_DIR.glob("*/*.py")) == ["accuracy_topk.py", "agreement.py"]
