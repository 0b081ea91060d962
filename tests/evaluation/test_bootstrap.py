"""95% bootstrap intervals: every resample's figure equals scikit-learn's on the resampled arrays, intervals are
seeded, contain the point estimate and narrow as the test set grows; runs and reports carry them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from pixelmill.evaluation.bootstrap import confidence_intervals, multilabel_statistics, resample_counts, single_label_statistics
from pixelmill.evaluation.metrics import write_evaluation


def _single(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[y]
    p = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2)  # rounded: ties, as real scores have
    return y, p / p.sum(1, keepdims=True)


def _drawn(w_row: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(w_row)), w_row.astype(int))


@pytest.mark.parametrize("classes", [2, 5])
def test_each_resample_equals_scikit_learn(classes: int) -> None:
    y, p = _single(240, classes)
    stats = single_label_statistics(y, p)
    w = resample_counts(len(y), 6, seed=3)
    for row in w:
        idx = _drawn(row)
        yy, pp = y[idx], p[idx]
        pred = pp.argmax(1)
        auc = skm.roc_auc_score(yy, pp[:, 1]) if classes == 2 else skm.roc_auc_score(yy, pp, multi_class="ovr", average="macro")
        expected = {
            "accuracy": skm.accuracy_score(yy, pred),
            "balanced_accuracy": skm.balanced_accuracy_score(yy, pred),
            "f1_macro": skm.f1_score(yy, pred, average="macro"),
            "auc_macro": auc,
        }
        if classes == 2:
            expected |= {"sensitivity": skm.recall_score(yy, pred), "specificity": skm.recall_score(yy, pred, pos_label=0)}
        assert set(stats) == set(expected)
        for name, value in expected.items():
            assert stats[name](row[None, :])[0] == pytest.approx(value, abs=1e-12), name


def test_each_multilabel_resample_equals_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((200, 6)) < 0.3).astype(float)
    p = np.clip(0.4 * y + 0.6 * rng.random((200, 6)), 0, 1).round(2)
    t = np.linspace(0.35, 0.6, 6)
    stats = multilabel_statistics(y, p, t)
    for row in resample_counts(len(y), 5, seed=4):
        idx = _drawn(row)
        yy, pp = y[idx], p[idx]
        decided = (pp >= t).astype(int)
        assert stats["map"](row[None])[0] == pytest.approx(skm.average_precision_score(yy, pp, average="macro"), abs=1e-12)
        assert stats["auc_macro"](row[None])[0] == pytest.approx(skm.roc_auc_score(yy, pp, average="macro"), abs=1e-12)
        assert stats["f1_micro"](row[None])[0] == pytest.approx(skm.f1_score(yy, decided, average="micro"), abs=1e-12)
        assert stats["f1_macro"](row[None])[0] == pytest.approx(skm.f1_score(yy, decided, average="macro", zero_division=0), abs=1e-12)


def test_intervals_are_seeded_contain_the_estimate_and_narrow_with_more_samples() -> None:
    widths = []
    for n in (150, 1500):
        y, p = _single(n, 3, seed=n)
        ci = confidence_intervals(single_label_statistics(y, p), n, 1000, seed=7)
        point = skm.accuracy_score(y, p.argmax(1))
        assert ci["accuracy"][0] <= point <= ci["accuracy"][1]
        auc = skm.roc_auc_score(y, p, multi_class="ovr")
        assert ci["auc_macro"][0] <= auc <= ci["auc_macro"][1]
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
        assert ci == confidence_intervals(single_label_statistics(y, p), n, 1000, seed=7)
        assert ci != confidence_intervals(single_label_statistics(y, p), n, 1000, seed=8)
    assert widths[1] < 0.5 * widths[0]  # ~1/sqrt(10) in theory


def test_write_evaluation_adds_ci95_only_when_asked(tmp_path: Path) -> None:
    y, p = _single(120, 3)
    ids = [f"s{i}" for i in range(len(y))]
    without = write_evaluation(tmp_path / "a", y, p, ["a", "b", "c"], ids)
    assert "ci95" not in without
    with_ci = write_evaluation(tmp_path / "b", y, p, ["a", "b", "c"], ids, bootstrap=200, seed=1)
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["ci95"] == with_ci["ci95"] and saved["bootstrap"] == {"resamples": 200, "seed": 1, "level": 0.95}
    assert set(saved["ci95"]) == {"accuracy", "balanced_accuracy", "f1_macro", "auc_macro"}


def test_a_trained_run_reports_intervals(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "eval" / "test" / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "auc_macro"):
        low, high = metrics["ci95"][key]
        assert low <= metrics[key] <= high and high - low > 0
    assert metrics["bootstrap"]["resamples"] == 1000
    report = (trained_run / "report.html").read_text()
    assert f'<span class="ci">[{metrics["ci95"]["accuracy"][0]:.4f}' in report
