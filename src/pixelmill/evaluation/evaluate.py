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
    """Evaluate ``net`` on one split of ``scan``; write outputs, update summary and report."""
    from pixelmill.data.datamodule import ImageDataModule
    from pixelmill.evaluation.metrics import write_evaluation
    from pixelmill.evaluation.report import write_report

    loader = ImageDataModule(scan, prep, data_cfg, seed=0).eval_loader(split)
    y_true, probs = predict_probs(net, loader)
    paths = [path for path, _ in scan.splits[split]]
    metrics = write_evaluation(
        Path(run_dir) / "eval" / split,
        y_true,
        probs,
        scan.classes,
        paths,
        top_k=top_k,
        images=lambda p: load_image(p, prep.channels),
    )
    evals = runs.read_summary(run_dir).get("eval", {})
    evals[split] = {k: metrics.get(k) for k in HEADLINE} | {"n": len(y_true)}
    runs.update_summary(run_dir, eval=evals)
    write_report(Path(run_dir))
    log.info("%s: accuracy %.4f, macro F1 %.4f on %d images", split, metrics["accuracy"], metrics["f1_macro"], len(y_true))
    return metrics
