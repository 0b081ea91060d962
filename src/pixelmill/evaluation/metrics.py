"""Classification metrics from predicted probabilities, and the files of one evaluation.

Everything is computed with scikit-learn over *all* classes (labels ``0..C-1``), so a
class absent from ``y_true`` still has its row/column in the confusion matrix and its
entry in ``per_class``. Every value returned is a plain ``int``/``float``/``None`` so
the dict goes straight to JSON.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

ECE_BINS = 15

# File names inside an evaluation directory; report.py reads these same names.
METRICS_FILE = "metrics.json"
REPORT_FILE = "classification_report.txt"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_FILE = "confusion_matrix.png"
CONFUSION_NORM_FILE = "confusion_matrix_normalized.png"
ROC_FILE = "roc.png"
PR_FILE = "pr.png"
MISCLASSIFIED_FILE = "misclassified.png"
RELIABILITY_FILE = "reliability.png"
EXPLAINED_FILE = "explained.png"  # Grad-CAM heatmaps of mistakes and correct predictions (explain/gallery.py)


def _check_inputs(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and return ``(y_true int64 (N,), probs float64 (N, C))``, rows renormalised."""
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must have shape (N, C) with N={y.shape[0]}, got {p.shape}")
    if p.shape[1] != n_classes:
        raise ValueError(f"probs has {p.shape[1]} columns but there are {n_classes} class names")
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes, got {n_classes}")
    if y.size == 0:
        raise ValueError("cannot compute metrics on 0 samples")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true must hold class indices in [0, {n_classes - 1}]")
    row_sums = p.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=1e-3) or p.min() < 0:
        raise ValueError("probs rows must be probabilities that sum to 1 (apply softmax first)")
    # float32 softmax rows can be off by ~1e-7; sklearn warns about that, so make them exact.
    return y, p / row_sums[:, None]


def _clean(value: Any) -> Any:
    """Plain Python number (NaN/inf -> None) for JSON."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: sample-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    # Bin i holds confidences in (i/n, (i+1)/n]; confidence is always > 0 for C >= 1.
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def _per_class_auc(y_true: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC AUC per class; None where a class has no positives or no negatives."""
    aucs: list[float | None] = []
    for c in range(probs.shape[1]):
        positives = y_true == c
        if positives.all() or not positives.any():
            aucs.append(None)
        else:
            aucs.append(float(roc_auc_score(positives, probs[:, c])))
    return aucs


Decision = tuple[int, float]  # a binary model's operating point: (positive class index, threshold on its probability)


def decide(probs: np.ndarray, decision: Decision | None) -> np.ndarray:
    """Predicted class per row: the argmax, or for a binary ``decision`` the positive class where its probability reaches the threshold."""
    if decision is None:
        return probs.argmax(axis=1)
    pos, threshold = decision
    return np.where(probs[:, pos] >= threshold, pos, 1 - pos)


def operating_point(y_true: np.ndarray, probs: np.ndarray, pos: int, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV (and the counts) of deciding class ``pos`` where ``probs[:, pos] >= threshold``."""
    truth = np.asarray(y_true) == pos
    decided = np.asarray(probs)[:, pos] >= threshold
    tp, fp = int((truth & decided).sum()), int((~truth & decided).sum())
    fn, tn = int((truth & ~decided).sum()), int((~truth & ~decided).sum())

    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    top_k: Sequence[int] = (1, 5),
    decision: Decision | None = None,
) -> dict:
    """Metrics of predicted probabilities ``probs`` (N, C) against integer labels ``y_true`` (N,).

    Returns accuracy, balanced accuracy, macro/weighted precision/recall/F1, one-vs-rest
    ``auc_macro`` (over classes present in ``y_true``; None if none qualifies), log loss,
    ECE (15 bins), ``top{k}_acc`` for each k < C, ``n``, ``per_class`` and ``confusion_matrix``.
    A binary ``decision`` (positive index, threshold) decides the predicted class instead of the
    argmax and adds ``sensitivity``, ``specificity``, ``ppv``, ``npv`` and ``operating_point``.
    """
    y, p = _check_inputs(y_true, probs, class_names)
    labels = list(range(len(class_names)))
    y_pred = decide(p, decision)

    with warnings.catch_warnings():
        # balanced accuracy averages recall over the classes present in y_true only (by design)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = balanced_accuracy_score(y, y_pred)
    metrics: dict[str, Any] = {"accuracy": accuracy_score(y, y_pred), "balanced_accuracy": balanced}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y, y_pred, labels=labels, average=average, zero_division=0
        )
        metrics[f"precision_{average}"] = precision
        metrics[f"recall_{average}"] = recall
        metrics[f"f1_{average}"] = f1

    aucs = _per_class_auc(y, p)
    defined = [a for a in aucs if a is not None]
    metrics["auc_macro"] = float(np.mean(defined)) if defined else None
    metrics["log_loss"] = log_loss(y, p, labels=labels)
    metrics["ece"] = expected_calibration_error(y, p)
    # sklearn wants the positive-class score (N,) when there are only two classes
    scores = p[:, 1] if len(class_names) == 2 else p
    for k in sorted(set(int(k) for k in top_k)):
        if 1 <= k < len(class_names):
            metrics[f"top{k}_acc"] = top_k_accuracy_score(y, scores, k=k, labels=labels)
    metrics["n"] = int(y.shape[0])
    point = operating_point(y, p, *decision) if decision is not None else None
    if point is not None:
        metrics |= {k: point[k] for k in ("sensitivity", "specificity", "ppv", "npv", "threshold")}
    metrics = {key: _clean(value) for key, value in metrics.items()}
    if point is not None:
        metrics["operating_point"] = {"positive": class_names[decision[0]], **point}

    precision, recall, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=labels, average=None, zero_division=0
    )
    metrics["per_class"] = {
        name: {
            "precision": _clean(precision[i]),
            "recall": _clean(recall[i]),
            "f1": _clean(f1[i]),
            "support": int(support[i]),
            "auc": _clean(aucs[i]),
        }
        for i, name in enumerate(class_names)
    }
    metrics["confusion_matrix"] = confusion_matrix(y, y_pred, labels=labels).astype(int).tolist()
    return metrics


def classification_report_text(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], decision: Decision | None = None) -> str:
    """scikit-learn's text classification report over all classes (zero_division=0)."""
    y, p = _check_inputs(y_true, probs, class_names)
    return classification_report(
        y,
        decide(p, decision),
        labels=list(range(len(class_names))),
        target_names=[str(name) for name in class_names],
        zero_division=0,
        digits=4,
    )


def _write_predictions(
    path: Path, y_true: np.ndarray, probs: np.ndarray, class_names: list[str], sample_ids: list[str], decision: Decision | None = None
) -> Path:
    """predictions.csv: path, true, predicted, confidence, p_<class>... (one row per sample)."""
    y_pred = decide(probs, decision)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "true", "predicted", "confidence", *[f"p_{c}" for c in class_names]])
        for sample_id, t, pred, row in zip(sample_ids, y_true, y_pred, probs):
            writer.writerow(
                [sample_id, class_names[t], class_names[pred], f"{row[pred]:.6f}", *[f"{v:.6f}" for v in row]]
            )
    return path


