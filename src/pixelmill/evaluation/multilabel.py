"""Multi-label evaluation: per-label thresholds, metrics, predictions and plots of one split.

Each sample carries a *set* of labels, given as a 0/1 indicator matrix ``y_true`` (N, L),
and the model outputs one independent sigmoid probability per label, ``probs`` (N, L).
Label ``j`` is predicted for a sample when ``probs[:, j] >= thresholds[j]``.

Every figure is computed with scikit-learn and returned as a plain ``int``/``float``/``None``
(None where a figure is undefined, e.g. the AUROC of a label without positives), so the
dict goes straight to JSON. Plots use the same Agg figures and DPI as ``plots.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    multilabel_confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)

from pixelmill.evaluation.metrics import METRICS_FILE, PREDICTIONS_FILE, _clean
from pixelmill.evaluation.rules import parse_rule, threshold_for

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

TASK = "multilabel"
MAX_F1 = "max_f1"
DEFAULT_THRESHOLD = 0.5  # for a label without positives, where no threshold maximises anything
LABEL_SEPARATOR = "|"

# Plot files, relative to the evaluation directory (metrics.json lists the ones written).
PLOTS_DIR = "plots"
ROC_PLOT = f"{PLOTS_DIR}/roc.png"
PR_PLOT = f"{PLOTS_DIR}/pr.png"
CONFUSION_PLOT = f"{PLOTS_DIR}/label_confusion.png"
COOCCURRENCE_PLOT = f"{PLOTS_DIR}/label_cooccurrence.png"
RELIABILITY_PLOT = f"{PLOTS_DIR}/reliability.png"
PLOT_TITLES = {
    RELIABILITY_PLOT: "Reliability diagram, every label's probabilities (eval.calibrate)",
    ROC_PLOT: "ROC curves per label",
    PR_PLOT: "Precision-recall curves per label",
    CONFUSION_PLOT: "TP / FP / FN / TN per label",
    COOCCURRENCE_PLOT: "Label co-occurrence (true labels)",
}


# ---------------------------------------------------------------------------------------------
# inputs


def _check_targets(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(y int64 (N, L) of 0/1, probs float64 (N, L) in [0, 1])`` or a ValueError naming the problem."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"y_true must be a (N, L) 0/1 indicator matrix, got shape {y.shape}")
    if p.shape != y.shape:
        raise ValueError(f"probs must have the shape of y_true {y.shape}, got {p.shape}")
    if y.shape[0] == 0:
        raise ValueError("cannot compute metrics on 0 samples")
    if y.shape[1] == 0:
        raise ValueError("need at least 1 label")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0 and 1 (one column per label)")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError("probs must be per-label probabilities in [0, 1] (apply a sigmoid first)")
    return y.astype(np.int64), p


def _check_all(y_true: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, labels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, p = _check_targets(y_true, probs)
    n_labels = y.shape[1]
    if len(labels) != n_labels:
        raise ValueError(f"probs has {n_labels} columns but there are {len(labels)} label names")
    if len(set(map(str, labels))) != len(labels):
        raise ValueError("label names must be unique")
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.shape != (n_labels,):
        raise ValueError(f"need one threshold per label ({n_labels}), got shape {np.shape(thresholds)}")
    if not np.isfinite(t).all():
        raise ValueError("thresholds must be finite numbers")
    return y, p, t


def label_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE over every (image, label) probability: sample-weighted mean |share of positives - mean probability| per bin."""
    y, p = np.asarray(y_true, dtype=np.float64).ravel(), np.asarray(probs, dtype=np.float64).ravel()
    bins = np.clip(np.ceil(p * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # bin i: (i/n, (i+1)/n]; 0 joins the first
    weight = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, y, n_bins) - np.bincount(bins, p, n_bins))  # per bin: |sum(y) - sum(p)|
    return float(gap.sum() / max(weight.sum(), 1))


