"""Cross-validation: K ordinary pixelmill runs on group-aware, stratified folds of one dataset.

The pool is the data's train and val samples; a test split (user-given, or ``data.test_ratio``)
stays fixed and out of every fold, and each fold's run is evaluated on it too. Fold ``k``
trains on the other folds and is validated (and evaluated) on fold ``k``. The folds come from
scikit-learn's ``StratifiedKFold``, ``StratifiedGroupKFold`` with ``data.group_column``, or
iterstrat's ``MultilabelStratifiedKFold`` for label sets, seeded by ``seed``.

Each fold reaches its run as data the task reads like any other: the data object writes its
samples re-split (an image manifest with a split column, or train/val/test CSVs), so fold
``k`` is the normal run ``OUTPUT_DIR/EXPERIMENT/NAME-fold-k`` that evaluate, export and
``runs show`` accept. The cross-validation directory ``OUTPUT_DIR/EXPERIMENT/NAME`` holds::

    cv.json          folds, the fold runs, the status, the MLflow parent run: what --resume reads
    base.yaml        the resolved config every fold starts from
    folds.csv        every sample of the data and its fold (test: the fixed test split)
    folds/fold-k/    the data fold k trains on
    cv_summary.json  per fold, mean and sample std (ddof=1) of every scalar metric per split
    cv_report.html   the same as tables, self-contained

``resume`` skips finished folds, continues a fold stopped mid-training from its last
checkpoint (``fit.resume``) and starts the later folds.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pixelmill import runs
from pixelmill.config import load_config, to_yaml, validate
from pixelmill.errors import ConfigError, DataError, RunError

log = logging.getLogger(__name__)

STATE_FILE = "cv.json"
BASE_CONFIG = "base.yaml"  # not config.yaml: the CV directory is not a run directory
FOLDS_FILE = "folds.csv"
FOLDS_DIR = "folds"
SUMMARY_FILE = "cv_summary.json"
REPORT_FILE = "cv_report.html"
STD = "sample standard deviation over folds (ddof=1)"
# Keys cv sets for every fold run itself.
RESERVED = ("run_name", "resume", "tracking.mlflow.parent_run_id")


@dataclass
class CVResult:
    """What ``cross_validate`` and ``resume`` hand back."""

    cv_dir: Path
    name: str
    folds: int
    status: str  # finished, or interrupted when a fold was stopped (Ctrl+C, SIGTERM)
    run_dirs: list[Path] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    report: Path | None = None


# ---------------------------------------------------------------------------- folds


def splitter_class(multilabel: bool, grouped: bool) -> type:
    """The K-fold splitter for label sets or single labels, with or without groups."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    # Grouped label sets are stratified by each image's rarest label, as the scan's own group-aware splits are.
    table = {
        (False, False): StratifiedKFold,
        (True, False): MultilabelStratifiedKFold,
        (False, True): StratifiedGroupKFold,
        (True, True): StratifiedGroupKFold,
    }
    return table[(multilabel, grouped)]


def check_folds(k: int) -> None:
    """ConfigError for fewer than 2 folds (torch-free: the CLI asks before loading anything)."""
    if k < 2:
        raise ConfigError(f"--folds must be at least 2 (got {k}): each fold is validated on one part and trained on the rest")


def _check_counts(k: int, classes: list[str], labels: np.ndarray, groups: list[str] | None, group_column: str | None, noun: str) -> None:
    """DataError when the pool has fewer groups, or a class fewer samples, than folds."""
    if groups is not None and (n := len(set(groups))) < k:
        fix = f"use --folds {n} or fewer" if n >= 2 else "add groups"
        raise DataError(f"--folds {k} needs at least {k} groups (data.group_column={group_column}) in the train+val pool, but it has {n}; {fix}")
    counts = labels.sum(axis=0).astype(int) if labels.ndim == 2 else np.bincount(labels, minlength=len(classes))
    smallest = int(np.argmin(counts))
    if (n := int(counts[smallest])) < k:
        fix = f"use --folds {n} or fewer, or add {noun} of it" if n >= 2 else f"add {noun} of it (each fold needs one to validate on)"
        raise DataError(f"--folds {k} needs at least {k} {noun} of every class in the train+val pool, but class '{classes[smallest]}' has {n}; {fix}")