def write_evaluation(
    out_dir: Path,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    sample_ids: list[str],
    top_k: Sequence[int] = (1, 5),
    images: Callable[[str], Image.Image] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    uncalibrated: np.ndarray | None = None,
    temperature: float = 1.0,
    decision: Decision | None = None,
) -> dict:
    """Write metrics.json, classification_report.txt, predictions.csv and plots into ``out_dir``.

    ``bootstrap`` resamples (seeded by ``seed``) add 95% intervals as ``ci95`` (``evaluation/bootstrap.py``).
    ``uncalibrated``: the probabilities before temperature scaling by ``temperature`` (``probs`` are
    after it); adds ``calibration`` (ECE before and after) and reliability.png.
    ``decision``: a binary model's (positive index, threshold); its decisions replace the argmax
    everywhere and the ROC plot marks the point.
    Plots: confusion_matrix.png, confusion_matrix_normalized.png, roc.png, pr.png, and
    misclassified.png when ``images`` (sample id -> PIL image) is given and there are mistakes.
    Returns the metrics dict (as in ``compute_metrics``).
    """
    from pixelmill.evaluation import plots  # matplotlib is heavy; import only when writing

    y, p = _check_inputs(y_true, probs, class_names)
    if len(sample_ids) != y.shape[0]:
        raise ValueError(f"got {len(sample_ids)} sample ids for {y.shape[0]} predictions")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    metrics = compute_metrics(y, p, class_names, top_k=top_k, decision=decision)
    if bootstrap > 0:
        from pixelmill.evaluation.bootstrap import confidence_intervals, single_label_statistics

        metrics["ci95"] = confidence_intervals(single_label_statistics(y, p, decision), len(y), bootstrap, seed)
        metrics["bootstrap"] = {"resamples": int(bootstrap), "seed": int(seed), "level": 0.95}
    (out_dir / RELIABILITY_FILE).unlink(missing_ok=True)
    if uncalibrated is not None:
        before = np.asarray(uncalibrated, dtype=np.float64)
        metrics["calibration"] = {"temperature": float(temperature), "ece_before": expected_calibration_error(y, before), "ece_after": metrics["ece"]}
        metrics["ece_uncalibrated"] = metrics["calibration"]["ece_before"]  # a row of the report's table, beside ece
        plots.plot_reliability(y, before, p, out_dir / RELIABILITY_FILE)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False), encoding="utf-8")
    (out_dir / REPORT_FILE).write_text(classification_report_text(y, p, class_names, decision), encoding="utf-8")
    _write_predictions(out_dir / PREDICTIONS_FILE, y, p, class_names, sample_ids, decision)

    cm = np.asarray(metrics["confusion_matrix"])
    plots.plot_confusion_matrix(cm, class_names, out_dir / CONFUSION_FILE, normalize=False)
    plots.plot_confusion_matrix(cm, class_names, out_dir / CONFUSION_NORM_FILE, normalize=True)
    plots.plot_roc_curves(y, p, class_names, out_dir / ROC_FILE, operating_points=dict([decision]) if decision else None)
    plots.plot_pr_curves(y, p, class_names, out_dir / PR_FILE)
    # A gallery left over from an earlier evaluation in the same directory would be wrong now.
    (out_dir / MISCLASSIFIED_FILE).unlink(missing_ok=True)
    if images is not None:
        plots.plot_misclassified(sample_ids, y, p, class_names, images, out_dir / MISCLASSIFIED_FILE, predicted=decide(p, decision))
    log.info(
        "Evaluation of %d samples written to %s (accuracy %.4f)", metrics["n"], out_dir, metrics["accuracy"]
    )
    return metrics