def _predict(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0/1 predicted indicator matrix: label j where ``probs[:, j] >= thresholds[j]``."""
    return (probs >= thresholds[None, :]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# thresholds


def _max_f1_threshold(y: np.ndarray, scores: np.ndarray) -> float:
    """The probability value whose ``scores >= t`` gives the best F1 on ``y`` (ties: the higher one)."""
    if not y.any():
        return DEFAULT_THRESHOLD
    precision, recall, thresholds = precision_recall_curve(y, scores)
    # The curve's last point (precision 1, recall 0) belongs to no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    # F1 from float precision/recall: values equal in exact arithmetic may differ in the last bit.
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(thresholds[best].max())


def choose_thresholds(y_true: np.ndarray, probs: np.ndarray, rule: str | float) -> np.ndarray:
    """(N, L) 0/1 targets and (N, L) probabilities -> (L,) thresholds, one per label by ``rule``.

    ``"max_f1"``: the probability value ``t`` (one of the scores themselves, from
    ``precision_recall_curve``) whose ``probs >= t`` maximises that label's F1; on a tie the
    higher ``t`` wins. ``"youden"``, ``"sensitivity@X"``, ``"specificity@X"``: see
    ``evaluation/rules.py``. A label lacking the class a rule needs gets 0.5. A number in
    [0, 1] (or its text): that threshold for every label. Anything else: ValueError.
    """
    y, p = _check_targets(y_true, probs)
    if isinstance(rule, (int, float, np.integer, np.floating)) and not isinstance(rule, (bool, np.bool_)):
        value = float(rule)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"a fixed threshold must lie in [0, 1], got {rule!r}")
        return np.full(y.shape[1], value, dtype=np.float64)
    if not isinstance(rule, str):
        raise ValueError(f"threshold rule must be a rule name or a number in [0, 1], got {rule!r}")
    kind, _ = parse_rule(rule)
    out = []
    for j in range(y.shape[1]):
        chosen = _max_f1_threshold(y[:, j], p[:, j]) if kind == MAX_F1 else threshold_for(rule, y[:, j], p[:, j])
        out.append(DEFAULT_THRESHOLD if chosen is None else chosen)
    return np.array(out, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# metrics


def _per_label_scores(y: np.ndarray, p: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """AUROC per label (None without both classes) and average precision (None without positives)."""
    aucs: list[float | None] = []
    aps: list[float | None] = []
    for j in range(y.shape[1]):
        positives = int(y[:, j].sum())
        aucs.append(float(roc_auc_score(y[:, j], p[:, j])) if 0 < positives < y.shape[0] else None)
        aps.append(float(average_precision_score(y[:, j], p[:, j])) if positives > 0 else None)
    return aucs, aps


def _ratio_or_none(num: int, den: int) -> float | None:
    return float(num / den) if den else None


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, labels: list[str]) -> dict:
    """Every figure of a multi-label evaluation, JSON-ready (floats; None where undefined).

    Scalars: ``map`` (mean average precision over labels with >= 1 positive), ``auc_macro``
    (mean AUROC over labels with positives and negatives), micro/macro precision, recall and
    F1 (scikit-learn, ``zero_division=0``: a label never true and never predicted scores 0),
    ``subset_accuracy`` (exact label-set match), ``hamming_loss``, ``label_cardinality``
    (mean true labels per sample), ``no_label_share`` (samples with an empty true set) and ``n``.
    Also ``task``, ``labels``, ``thresholds`` {label: t} and ``per_label`` {label: {precision,
    recall, f1, auc, ap, support, threshold, tp, fp, fn, tn}}.
    """
    y, p, t = _check_all(y_true, probs, thresholds, labels)
    names = [str(name) for name in labels]
    y_pred = _predict(p, t)
    aucs, aps = _per_label_scores(y, p)

    scalars: dict[str, Any] = {
        "map": _mean_defined(aps),
        "auc_macro": _mean_defined(aucs),
        "f1_micro": f1_score(y, y_pred, average="micro", zero_division=0),
        "f1_macro": f1_score(y, y_pred, average="macro", zero_division=0),
    }
    for average in ("micro", "macro"):
        precision, recall, _, _ = precision_recall_fscore_support(y, y_pred, average=average, zero_division=0)
        scalars[f"precision_{average}"] = precision
        scalars[f"recall_{average}"] = recall
    scalars["subset_accuracy"] = accuracy_score(y, y_pred)
    scalars["hamming_loss"] = hamming_loss(y, y_pred)
    scalars["label_cardinality"] = float(y.sum(axis=1).mean())
    scalars["no_label_share"] = float((y.sum(axis=1) == 0).mean())

    metrics: dict[str, Any] = {"task": TASK, "n": int(y.shape[0]), "labels": names}
    metrics["thresholds"] = {name: float(t[j]) for j, name in enumerate(names)}
    metrics.update({key: _clean(value) for key, value in scalars.items()})

    precision, recall, f1, support = precision_recall_fscore_support(y, y_pred, average=None, zero_division=0)
    confusion = multilabel_confusion_matrix(y, y_pred)  # (L, 2, 2): [[tn, fp], [fn, tp]]
    metrics["per_label"] = {
        name: {
            "precision": _clean(precision[j]),
            "recall": _clean(recall[j]),
            "f1": _clean(f1[j]),
            "auc": _clean(aucs[j]),
            "ap": _clean(aps[j]),
            "support": int(support[j]),
            "threshold": float(t[j]),
            # the operating point in clinical terms (sensitivity = recall, PPV = precision)
            "sensitivity": _clean(recall[j]),
            "specificity": _ratio_or_none(confusion[j, 0, 0], confusion[j, 0, 0] + confusion[j, 0, 1]),
            "ppv": _clean(precision[j]),
            "npv": _ratio_or_none(confusion[j, 0, 0], confusion[j, 0, 0] + confusion[j, 1, 0]),
            "tp": int(confusion[j, 1, 1]),
            "fp": int(confusion[j, 0, 1]),
            "fn": int(confusion[j, 1, 0]),
            "tn": int(confusion[j, 0, 0]),
        }
        for j, name in enumerate(names)
    }
    return metrics


# ---------------------------------------------------------------------------------------------
# files


def _label_set(row: np.ndarray, names: list[str]) -> str:
    return LABEL_SEPARATOR.join(name for name, on in zip(names, row) if on)


def _write_predictions(path: Path, y: np.ndarray, p: np.ndarray, y_pred: np.ndarray, names: list[str], paths: list[str]) -> Path:
    """predictions.csv: path, true_labels, predicted_labels (``|``-joined, label order), p_<label>..."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true_labels", "predicted_labels", *[f"p_{name}" for name in names]])
        for sample, truth, predicted, row in zip(paths, y, y_pred, p):
            writer.writerow([sample, _label_set(truth, names), _label_set(predicted, names), *[f"{v:.6f}" for v in row]])
    return path


