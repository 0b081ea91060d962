"""Run a trained network over a split and write ``RUN_DIR/eval/<split>/`` and the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelmill import runs
from pixelmill.data.preprocess import Preprocessing, load_image

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "auc_macro", "log_loss", "ece")


@torch.inference_mode()
def predict_probs(net: torch.nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """(y_true (N,), probabilities (N, C)) for every batch of ``loader``."""
    net.eval()
    ys, ps = [], []
    for x, y in loader:
        ps.append(torch.softmax(net(x).float(), dim=1).numpy())
        ys.append(np.asarray(y))
    return np.concatenate(ys), np.concatenate(ps)


def evaluate_loaded(run_dir: Path, net, scan, prep: Preprocessing, split: str, top_k: list[int], data_cfg) -> dict[str, Any]:
    """Evaluate ``net`` on one split of ``scan`` (image scan or CSV rows); write outputs, update summary and report."""
    from pixelmill.data.datamodule import ImageDataModule, TabularDataModule
    from pixelmill.evaluation.metrics import write_evaluation

    tabular = data_cfg.kind == "tabular"
    loader = (TabularDataModule if tabular else ImageDataModule)(scan, prep, data_cfg, seed=0).eval_loader(split)
    y_true, probs = predict_probs(net, loader)
    paths = [path for path, _ in scan.splits[split]]  # image paths, or 'file.csv:LINE' row ids
    metrics = write_evaluation(
        Path(run_dir) / "eval" / split,
        y_true,
        probs,
        scan.classes,
        paths,
        top_k=top_k,
        images=None if tabular else lambda p: load_image(p, prep.channels),
    )
    evals = runs.read_summary(run_dir).get("eval", {})
    evals[split] = {k: metrics.get(k) for k in HEADLINE} | {"n": len(y_true)}
    runs.update_summary(run_dir, eval=evals)
    log.info("%s: accuracy %.4f, macro F1 %.4f on %d samples", split, metrics["accuracy"], metrics["f1_macro"], len(y_true))
    return metrics


def _folder_scan(data: Path, split: str, classes: list[str], seed: int):
    """Scan any image folder and map its class names onto the run's class indices."""
    import dataclasses

    from pixelmill.data.scan import scan_images
    from pixelmill.errors import DataError

    scan = scan_images(data, val_ratio=0.0, test_ratio=0.0, seed=seed)
    unknown = sorted(set(scan.classes) - set(classes))
    if unknown:
        raise DataError(f"'{data}' has classes the model was not trained on: {', '.join(unknown)} (known: {', '.join(classes)})")
    has_split = scan.layout == "split" and scan.splits.get(split)
    items = scan.splits[split] if has_split else [item for part in scan.splits.values() for item in part]
    remap = {i: classes.index(name) for i, name in enumerate(scan.classes)}
    name = split if has_split else Path(data).resolve().name
    return dataclasses.replace(scan, classes=list(classes), splits={name: [(p, remap[y]) for p, y in items]}), name


def evaluate_run(
    run_dir: str | Path, split: str = "test", data: str | Path | None = None, checkpoint: str = "best"
) -> tuple[dict[str, Any], Path]:
    """Evaluate a trained run's checkpoint on one of its splits or on another image folder.

    Returns the metrics and the folder they were written to (``RUN_DIR/eval/<name>``).
    """
    from pixelmill.config import load_saved
    from pixelmill.errors import ConfigError, DataError
    from pixelmill.evaluation.report import write_report
    from pixelmill.models import create_model
    from pixelmill.training.checkpoint import load_net
    from pixelmill.training.fit import _scan

    run_dir = runs.resolve_run_dir(run_dir)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"bad split '{split}'; choose one of: train, val, test")
    cfg = load_saved(run_dir / runs.CONFIG)
    if cfg.data.kind == "tabular":
        return _evaluate_tabular_run(run_dir, cfg, split, data, checkpoint)
    summary = runs.read_summary(run_dir)
    classes = summary.get("classes")
    if not classes or "preprocessing" not in summary:
        raise DataError(f"'{run_dir}' has no class list in summary.json; it never started training")
    prep = Preprocessing.from_dict(summary["preprocessing"])
    if data is not None:
        scan, name = _folder_scan(Path(data), split, classes, cfg.seed)
    else:
        scan, name = _scan(cfg), split
        if scan.classes != classes:
            raise DataError(f"the classes under {cfg.data.path} changed since training ({classes} -> {scan.classes})")
        if not scan.splits.get(split):
            raise DataError(f"the run's data has no '{split}' images; pick --split val or pass --data FOLDER")
    net = load_net(create_model(cfg.model.name, len(classes), in_chans=prep.channels), runs.checkpoint_path(run_dir, checkpoint))
    metrics = evaluate_loaded(run_dir, net, scan, prep, name, list(cfg.eval.top_k), cfg.data)
    write_report(run_dir)
    return metrics, run_dir / "eval" / name


def _evaluate_tabular_run(run_dir: Path, cfg, split: str, data: str | Path | None, checkpoint: str) -> tuple[dict[str, Any], Path]:
    """``evaluate_run`` for a CSV-trained run: one of its splits, or any CSV with its columns and target."""
    from pixelmill.data.tabular import load_csv_for_eval
    from pixelmill.data.tabular_preprocess import TabularPreprocessor
    from pixelmill.errors import DataError
    from pixelmill.evaluation.report import write_report
    from pixelmill.training.checkpoint import load_net
    from pixelmill.training.fit import _build_net, _scan

    prep = TabularPreprocessor.load(run_dir)  # the saved schema types and checks every CSV
    if data is not None:
        rows = load_csv_for_eval(data, prep.schema)
        name = next(iter(rows.splits))
    else:
        rows, name = _scan(cfg, run_dir), split
        if not rows.splits.get(split):
            raise DataError(f"the run's data has no '{split}' rows; pick --split val or pass --data FILE.csv")
    net = _build_net(cfg, len(prep.schema.classes), fresh=True, in_features=prep.n_features)
    load_net(net, runs.checkpoint_path(run_dir, checkpoint))
    metrics = evaluate_loaded(run_dir, net, rows, prep, name, list(cfg.eval.top_k), cfg.data)
    write_report(run_dir)
    return metrics, run_dir / "eval" / name