def assign_folds(
    classes: list[str], labels: np.ndarray, groups: list[str] | None, k: int, seed: int, group_column: str | None = None, noun: str = "samples"
) -> np.ndarray:
    """(N,) fold number 1..k of every pool sample: stratified by ``labels`` ((N,) class indices or (N, L) 0/1
    label sets), whole ``groups`` only when given. DataError when some fold could not train on every class."""
    check_folds(k)
    _check_counts(k, classes, labels, groups, group_column, noun)
    multilabel = labels.ndim == 2
    key = labels
    if multilabel and groups is not None:
        from pixelmill.tasks.multilabel.data import rarest_label

        key = rarest_label(labels)
    fold_of = np.zeros(len(labels), dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only N members": checked above
        splitter = splitter_class(multilabel, groups is not None)(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(labels)), key, groups)
        for fold, (_, held) in enumerate(splits, start=1):
            fold_of[held] = fold
    for fold in range(1, k + 1):
        train = labels[fold_of != fold]
        present = train.sum(axis=0) > 0 if multilabel else np.isin(np.arange(len(classes)), train)
        if not present.all():
            missing = classes[int(np.argmin(present))]
            raise DataError(
                f"fold {fold} of {k} would have no training {noun} of class '{missing}' (all of them fall in that fold); "
                f"use fewer --folds or add {noun} of that class"
            )
    return fold_of


# ---------------------------------------------------------------------------- state


def _read_state(cv_dir: Path) -> dict[str, Any]:
    path = cv_dir / STATE_FILE
    if not path.is_file():
        raise RunError(f"'{cv_dir}' is not a cross-validation directory (no {STATE_FILE}); start one with pixelmill cv --folds K")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is not valid JSON ({exc.msg}); it was not written by pixelmill cv") from None


def check_cv_dir(cv_dir: str | Path) -> Path:
    """A cross-validation directory that exists and holds cv.json, or a RunError saying what is wrong (torch-free)."""
    cv_dir = Path(cv_dir).expanduser()
    if not cv_dir.is_dir():
        raise RunError(f"cross-validation directory '{cv_dir}' does not exist")
    _read_state(cv_dir)
    return cv_dir


def _write_state(cv_dir: Path, state: dict[str, Any]) -> None:
    runs.write_atomic(cv_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _fold_dir(cv_dir: Path, state: dict[str, Any], fold: int) -> Path:
    return cv_dir.parent / f"{state['name']}-fold-{fold}"


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ---------------------------------------------------------------------------- start, resume


def cross_validate(overrides: Iterable[str], folds: int, config_file: str | Path | None = None, name: str | None = None) -> CVResult:
    """Split the data into ``folds`` folds and train one run per fold; nothing is written when an input is wrong."""
    from pixelmill.models.factory import resolve_model_name
    from pixelmill.tasks import task_for_config
    from pixelmill.tracking import check_trackers, create_parent_run

    overrides = list(overrides)
    check_folds(folds)
    base = load_config(overrides, config_file)
    for key in RESERVED:
        if _select(base, key) is not None:
            hint = "; name the cross-validation with --name" if key == "run_name" else "; continue a cross-validation with pixelmill cv --resume CV_DIR" if key == "resume" else ""
            raise ConfigError(f"'{key}' is set by cv for every fold run{hint}")
    name = name or f"cv-{runs.default_run_name()}"
    if not name.strip() or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"bad cross-validation name '{name}': it names a folder, so use letters, digits, '-' or '_'")
    cv_dir = Path(base.output_dir) / base.experiment / name
    if (cv_dir / STATE_FILE).is_file():
        raise RunError(f"cross-validation '{cv_dir}' exists already; continue it with pixelmill cv --resume {cv_dir} or pick another --name")
    taken = [d for d in (cv_dir, *(cv_dir.parent / f"{name}-fold-{k}" for k in range(1, folds + 1))) if d.exists()]
    if taken:
        raise RunError(f"'{taken[0]}' exists already; pick another --name")

    task = task_for_config(base)
    resolve_model_name(base.model.name)
    task.check_model(base)
    data = task.load_data(base)
    if not hasattr(data, "write_with_splits"):  # how a fold's split reaches its run: the data writes itself re-split
        raise ConfigError(f"{task.title} data cannot be cross-validated yet (its data has no write_with_splits)")
    task.check_data(base, data)
    pool = [item for split in ("train", "val") for item in data.splits.get(split, [])]
    test = list(data.splits.get("test", []))
    labels = np.asarray([label for _, label in pool])
    groups = [data.groups[path] for path, _ in pool] if base.data.group_column else None
    fold_of = assign_folds(data.classes, labels, groups, folds, base.seed, base.data.group_column, task.sample_noun)
    check_trackers(base)  # an unreachable MLflow store fails now, before anything is written

    cv_dir.mkdir(parents=True)
    runs.write_atomic(cv_dir / BASE_CONFIG, to_yaml(base))
    fold_data = {}
    for fold in range(1, folds + 1):
        split_of = {path: "val" if f == fold else "train" for (path, _), f in zip(pool, fold_of)} | {path: "test" for path, _ in test}
        fold_data[str(fold)] = data.write_with_splits(cv_dir / FOLDS_DIR / f"fold-{fold}", split_of, base.data.group_column)
    _write_folds_csv(cv_dir / FOLDS_FILE, pool, fold_of, test)
    splitter = splitter_class(labels.ndim == 2, groups is not None).__name__
    parent = None
    if "mlflow" in base.logger:
        parent = create_parent_run(base, base.experiment, name, {"pixelmill.cv": name, "folds": str(folds), "splitter": splitter})
    state = {
        "name": name,
        "experiment": base.experiment,
        "folds": folds,
        "splitter": splitter,
        "seed": base.seed,
        "group_column": base.data.group_column,
        "config_file": str(Path(config_file).resolve()) if config_file else None,
        "overrides": overrides,
        "pool": {"samples": len(pool), "test": len(test)},
        "eval_splits": ["val", "test"] if test else ["val"],
        "fold_data": fold_data,
        "mlflow_parent_run_id": parent,
        "status": "created",
        "created_at": runs.now_iso(),
        "runs": {},
    }
    state["runs"] = {str(k): {"run_dir": str(_fold_dir(cv_dir, state, k).resolve()), "status": "pending"} for k in range(1, folds + 1)}
    _write_state(cv_dir, state)
    log.info("cross-validation %s: %d folds (%s) of %d %s, test split %d; in %s", name, folds, splitter, len(pool), task.sample_noun, len(test), cv_dir)
    return _run_folds(cv_dir, state, resumed=False)


