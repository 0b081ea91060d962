"""Bootstrap confidence intervals of test metrics: seeded, vectorised over resamples.

A resample is a row of counts ``W`` (B, N): how often each test sample was drawn (multinomial,
seeded). Every metric is then a weighted sum over samples, so one matrix product (or one
cumulative sum over the sorted scores, for AUROC and average precision) computes it for all B
resamples at once: 1,000 resamples of 10,000 samples take a fraction of a second, where calling
scikit-learn per resample takes minutes. The weighted formulas give exactly what scikit-learn
gives on the resampled arrays (tests/evaluation/test_bootstrap.py checks it resample by resample);
scikit-learn itself has no bootstrap, and ``scipy.stats.bootstrap`` needs a statistic that is
already vectorised, which is what this module is.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

LEVEL = 0.95


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) float64: how often each of ``n`` samples is drawn in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def weighted_auc(w: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` for 0/1 ``positive`` under each row of counts ``w`` (B,); NaN where one class is absent.

    Mann-Whitney with ties counted half, as ``roc_auc_score`` does.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    pos = np.add.reduceat(w[:, order] * positive[order], starts, axis=1)  # (B, distinct scores)
    neg = np.add.reduceat(w[:, order] * (1 - positive[order]), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    return _ratio(wins, pos.sum(axis=1) * neg.sum(axis=1))


def weighted_ap(w: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision (``average_precision_score``'s step sum) under each row of counts ``w``; NaN without positives."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    pos = np.add.reduceat(w[:, order] * positive[order], starts, axis=1)
    neg = np.add.reduceat(w[:, order] * (1 - positive[order]), starts, axis=1)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    precision = _ratio(tp, tp + fp)
    total = pos.sum(axis=1)
    return _ratio((pos * np.nan_to_num(precision)).sum(axis=1), total)


def single_label_statistics(
    y_true: np.ndarray, probs: np.ndarray, decision: tuple[int, float] | None = None
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Metric name -> f(W) -> (B,) for a single-label evaluation (predicted class: the argmax, or a
    binary model's ``decision`` (positive index, threshold); its sensitivity and specificity are of that positive class)."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = p.shape[1]
    truth = np.eye(n_classes)[y]  # (N, C)
    pos = decision[0] if decision else 1
    chosen = p.argmax(axis=1) if decision is None else np.where(p[:, pos] >= decision[1], pos, 1 - pos)
    predicted = np.eye(n_classes)[chosen]

    def per_class(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return w @ (truth * predicted), w @ truth, w @ predicted  # tp, support, predicted counts (B, C)

    def balanced_accuracy(w: np.ndarray) -> np.ndarray:
        tp, support, _ = per_class(w)
        return np.nanmean(_ratio(tp, support), axis=1)

    def f1_macro(w: np.ndarray) -> np.ndarray:
        tp, support, made = per_class(w)
        seen = (support + made) > 0  # labels in y_true or y_pred, as scikit-learn averages them
        f1 = np.where(seen, np.nan_to_num(_ratio(2 * tp, support + made)), np.nan)
        return np.nanmean(f1, axis=1)

    def auc_macro(w: np.ndarray) -> np.ndarray:
        if n_classes == 2:
            return weighted_auc(w, truth[:, pos], p[:, pos])
        return np.mean([weighted_auc(w, truth[:, c], p[:, c]) for c in range(n_classes)], axis=0)

    stats = {
        "accuracy": lambda w: (w @ (truth * predicted).sum(axis=1)) / w.sum(axis=1),
        "balanced_accuracy": balanced_accuracy,
        "f1_macro": f1_macro,
        "auc_macro": auc_macro,
    }
    if n_classes == 2:  # the positive class: the finding, the defect (the second class unless the decision names it)
        stats["sensitivity"] = lambda w: _ratio(*[m[:, pos] for m in per_class(w)[:2]])
        stats["specificity"] = lambda w: _ratio(*[m[:, 1 - pos] for m in per_class(w)[:2]])
    return stats


def multilabel_statistics(y_true: np.ndarray, probs: np.ndarray, thresholds: np.ndarray) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Metric name -> f(W) -> (B,) for a multi-label evaluation at ``thresholds``."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    decided = (p >= np.asarray(thresholds)[None, :]).astype(np.float64)
    labels = range(y.shape[1])

    def counts(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return w @ (y * decided), w @ y, w @ decided  # tp, support, predicted (B, L)

    def f1_micro(w: np.ndarray) -> np.ndarray:
        tp, support, made = counts(w)
        return _ratio(2 * tp.sum(axis=1), support.sum(axis=1) + made.sum(axis=1))

    def f1_macro(w: np.ndarray) -> np.ndarray:
        tp, support, made = counts(w)
        return np.nan_to_num(_ratio(2 * tp, support + made)).mean(axis=1)  # zero_division=0 over every label

    return {
        "map": lambda w: np.nanmean([weighted_ap(w, y[:, j], p[:, j]) for j in labels], axis=0),
        "auc_macro": lambda w: np.nanmean([weighted_auc(w, y[:, j], p[:, j]) for j in labels], axis=0),
        "f1_micro": f1_micro,
        "f1_macro": f1_macro,
    }


def confidence_intervals(
    statistics: dict[str, Callable[[np.ndarray], np.ndarray]], n: int, resamples: int = 1000, seed: int = 0, level: float = LEVEL
) -> dict[str, list[float | None]]:
    """Percentile bootstrap intervals ``{metric: [low, high]}`` (None when a metric is undefined in most resamples)."""
    if resamples <= 0 or n == 0:
        return {}
    w = resample_counts(n, resamples, seed)
    out: dict[str, list[float | None]] = {}
    tail = 100 * (1 - level) / 2
    for name, statistic in statistics.items():
        values = np.asarray(statistic(w), dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) < resamples / 2:
            out[name] = [None, None]
        else:
            low, high = np.percentile(values, [tail, 100 - tail])
            out[name] = [float(low), float(high)]
    return out
