"""What the two single-label tasks (image and tabular classification) share on the PyTorch side.

One softmax head, one cross-entropy LightningModule, one evaluation writer: a single-label
task's ``probabilities``, ``lightning_module`` and ``evaluate`` are these functions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from pixelmill import runs

log = logging.getLogger(__name__)

# The metrics of an evaluation that summary.json keeps per split (the rest is in eval/<split>/metrics.json).
HEADLINE = ("accuracy", "balanced_accuracy", "f1_macro", "auc_macro", "log_loss", "ece")


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """The single-label head: (N, C) logits -> (N, C) float32 probabilities summing to 1."""
    return torch.softmax(logits.float(), dim=1)


def class_weights(counts: list[int]) -> list[float]:
    """``n / (C * count)`` per class: the 'balanced' weighting of scikit-learn."""
    total, n = sum(counts), len(counts)
    return [total / (n * max(c, 1)) for c in counts]


def module_options(cfg: Any) -> dict[str, Any]:
    """What every classifier's LightningModule takes from the config: optimizer, schedule, monitor, batch mixing, seed."""
    return {
        "optim": OmegaConf.to_container(cfg.optim),
        "scheduler": OmegaConf.to_container(cfg.scheduler),
        "monitor": cfg.trainer.monitor,
        "mode": cfg.trainer.mode,
        "mixup_alpha": cfg.data.augment.mixup_alpha,
        "cutmix_alpha": cfg.data.augment.cutmix_alpha,
        "seed": cfg.seed,
    }


def lightning_module(cfg: Any, net: torch.nn.Module, data: Any):
    """Cross-entropy training around ``net``, with the config's optimizer, scheduler and class weighting."""
    from pixelmill.training.module import ClassificationModule

    counts = [data.class_counts("train").get(c, 0) for c in data.classes]
    return ClassificationModule(
        net,
        num_classes=len(data.classes),
        class_weights=class_weights(counts) if cfg.model.class_weights == "auto" else None,
        label_smoothing=cfg.model.label_smoothing,
        activation=softmax,
        **module_options(cfg),
    )


@torch.inference_mode()
def predict_probs(net: torch.nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """(y_true (N,), probabilities (N, C)) for every batch of ``loader``."""
    net.eval()
    ys, ps = [], []
    for x, y in loader:
        ps.append(softmax(net(x)).numpy())
        ys.append(np.asarray(y))
    return np.concatenate(ys), np.concatenate(ps)


def evaluate(
    run_dir: Path, loader, data: Any, net: torch.nn.Module, split: str, top_k: list[int], images=None, bootstrap: int = 0, seed: int = 0
) -> dict[str, Any]:
    """Evaluate ``net`` on ``loader`` (one split of ``data``); write ``eval/<split>/``, update summary.json.

    ``images(path) -> PIL image`` lets the plots show the most confidently misclassified inputs.
    """
    from pixelmill.evaluation.metrics import write_evaluation

    y_true, probs = predict_probs(net, loader)
    paths = [path for path, _ in data.splits[split]]  # image paths, or 'file.csv:LINE' row ids
    metrics = write_evaluation(
        Path(run_dir) / "eval" / split, y_true, probs, data.classes, paths, top_k=top_k, images=images, bootstrap=bootstrap, seed=seed
    )
    evals = runs.load_summary(run_dir).eval
    evals[split] = {k: metrics.get(k) for k in HEADLINE} | {"n": len(y_true)}
    runs.update_summary(run_dir, eval=evals)
    log.info("%s: accuracy %.4f, macro F1 %.4f on %d samples", split, metrics["accuracy"], metrics["f1_macro"], len(y_true))
    return metrics


def build_net(cfg: Any, num_classes: int, fresh: bool = False, **extra: Any) -> torch.nn.Module:
    """The configured network with ``num_classes`` outputs; ``fresh`` skips pretrained and local weights (resume, reload)."""
    from pixelmill.models import create_model

    return create_model(
        cfg.model.name,
        num_classes,
        pretrained=cfg.model.pretrained and not fresh,
        weights=None if fresh else cfg.model.weights,
        in_chans=cfg.model.in_chans,
        drop_rate=cfg.model.drop_rate,
        freeze_backbone=cfg.model.freeze_backbone,
        **extra,
    )