def resume(cv_dir: str | Path) -> CVResult:
    """Continue a stopped cross-validation: finished folds are kept, a stopped fold continues, the rest start."""
    cv_dir = check_cv_dir(cv_dir)
    state = _read_state(cv_dir)
    if state.get("status") == "running" and state.get("pid") != os.getpid() and runs.pid_alive(state.get("pid")):
        raise RunError(f"cross-validation '{cv_dir}' is running in process {state['pid']}; wait for it or stop it first")
    return _run_folds(cv_dir, state, resumed=True)


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def _write_folds_csv(path: Path, pool: list, fold_of: np.ndarray, test: list) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["sample", "fold"])
    writer.writerows([_printable(str(sample)), int(fold)] for (sample, _), fold in zip(pool, fold_of))
    writer.writerows([_printable(str(sample)), "test"] for sample, _ in test)
    runs.write_atomic(path, buffer.getvalue())


def _fold_config(cv_dir: Path, state: dict[str, Any], fold: int) -> Any:
    """The config of a new fold run: base.yaml with the fold's data, name, evaluated splits and parent run."""
    from omegaconf import OmegaConf

    cfg = load_config([], cv_dir / BASE_CONFIG)
    values = {
        **state["fold_data"][str(fold)],
        "output_dir": str(cv_dir.resolve().parent.parent),  # wherever `cv --resume` is started from
        "run_name": _fold_dir(cv_dir, state, fold).name,
        "resume": None,
        "eval.splits": state["eval_splits"],  # the held-out fold (val), and the fixed test split
        "tracking.mlflow.parent_run_id": state.get("mlflow_parent_run_id"),
    }
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    validate(cfg)
    return cfg


def _fold_action(run_dir: Path, fold: int) -> str:
    """new, finished, resume (stopped with a last checkpoint) or restart (stopped before its first checkpoint)."""
    if not (run_dir / runs.CONFIG).is_file():
        return "new"
    summary = runs.load_summary(run_dir)
    status = runs.run_status(summary)
    if status == "running":
        raise RunError(f"fold {fold} ('{run_dir}') is running in process {summary.pid}; wait for it or stop it first")
    if status == "finished":
        return "finished"
    return "resume" if (run_dir / runs.CHECKPOINTS / "last.ckpt").is_file() else "restart"