def write_multilabel_evaluation(
    out_dir: Path,
    y_true: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    labels: list[str],
    paths: list[str],
    bootstrap: int = 0,
    seed: int = 0,
    uncalibrated: np.ndarray | None = None,
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Write ``out_dir/metrics.json``, ``out_dir/predictions.csv`` and ``out_dir/plots/*.png``; return the metrics.

    The metrics are those of :func:`multilabel_metrics` plus ``ece`` (every (image, label)
    probability, 15 bins) and ``plots``: the PNG files written, relative to ``out_dir`` (ROC and
    PR curves per label, TP/FP/FN/TN per label, co-occurrence), and with ``bootstrap`` resamples
    (seeded by ``seed``) 95% intervals as ``ci95``. ``uncalibrated``: the probabilities before the
    per-label ``calibration`` (scale, bias) (``probs`` are after it); adds ``calibration`` and a reliability diagram.
    """
    from pixelmill.evaluation import plots  # matplotlib: only when plots are written

    y, p, t = _check_all(y_true, probs, thresholds, labels)
    if len(paths) != y.shape[0]:
        raise ValueError(f"got {len(paths)} sample paths for {y.shape[0]} predictions")
    names = [str(name) for name in labels]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    metrics = multilabel_metrics(y, p, t, names)
    metrics["ece"] = label_calibration_error(y, p)
    if uncalibrated is not None and calibration is not None:
        before = np.asarray(uncalibrated, dtype=np.float64)
        metrics["ece_uncalibrated"] = label_calibration_error(y, before)
        metrics["calibration"] = {
            "scale": {name: float(v) for name, v in zip(names, calibration[0])},
            "bias": {name: float(v) for name, v in zip(names, calibration[1])},
            "ece_before": metrics["ece_uncalibrated"], "ece_after": metrics["ece"],
        }
    if bootstrap > 0:
        from pixelmill.evaluation.bootstrap import confidence_intervals, multilabel_statistics

        metrics["ci95"] = confidence_intervals(multilabel_statistics(y, p, t), len(y), bootstrap, seed)
        metrics["bootstrap"] = {"resamples": int(bootstrap), "seed": int(seed), "level": 0.95}
    y_pred = _predict(p, t)
    _write_predictions(out_dir / PREDICTIONS_FILE, y, p, y_pred, names, [str(s) for s in paths])

    marked = {j: float(t[j]) for j in range(len(names))}  # each label's operating point on its curve
    plots.plot_roc_curves(y, p, names, out_dir / ROC_PLOT, title="ROC curves per label (AUC)", operating_points=marked)
    plots.plot_pr_curves(y, p, names, out_dir / PR_PLOT, title="Precision-recall curves per label")
    plot_label_confusion(metrics["per_label"], out_dir / CONFUSION_PLOT)
    plot_cooccurrence(y, names, out_dir / COOCCURRENCE_PLOT)
    metrics["plots"] = [ROC_PLOT, PR_PLOT, CONFUSION_PLOT, COOCCURRENCE_PLOT]
    (out_dir / RELIABILITY_PLOT).unlink(missing_ok=True)
    if "calibration" in metrics:
        plots.plot_reliability(y, before, p, out_dir / RELIABILITY_PLOT, multilabel=True)
        metrics["plots"].append(RELIABILITY_PLOT)

    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False), encoding="utf-8")
    log.info(
        "Multi-label evaluation of %d samples written to %s (mAP %s, micro F1 %.4f)",
        metrics["n"],
        out_dir,
        "n/a" if metrics["map"] is None else f"{metrics['map']:.4f}",
        metrics["f1_micro"],
    )
    return metrics


# ---------------------------------------------------------------------------------------------
# plots (Agg figures and DPI of plots.py)


def _annotate(ax: Axes, counts: np.ndarray, shares: np.ndarray, fontsize: float) -> None:
    """Write each count in its cell, white on dark cells; zero cells faded."""
    for (row, col), value in np.ndenumerate(counts):
        color = "white" if shares[row, col] > 0.6 else "black"
        ax.text(col, row, f"{int(value):,}", ha="center", va="center", fontsize=fontsize, color=color, alpha=0.35 if value == 0 else 1.0)


def plot_label_confusion(per_label: dict[str, dict[str, Any]], path: Path) -> Path:
    """Heat table of TP / FP / FN / TN per label at its threshold (shade: share of the samples)."""
    from pixelmill.evaluation.plots import _figure, _save, _short

    names = list(per_label)
    columns = ("tp", "fp", "fn", "tn")
    counts = np.array([[per_label[name][c] for c in columns] for name in names], dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    n = len(names)
    fig, axes = _figure(6.0, max(3.0, 0.32 * n + 1.6))
    ax = axes[0, 0]
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    _annotate(ax, counts, shares, fontsize=9 if n <= 20 else 7)
    ax.set_xticks(range(len(columns)), [c.upper() for c in columns])
    ax.set_yticks(range(n), [f"{_short(name)} (t={per_label[name]['threshold']:.2f})" for name in names])
    ax.tick_params(labelsize=9 if n <= 20 else 7, length=0)
    ax.xaxis.tick_top()
    fig.colorbar(image, ax=ax, shrink=0.8, fraction=0.05, label="share of samples")
    ax.set_title("Decisions per label at its threshold")
    return _save(fig, path)


def plot_cooccurrence(y: np.ndarray, labels: list[str], path: Path) -> Path:
    """Label co-occurrence of the true sets: cell (i, j) counts samples carrying both labels (diagonal: label frequency)."""
    from pixelmill.evaluation.plots import _figure, _save, _short

    counts = y.T @ y
    n = len(labels)
    peak = counts.max()
    shares = counts / peak if peak > 0 else np.zeros(counts.shape)
    side = max(4.5, 0.42 * n + 3.0)
    fig, axes = _figure(side + 1.0, side)
    ax = axes[0, 0]
    image = ax.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(peak), 1))
    if n <= 25:
        _annotate(ax, counts, shares, fontsize=10 if n <= 10 else 8 if n <= 18 else 6)
    short = [_short(name) for name in labels]
    ax.set_xticks(range(n), short)
    ax.set_yticks(range(n), short)
    for tick in ax.get_xticklabels():
        tick.set(rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", rotation_mode="anchor")
    ax.tick_params(labelsize=10 if n <= 12 else 8)
    fig.colorbar(image, ax=ax, shrink=0.8, fraction=0.05, label="samples")
    ax.set_title(f"Label co-occurrence ({y.shape[0]:,} samples, {int((y.sum(axis=1) == 0).sum()):,} without a label)")
    return _save(fig, path)
