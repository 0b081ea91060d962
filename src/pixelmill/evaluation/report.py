"""One self-contained HTML report per run: ``run_dir/report.html``.

The report reads whatever the run directory holds (config.yaml, summary.json,
metrics.csv, eval/<split>/...) and leaves out the sections it has no data for.
Images are embedded as base64 data URIs and the CSS is inline, so the file can be
mailed, attached to a tracker or opened from disk without a server. There is no JS.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any

from pixelmill.errors import RunError
from pixelmill.evaluation.metrics import (
    CONFUSION_FILE,
    CONFUSION_NORM_FILE,
    EXPLAINED_FILE,
    METRICS_FILE,
    MISCLASSIFIED_FILE,
    PR_FILE,
    RELIABILITY_FILE,
    ROC_FILE,
)
from pixelmill.evaluation.multilabel import PLOT_TITLES as MULTILABEL_PLOT_TITLES
from pixelmill.runs import RunSummary
from pixelmill.tasks import TASKS

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
TEMPLATE = "report.html.j2"
TRAINING_PLOT = Path("plots") / "training_curves.png"
MAX_SKIPPED_LISTED = 50
SPLIT_ORDER = ("train", "val", "test")
# Row order of the metrics table; keys not listed here (e.g. top3_acc) follow in file order.
METRIC_ORDER = (
    "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted", "f1_weighted",
    "auc_macro", "sensitivity", "specificity", "ppv", "npv", "threshold", "log_loss", "ece",
)
# The same for multi-label splits: the headline rows first.
MULTILABEL_METRIC_ORDER = ("map", "auc_macro", "f1_micro", "f1_macro", "subset_accuracy", "hamming_loss", "precision_micro", "recall_micro", "precision_macro", "recall_macro")
SPLIT_PLOTS = (
    (CONFUSION_FILE, "Confusion matrix"),
    (CONFUSION_NORM_FILE, "Confusion matrix, normalised"),
    (ROC_FILE, "ROC curves"),
    (PR_FILE, "Precision-recall curves"),
    (RELIABILITY_FILE, "Reliability diagram (eval.calibrate)"),
    (EXPLAINED_FILE, "Where the model looked: the most confident mistakes and a sample of correct predictions"),
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is not valid JSON ({exc}); re-run the evaluation or delete the file.") from exc


def _data_uri(path: Path) -> str | None:
    """PNG file -> ``data:image/png;base64,...`` (None when the file is missing)."""
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def fmt(value: Any) -> str:
    """Table cell text: floats to 4 decimals (tiny ones in e-notation), ints with separators, None as a dash."""
    if value is None or value == "":
        return "\u2014"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "\u2014"
        # learning rates and the like would all read 0.0000
        return f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)


def fmt_seconds(value: Any) -> str:
    """Duration in seconds -> '50.1 s', '3 min 20 s' or '1 h 02 min'."""
    if not isinstance(value, (int, float)):
        return fmt(value)
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(round(value)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _split_sort_key(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def _multilabel_plots(split_dir: Path, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, data URI) of the PNGs a multi-label metrics.json lists in ``plots`` (only files inside ``split_dir``)."""
    names = metrics.get("plots")
    root = split_dir.resolve()
    plots = []
    for name in names if isinstance(names, list) else []:
        if not isinstance(name, str) or not name.endswith(".png"):
            continue
        path = (split_dir / name).resolve()
        if path.is_relative_to(root) and (uri := _data_uri(path)):
            plots.append((MULTILABEL_PLOT_TITLES.get(name, Path(name).stem.replace("_", " ")), uri))
    return plots


def _load_splits(run_dir: Path) -> list[dict[str, Any]]:
    """Every eval/<split>/ holding a metrics.json, in train/val/test order."""
    eval_dir = run_dir / "eval"
    if not eval_dir.is_dir():
        return []
    splits = []
    for split_dir in sorted((d for d in eval_dir.iterdir() if d.is_dir()), key=lambda d: _split_sort_key(d.name)):
        if not (split_dir / METRICS_FILE).is_file():
            continue
        metrics = _read_json(split_dir / METRICS_FILE)
        if not isinstance(metrics, dict):
            raise RunError(f"{split_dir / METRICS_FILE} must hold a JSON object; re-run the evaluation.")
        multilabel = "per_label" in metrics  # a multi-label evaluation (evaluation/multilabel.py)
        if multilabel:
            plots = _multilabel_plots(split_dir, metrics)
        else:
            plots = [(title, uri) for name, title in SPLIT_PLOTS if (uri := _data_uri(split_dir / name))]
        splits.append(
            {
                "name": split_dir.name,
                "metrics": metrics,
                "label_sets": multilabel,
                "per_class": metrics.get("per_class") or {},
                "per_label": (metrics.get("per_label") or {}) if multilabel else {},
                "plots": plots,
                "misclassified": _data_uri(split_dir / MISCLASSIFIED_FILE),
            }
        )
    return splits


