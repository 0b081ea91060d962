"""Evaluation and training plots written as PNG files (matplotlib, Agg backend).

Every function takes the output path, writes one PNG and returns that path (or None
when there is nothing to draw). Figures are sized by the number of classes so that
2 to ~30 classes stay readable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from pixelmill.errors import PixelmillError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from PIL import Image

log = logging.getLogger(__name__)

DPI = 110
MAX_LABEL_CHARS = 22
GRID_MARGIN = 0.08  # inches around and between the cells of an image grid, and above its title


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, layout: str | None = "constrained") -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure on the Agg backend, with a 2-D array of axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _image_grid(cell_width: float, cell_height: float, nrows: int, ncols: int, caption: float = 0.4, title: float = 0.45) -> tuple[Figure, np.ndarray]:
    """A figure of ``nrows`` x ``ncols`` image cells (inches each, ``caption`` inches of it above the
    image), axes off, ``title`` inches for a suptitle (:func:`_grid_title`).

    Fixed margins instead of the constrained layout engine: a gallery has no tick labels to fit,
    and the engine's layout passes cost 1.3-2.2 s on a 24-image gallery, at the end of every run.
    """
    fig, axes = _figure(cell_width * ncols, cell_height * nrows + title, nrows=nrows, ncols=ncols, layout=None)
    width, height = fig.get_size_inches()
    margin = GRID_MARGIN
    fig.subplots_adjust(
        left=margin / width, right=1 - margin / width, bottom=margin / height, top=1 - (title + caption) / height,
        wspace=2 * margin / (cell_width - 2 * margin), hspace=caption / (cell_height - caption),
    )
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _grid_title(fig: Figure, text: str) -> None:
    fig.suptitle(text, fontsize=11, y=1 - GRID_MARGIN / fig.get_size_inches()[1], va="top")


def _save(fig: Figure, path: Path, photos: bool = False) -> Path:
    """Write ``fig`` as PNG. ``photos``: a gallery of pictures, stored with zlib's fastest level - photos barely
    compress (a 24-image gallery: 2.4 MB at the default level 6, 2.9 MB at 1) and level 6 spent 0.7 s on it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white", pil_kwargs={"compress_level": 1} if photos else None)
    log.debug("Wrote plot %s", path)
    return path


def _short(name: str, limit: int = MAX_LABEL_CHARS) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def _colors(n: int) -> list:
    """Distinct colours: tab10/tab20 while they last, then an evenly sampled turbo map."""
    import matplotlib

    cmap_name = "tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"
    cmap = matplotlib.colormaps[cmap_name]
    if cmap_name == "turbo":
        return [cmap(x) for x in np.linspace(0.05, 0.95, n)]
    return [cmap(i) for i in range(n)]


def _legend(ax: Axes, n_entries: int, loc: str) -> None:
    """Legend inside at ``loc`` for a few classes, outside on the right (1-2 columns) for many."""
    if n_entries <= 11:
        ax.legend(loc=loc, fontsize=8, framealpha=0.9)
    else:
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=7 if n_entries > 20 else 8,
            ncol=1 if n_entries <= 18 else 2,
            frameon=False,
        )


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path, normalize: bool) -> Path:
    """Confusion matrix heat map (rows true, columns predicted), counts or row-normalised rates."""
    cm = np.asarray(cm, dtype=np.float64)
    n = len(class_names)
    if normalize:
        row_sums = cm.sum(axis=1, keepdims=True)
        # rows of classes absent from y_true stay 0 instead of NaN
        values = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)
        fmt, title = ".2f", "Confusion matrix (normalised by true class)"
    else:
        values = cm.astype(np.int64)
        fmt, title = "d", "Confusion matrix (counts)"
    side = max(5.0, 0.42 * n + 3.0)
    fig, axes = _figure(side + 1.0, side)
    ax = axes[0, 0]
    display = ConfusionMatrixDisplay(values, display_labels=[_short(c) for c in class_names])
    display.plot(
        ax=ax,
        cmap="Blues",
        values_format=fmt,
        colorbar=False,
        text_kw={"fontsize": 10 if n <= 10 else 8 if n <= 18 else 6},
        im_kw={"vmin": 0, "vmax": 1} if normalize else None,
    )
    fig.colorbar(display.im_, ax=ax, shrink=0.8, fraction=0.05)
    # fade empty cells so the mistakes stand out in large matrices
    for text, value in zip(display.text_.ravel(), values.ravel()):
        if value == 0:
            text.set_alpha(0.3)
    for label in ax.get_xticklabels():
        label.set(rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", rotation_mode="anchor")
    tick_size = 10 if n <= 12 else 8
    ax.tick_params(labelsize=tick_size)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title)
    return _save(fig, path)