def _train_fold(cv_dir: Path, state: dict[str, Any], fold: int) -> str:
    """Bring fold ``fold``'s run to an end: kept when finished, continued when stopped with a checkpoint, else trained. Its status."""
    from pixelmill.training import fit

    run_dir, k = _fold_dir(cv_dir, state, fold), state["folds"]
    action = _fold_action(run_dir, fold)
    if action == "finished":
        return "finished"
    state["runs"][str(fold)]["status"] = "running"
    _write_state(cv_dir, state)
    if action == "resume":
        log.info("fold %d/%d: continuing %s from its last checkpoint", fold, k, run_dir)
        return fit.resume(run_dir).status
    if action == "restart":  # fit.resume needs a checkpoint, and train() a run directory without a config
        log.info("fold %d/%d: %s stopped before its first checkpoint; training it again", fold, k, run_dir)
        shutil.rmtree(run_dir)
    log.info("fold %d/%d: training %s", fold, k, run_dir)
    return fit.train(_fold_config(cv_dir, state, fold)).status


def _run_folds(cv_dir: Path, state: dict[str, Any], resumed: bool) -> CVResult:
    """Every fold in turn, then the summary, the report and the MLflow parent's figures; cv.json says how far it got."""
    from pixelmill.tracking import log_to_parent_run

    k, parent = state["folds"], state.get("mlflow_parent_run_id")
    base = load_config([], cv_dir / BASE_CONFIG) if parent else None
    run_dirs = [_fold_dir(cv_dir, state, fold) for fold in range(1, k + 1)]
    state.update(status="running", pid=os.getpid())
    _write_state(cv_dir, state)
    if parent and resumed:
        log_to_parent_run(base, parent, status="RUNNING")
    fold = 0
    try:
        for fold in range(1, k + 1):
            status = state["runs"][str(fold)]["status"] = _train_fold(cv_dir, state, fold)
            if status != "finished":  # Ctrl+C or SIGTERM stopped the run cleanly
                state.update(status=status, pid=None)
                _write_state(cv_dir, state)
                if parent:
                    log_to_parent_run(base, parent, status="KILLED")
                log.warning("cross-validation stopped in fold %d; continue with: pixelmill cv --resume %s", fold, cv_dir)
                return CVResult(cv_dir, state["name"], k, status, run_dirs)
        fold = 0
        summary = summarize(cv_dir, state)
        runs.write_atomic(cv_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        report = write_report(cv_dir, summary)
        if parent:
            metrics = {f"{stat}/{split}/{key}": value for split, part in summary["splits"].items() for stat in ("mean", "std") for key, value in part[stat].items() if value is not None}
            log_to_parent_run(base, parent, metrics=metrics, files=[cv_dir / SUMMARY_FILE, report, cv_dir / FOLDS_FILE], status="FINISHED")
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
        state.update(status=status, pid=None, error=f"{f'fold {fold}: ' if fold else ''}{type(exc).__name__}: {exc}"[:500])
        if fold:
            state["runs"][str(fold)]["status"] = status
        _write_state(cv_dir, state)
        if parent:
            with contextlib.suppress(Exception):  # the error that stopped the cross-validation is the one to show
                log_to_parent_run(base, parent, status="KILLED" if status == "interrupted" else "FAILED")
        raise
    state.update(status="finished", pid=None, finished_at=runs.now_iso())
    state.pop("error", None)
    _write_state(cv_dir, state)
    return CVResult(cv_dir, state["name"], k, "finished", run_dirs, summary, report)


# ---------------------------------------------------------------------------- summary, report


def _scalars(path: Path) -> dict[str, float]:
    """The top-level numbers of an eval metrics.json (not booleans, not NaN)."""
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}