def _metric_rows(splits: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """Rows of (metric, value per split) for the scalar metrics of every split."""
    keys: list[str] = []
    for split in splits:
        for key, value in split["metrics"].items():
            if key not in keys and (value is None or isinstance(value, (int, float))):
                keys.append(key)
    multilabel = any(split["label_sets"] for split in splits)
    order = {key: i for i, key in enumerate(MULTILABEL_METRIC_ORDER if multilabel else METRIC_ORDER)}
    # Known metrics first, then top-k and the rest in file order, the sample count last.
    keys.sort(key=lambda k: (k == "n", order.get(k, len(order))))
    return [(key, [_cell(split["metrics"], key) for split in splits]) for key in keys]


def _cell(metrics: dict[str, Any], key: str) -> dict[str, Any]:
    """One metrics-table cell: the value and, when the evaluation bootstrapped it, its 95% interval."""
    ci = (metrics.get("ci95") or {}).get(key) if isinstance(metrics.get("ci95"), dict) else None
    valid = isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)
    return {"value": metrics.get(key), "ci": ci if valid else None}


def _label_counts(data: dict[str, Any]) -> dict[str, Any] | None:
    """Multi-label data: images carrying each label per split (``class_counts``) and those with no label."""
    class_counts = data.get("class_counts") if isinstance(data.get("class_counts"), dict) else {}
    no_label = data.get("no_label_counts") if isinstance(data.get("no_label_counts"), dict) else {}
    splits = [s for s in (data.get("counts") or {}) if s in class_counts or s in no_label]
    splits += [s for s in [*class_counts, *no_label] if s not in splits]
    if not splits:
        return None
    labels: list[str] = []
    for split in splits:
        counts = class_counts.get(split)
        labels += [name for name in (counts if isinstance(counts, dict) else {}) if name not in labels]
    return {
        "splits": splits,
        "rows": [(name, [(class_counts.get(s) or {}).get(name) for s in splits]) for name in labels],
        "no_label": [no_label.get(s) for s in splits] if no_label else None,
    }


def _data_context(summary: RunSummary, multilabel: bool) -> dict[str, Any] | None:
    data = summary.data
    if not data:
        return None
    skipped_files = data.get("skipped_files") or []
    multilabel = multilabel or "no_label_counts" in data
    return {
        # What one sample is, from the run's task ("Samples" for runs older than summary.task).
        "noun": (TASKS[summary.task].sample_noun if summary.task in TASKS else "samples").capitalize(),
        "layout": data.get("layout"),
        "classes": data.get("classes") or [],
        "counts": data.get("counts") or {},
        "skipped": data.get("skipped"),  # None: the task's data has no files to skip (CSV rows)
        "skipped_files": skipped_files[:MAX_SKIPPED_LISTED],
        "skipped_more": max(0, len(skipped_files) - MAX_SKIPPED_LISTED),
        "leaks": (data.get("leaks") or [])[:MAX_SKIPPED_LISTED],  # byte-identical files in several splits
        "leaks_total": len(data.get("leaks") or []),
        "label_sets": multilabel,
        # Single-label reports list no per-class counts; a multi-label run shows its label frequencies.
        "label_counts": _label_counts(data) if multilabel else None,
    }


def _features_context(summary: RunSummary) -> list[dict[str, Any]]:
    """Tabular runs: one row per feature column of the training split (``summary.data.features``)."""
    features = summary.data.get("features")
    return [f for f in features if isinstance(f, dict)] if isinstance(features, list) else []


def _render(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["seconds"] = fmt_seconds
    source = files("pixelmill.evaluation").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    return env.from_string(source).render(**context)


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` from what the run directory holds; return its path."""
    from pixelmill import __version__
    from pixelmill.evaluation.plots import plot_training_curves

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"Run directory {run_dir} does not exist; pass a run path such as runs/<experiment>/<run>.")

    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.is_file() else {}
    if not isinstance(summary, dict):
        raise RunError(f"{summary_path} must hold a JSON object.")
    config_path = run_dir / "config.yaml"
    training_plot = plot_training_curves(run_dir / "metrics.csv", run_dir / TRAINING_PLOT)
    splits = _load_splits(run_dir)

    try:
        typed = RunSummary.model_validate(summary)
    except ValueError as exc:  # pydantic's ValidationError: a field of the wrong type
        raise RunError(f"{summary_path} is malformed ({str(exc).splitlines()[1:3]}); the run wrote it, do not edit it by hand.") from None
    best = typed.best
    context = {
        "run_name": typed.run_name or run_dir.name,
        "run_dir": str(run_dir),
        "summary": summary,  # as written, for the template's header tiles
        "best": best.model_dump() if best else None,
        "best_metrics": {k: v for k, v in (best.metrics if best else {}).items() if k not in ("epoch", "step")},
        "durations": typed.durations,
        "versions": typed.versions,
        "data": _data_context(typed, multilabel=any(s["label_sets"] for s in splits)),
        "features": _features_context(typed),
        "training_plot": _data_uri(training_plot) if training_plot else None,
        "splits": splits,
        "metric_rows": _metric_rows(splits),
        "any_ci": any(isinstance(s["metrics"].get("ci95"), dict) and s["metrics"]["ci95"] for s in splits),
        "any_multilabel": any(s["label_sets"] for s in splits),
        "all_multilabel": bool(splits) and all(s["label_sets"] for s in splits),
        "has_misclassified": any(s["misclassified"] for s in splits),
        "config_text": config_path.read_text(encoding="utf-8") if config_path.is_file() else None,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
    }
    out = run_dir / REPORT_FILE
    out.write_text(_render(context), encoding="utf-8")
    log.info("Report written to %s", out)
    return out