def _indicator(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, C) 0/1 targets: multi-label targets as given, class indices one-hot."""
    y = np.asarray(y_true)
    if y.ndim == 2:
        return (y > 0).astype(np.int64)
    return (y.astype(np.int64)[:, None] == np.arange(n_classes)[None, :]).astype(np.int64)


def _present(y: np.ndarray) -> list[int]:
    """Columns of a (N, C) indicator with at least one positive and one negative (curves are defined)."""
    counts = y.sum(axis=0)
    return [c for c in range(y.shape[1]) if 0 < counts[c] < len(y)]


def _curve_axes(n_classes: int) -> tuple[Figure, Axes]:
    width = 7.0 if n_classes <= 11 else 9.5 if n_classes <= 18 else 11.0
    fig, axes = _figure(width, 6.0)
    return fig, axes[0, 0]


def plot_roc_curves(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    path: Path,
    title: str = "ROC curves, one-vs-rest (AUC)",
    operating_points: dict[int, float] | None = None,
) -> Path:
    """ROC curve per class (one-vs-rest; for (N, C) multi-label targets per label) with both
    positives and negatives, AUC in the legend, plus the macro average.

    ``operating_points`` {class index: threshold} marks where each decision threshold sits on its curve.
    """
    y = _indicator(y_true, len(class_names))
    probs = np.asarray(probs, dtype=np.float64)
    present = _present(y)
    fig, ax = _curve_axes(len(present) + 1)
    colors = _colors(len(class_names))
    fpr_grid = np.linspace(0.0, 1.0, 501)
    tprs = []
    for c in present:
        fpr, tpr, _ = roc_curve(y[:, c], probs[:, c])
        score = roc_auc_score(y[:, c], probs[:, c])
        tprs.append(np.interp(fpr_grid, fpr, tpr))
        ax.plot(fpr, tpr, color=colors[c], lw=1.3, alpha=0.85, label=f"{_short(class_names[c])} ({score:.3f})")
        if operating_points and c in operating_points:
            t = operating_points[c]
            decided = probs[:, c] >= t
            sens, fpr_at = decided[y[:, c] == 1].mean(), decided[y[:, c] == 0].mean()
            ax.plot([fpr_at], [sens], marker="o", ms=8, mfc="none", mew=2, color=colors[c], ls="none",
                    label=f"t={t:.3g}: sens {sens:.2f}, spec {1 - fpr_at:.2f}")
    if tprs:
        mean_tpr = np.mean(tprs, axis=0)
        mean_tpr[0] = 0.0
        ax.plot(
            fpr_grid, mean_tpr, color="black", lw=2.4, ls="--",
            label=f"macro-average ({auc(fpr_grid, mean_tpr):.3f})",
        )
    else:
        ax.text(0.5, 0.5, "ROC undefined: no class has both positives and negatives", ha="center", va="center")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.02), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if tprs:
        _legend(ax, len(present) + 1 + len(operating_points or {}), "lower right")
    return _save(fig, path)


def plot_pr_curves(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], path: Path, title: str = "Precision-recall curves"
) -> Path:
    """Precision-recall curve per class (for (N, C) multi-label targets per label) with both
    positives and negatives, average precision (AP) in the legend and the mean AP in the title."""
    y = _indicator(y_true, len(class_names))
    probs = np.asarray(probs, dtype=np.float64)
    present = _present(y)
    fig, ax = _curve_axes(len(present))
    colors = _colors(len(class_names))
    aps = []
    for c in present:
        precision, recall, _ = precision_recall_curve(y[:, c], probs[:, c])
        ap = average_precision_score(y[:, c], probs[:, c])
        aps.append(ap)
        ax.plot(
            recall, precision, drawstyle="steps-post", color=colors[c], lw=1.3, alpha=0.85,
            label=f"{_short(class_names[c])} (AP {ap:.3f})",
        )
    if aps:
        title += f" (mean AP {np.mean(aps):.3f})"
        _legend(ax, len(present), "lower left")
    else:
        ax.text(0.5, 0.5, "PR curves undefined: no class has both positives and negatives", ha="center", va="center")
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.02), xlabel="Recall", ylabel="Precision")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_reliability(y_true: np.ndarray, before: np.ndarray, after: np.ndarray, path: Path, n_bins: int = 15, multilabel: bool = False) -> Path:
    """Reliability diagram: accuracy against confidence per equal-width bin, before and after calibration.

    ``multilabel``: (N, L) 0/1 targets; every (image, label) probability against the share of positives.
    """
    y = np.asarray(y_true, dtype=np.int64)
    fig, axes = _figure(6.0, 5.5)
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="perfectly calibrated")
    for probs, name, color in ((before, "before", "#d62728"), (after, "after temperature scaling", "#1f77b4")):
        probs = np.asarray(probs, dtype=np.float64)
        if multilabel:
            confidence, correct = probs.ravel(), y.ravel().astype(bool)
        else:
            confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
        bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
        used = np.unique(bins)
        ax.plot(
            [confidence[bins == b].mean() for b in used], [correct[bins == b].mean() for b in used],
            marker="o", lw=1.5, color=color, label=name,
        )
    if multilabel:
        ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.02), xlabel="Predicted probability", ylabel="Share of positives")
    else:
        ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.02), xlabel="Confidence", ylabel="Accuracy")
    ax.set_title("Reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return _save(fig, path)


def _metric_panels(columns: list[str]) -> dict[str, list[str]]:
    """Group metrics.csv columns into the loss, accuracy/F1 and learning-rate panels."""
    per_epoch = [c for c in columns if c not in ("epoch", "step") and not c.endswith("_step")]
    leaf = {c: c.rsplit("/", 1)[-1].lower() for c in per_epoch}
    is_lr = {c: leaf[c] == "lr" or leaf[c].startswith(("lr-", "lr_")) for c in per_epoch}
    return {
        "Loss": [c for c in per_epoch if "loss" in leaf[c] and not is_lr[c]],
        "Accuracy / F1": [c for c in per_epoch if ("acc" in leaf[c] or "f1" in leaf[c]) and not is_lr[c]],
        "Learning rate": [c for c in per_epoch if is_lr[c]],
    }


def plot_training_curves(metrics_csv: Path, path: Path) -> Path | None:
    """Loss, accuracy/F1 and learning-rate panels per epoch from a run's metrics.csv.

    Lightning's CSV logger may write train and val values of one epoch on separate rows;
    the last non-empty value per epoch and column is used. None if nothing can be drawn.
    """
    import pandas as pd

    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file() or metrics_csv.stat().st_size == 0:
        return None
    try:
        frame = pd.read_csv(metrics_csv)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        log.warning("Cannot read %s (%s); no training curves", metrics_csv, exc)
        return None
    if frame.empty:
        return None
    frame = frame.apply(pd.to_numeric, errors="coerce")
    if "epoch" in frame.columns and frame["epoch"].notna().any():
        frame = frame.dropna(subset=["epoch"]).groupby("epoch", sort=True).last()
    else:
        frame.index = pd.RangeIndex(len(frame), name="epoch")
    panels = {
        title: [c for c in cols if frame[c].notna().any()]
        for title, cols in _metric_panels([str(c) for c in frame.columns]).items()
    }
    panels = {title: cols for title, cols in panels.items() if cols}
    if not panels:
        return None

    fig, axes = _figure(5.0 * len(panels), 4.0, ncols=len(panels))
    for ax, (title, cols) in zip(axes[0], panels.items()):
        for col in cols:
            series = frame[col].dropna()
            ls = "--" if col.startswith("train") else "-"
            ax.plot(series.index, series.values, marker="o", ms=3.5, lw=1.6, ls=ls, label=col)
        values = frame[cols].to_numpy(dtype=float)
        positive = values[np.isfinite(values) & (values > 0)]
        if title == "Learning rate" and positive.size and positive.max() / positive.min() > 20:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if frame.index.size <= 20:
            ax.set_xticks(frame.index.to_numpy())
    return _save(fig, path)


def _caption(true_name: str, pred_name: str, confidence: float) -> str:
    text = f"true: {_short(true_name, 16)} / pred: {_short(pred_name, 16)} ({confidence:.2f})"
    return text if len(text) <= 30 else text.replace(" / ", "\n", 1)


def _show_image(ax: Axes, image: Image.Image) -> None:
    if image.mode in ("1", "L", "I", "I;16", "F"):
        array, cmap = np.asarray(image.convert("L")), "gray"
    else:
        array, cmap = np.asarray(image.convert("RGB")), None
    small = max(array.shape[:2]) < 64  # keep tiny images (e.g. 8x8 digits) crisp
    ax.imshow(array, cmap=cmap, interpolation="nearest" if small else "antialiased")


def plot_misclassified(
    sample_ids: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    load_image: Callable[[str], Image.Image],
    path: Path,
    n: int = 16,
    predicted: np.ndarray | None = None,
) -> Path | None:
    """Grid of the ``n`` most confidently wrong predictions; None when there are no mistakes.

    ``predicted``: the decided classes when they are not the argmax (a binary model's threshold).
    """
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1) if predicted is None else np.asarray(predicted)
    confidence = probs[np.arange(len(pred)), pred]
    wrong = np.flatnonzero(pred != y)
    if wrong.size == 0 or n < 1:
        return None
    chosen = wrong[np.argsort(-confidence[wrong], kind="stable")][:n]

    ncols = min(chosen.size, max(4, math.ceil(math.sqrt(chosen.size))))
    nrows = math.ceil(chosen.size / ncols)
    fig, axes = _image_grid(2.5, 2.75, nrows, ncols)
    for ax, i in zip(axes.flat, chosen):
        try:
            _show_image(ax, load_image(sample_ids[i]))
        except (OSError, ValueError, KeyError, PixelmillError) as exc:
            log.warning("Cannot load %s for the misclassified grid: %s", sample_ids[i], exc)
            ax.text(0.5, 0.5, "image unavailable", ha="center", va="center", fontsize=8)
        ax.set_title(_caption(class_names[y[i]], class_names[pred[i]], confidence[i]), fontsize=8, color="#b00020")
    _grid_title(fig, f"Most confident mistakes ({chosen.size} of {wrong.size} misclassified)")
    return _save(fig, path, photos=True)


def plot_explained(entries: list[tuple[Image.Image, np.ndarray, str, bool]], path: Path, title: str) -> Path:
    """Each entry (model input, (H, W) heatmap in [0, 1], caption, wrong) as the image beside its heatmap overlay."""
    from pixelmill.explain.heatmaps import overlay

    ncols = 4  # two (image, heatmap) pairs per row
    nrows = max(1, math.ceil(len(entries) / 2))
    fig, axes = _image_grid(2.2, 2.5, nrows, ncols)
    for k, (image, heatmap, caption, wrong) in enumerate(entries):
        row, col = divmod(k, 2)
        _show_image(axes[row, 2 * col], image)
        axes[row, 2 * col + 1].imshow(np.asarray(overlay(image, heatmap)))
        axes[row, 2 * col].set_title(caption, fontsize=7, color="#b00020" if wrong else "#1b5e20")
        axes[row, 2 * col + 1].set_title("where it looked", fontsize=7)
    _grid_title(fig, title)
    return _save(fig, path, photos=True)