def summarize(cv_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Per split: every fold's scalar metrics, their mean and sample std (a metric missing in a fold is averaged over the rest)."""
    out: dict[str, Any] = {"name": state["name"], "folds": state["folds"], "splitter": state["splitter"], "std": STD, "splits": {}}
    for split in state["eval_splits"]:
        per_fold = []
        for fold in range(1, state["folds"] + 1):
            run_dir = _fold_dir(cv_dir, state, fold)
            per_fold.append({"fold": fold, "run_dir": str(run_dir.resolve()), "metrics": _scalars(run_dir / "eval" / split / "metrics.json")})
        keys = list(dict.fromkeys(key for row in per_fold for key in row["metrics"]))
        values = {key: [row["metrics"][key] for row in per_fold if key in row["metrics"]] for key in keys}
        out["splits"][split] = {
            "per_fold": per_fold,
            "mean": {key: statistics.fmean(v) for key, v in values.items()},
            "std": {key: statistics.stdev(v) if len(v) > 1 else None for key, v in values.items()},
            "folds_with": {key: len(v) for key, v in values.items()},
        }
    return out


_REPORT = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ name }} &middot; pixelmill cross-validation</title>
<style>
  body { margin: 0; background: #f5f7fa; color: #1f2933;
         font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif; }
  header { background: #18212f; color: #fff; padding: 22px 0 18px; }
  .wrap { max-width: 1200px; margin: 0 auto; padding: 0 28px; }
  header .brand { font-size: 12px; letter-spacing: .12em; text-transform: uppercase; color: #9fb3c8; }
  header h1 { margin: 4px 0 6px; font-size: 26px; font-weight: 650; word-break: break-word; }
  header .sub { color: #bcccdc; font-size: 13px; }
  main { padding: 24px 0 40px; }
  section { background: #fff; border: 1px solid #e4e7eb; border-radius: 10px; padding: 20px 24px 24px; margin-bottom: 22px; }
  h2 { margin: 0 0 14px; font-size: 19px; font-weight: 650; }
  p.note { color: #616e7c; font-size: 13px; margin: 6px 0 0; }
  .scroll { overflow-x: auto; }
  table { border-collapse: collapse; font-size: 14px; margin: 4px 0 8px; }
  th, td { padding: 6px 12px; border-bottom: 1px solid #e4e7eb; text-align: left; }
  thead th { background: #f0f4f8; font-weight: 600; font-size: 13px; border-bottom: 2px solid #d9e2ec; white-space: nowrap; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  tr.mean td { font-weight: 600; background: #eef3fd; border-top: 2px solid #d9e2ec; }
  a { color: #2f5fd0; }
</style>
</head>
<body>
<header><div class="wrap">
  <div class="brand">pixelmill cross-validation</div>
  <h1>{{ name }}</h1>
  <div class="sub">{{ folds }} folds ({{ splitter }}) &middot; {{ created }}</div>
</div></header>
<main><div class="wrap">
{% for split in splits %}
<section>
  <h2>{{ split.title }}</h2>
  <div class="scroll"><table>
    <thead><tr><th>Fold</th>{% for key in split.columns %}<th class="num">{{ key }}</th>{% endfor %}</tr></thead>
    <tbody>
    {% for row in split.rows %}
      <tr><td><a href="{{ row.href }}">fold {{ row.fold }}</a></td>{% for cell in row.cells %}<td class="num">{{ cell }}</td>{% endfor %}</tr>
    {% endfor %}
      <tr class="mean"><td>mean &plusmn; std</td>{% for cell in split.mean %}<td class="num">{{ cell }}</td>{% endfor %}</tr>
    </tbody>
  </table></div>
  <p class="note">{{ split.note }}</p>
</section>
{% endfor %}
<p class="note">std is the {{ std }}. Each fold is an ordinary run; its link opens that run's report.</p>
</div></main>
</body>
</html>
"""

_SPLIT_NOTES = {
    "val": "Each fold's own held-out part. It also chose the fold's best epoch (trainer.monitor), so these figures lean optimistic.",
    "test": "The fixed test split, the same in every fold and never trained or validated on.",
}


def write_report(cv_dir: Path, summary: dict[str, Any]) -> Path:
    """``cv_report.html``: per split, one row per fold and a mean ± std row; inline CSS, no scripts, no external files."""
    import jinja2

    from pixelmill.evaluation.report import METRIC_ORDER, MULTILABEL_METRIC_ORDER, fmt

    splits = []
    for split, part in summary["splits"].items():
        # The run report's column order: label-set metrics (mAP first) or single-label ones.
        order = {key: i for i, key in enumerate(MULTILABEL_METRIC_ORDER if "map" in part["mean"] else METRIC_ORDER)}
        keys = sorted(part["mean"], key=lambda k: (k == "n", order.get(k, len(order))))  # known metrics first, the count last
        rows = [
            {
                "fold": row["fold"],
                "href": os.path.relpath(Path(row["run_dir"]) / "report.html", cv_dir.resolve()),
                "cells": [fmt(row["metrics"].get(key)) for key in keys],
            }
            for row in part["per_fold"]
        ]
        mean = [f"{fmt(part['mean'][key])} \u00b1 {fmt(part['std'][key])}" for key in keys]
        splits.append({"title": f"{split} split", "columns": keys, "rows": rows, "mean": mean, "note": _SPLIT_NOTES.get(split, "")})
    template = jinja2.Environment(autoescape=True).from_string(_REPORT)
    html = template.render(name=summary["name"], folds=summary["folds"], splitter=summary["splitter"], created=runs.now_iso(), splits=splits, std=STD)
    path = cv_dir / REPORT_FILE
    runs.write_atomic(path, html)
    return path
