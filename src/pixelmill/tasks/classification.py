"""What the two single-label tasks (image and tabular classification) share on the PyTorch side.

One softmax head, one cross-entropy LightningModule, one evaluation writer: a single-label
task's ``probabilities``, ``lightning_module`` and ``evaluate`` are these functions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

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


CALIBRATION_FILE = "calibration.json"  # RUN_DIR/calibration.json: the temperature fitted on val (eval.calibrate)


def tempered_softmax(temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The single-label head with temperature scaling: softmax(logits / T); plain softmax for T = 1."""
    if temperature == 1.0:
        return softmax
    return lambda logits: torch.softmax(logits.float() / temperature, dim=1)


@torch.inference_mode()
def predict_logits(net: torch.nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """(y_true (N,), logits (N, C)) for every batch of ``loader``."""
    net.eval()
    ys, zs = [], []
    for x, y in loader:
        zs.append(net(x).float().numpy())
        ys.append(np.asarray(y))
    return np.concatenate(ys), np.concatenate(zs)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 minimising the cross-entropy of softmax(logits / T) (Guo et al. 2017).

    One scalar, fitted with L-BFGS on log T (the reference implementation's optimiser; torch has no
    ready-made temperature scaler and the fit is these few lines).
    """
    z, target = torch.from_numpy(logits).double(), torch.from_numpy(y).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), target)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.exp().item())


def calibrate(run_dir: Path, y: np.ndarray, logits: np.ndarray) -> float:
    """``eval.calibrate=temperature``: fit T on the validation logits, write RUN_DIR/calibration.json."""
    from pixelmill.errors import DataError
    from pixelmill.evaluation.metrics import expected_calibration_error

    if len(np.unique(y)) < 2:
        raise DataError("eval.calibrate=temperature needs validation images of at least 2 classes; the val split has one")
    t = fit_temperature(logits, y)
    before, after = (tempered_softmax(v)(torch.from_numpy(logits)).numpy() for v in (1.0, t))
    record = {
        "method": "temperature", "temperature": t, "split": "val", "n": len(y),
        "ece_before": expected_calibration_error(y, before), "ece_after": expected_calibration_error(y, after),
    }
    runs.write_atomic(Path(run_dir) / CALIBRATION_FILE, json.dumps(record, indent=2) + "\n")
    log.info("temperature %.3f fitted on %d val samples: ECE %.4f -> %.4f", t, len(y), record["ece_before"], record["ece_after"])
    return t


def choose_threshold(run_dir: Path, y: np.ndarray | None, probs: np.ndarray | None, classes: list[str], positive: str, rule: str) -> float:
    """A binary model's decision threshold on the positive class's probability, chosen on val by ``rule``;
    written to RUN_DIR/threshold.json with what it gives on val (sensitivity, specificity, PPV, NPV)."""
    from pixelmill.evaluation.metrics import operating_point
    from pixelmill.evaluation.multilabel import DEFAULT_THRESHOLD, choose_thresholds
    from pixelmill.evaluation.rules import resolve

    rule = resolve(rule, str(DEFAULT_THRESHOLD))  # auto: 0.5, the argmax decision
    pos = classes.index(positive)
    record: dict[str, Any] = {"rule": rule, "positive": positive, "split": "val"}
    if y is None or probs is None:  # a fixed threshold needs no validation data
        threshold = float(rule)
    else:
        target = (y == pos).astype(np.int64)[:, None]
        threshold = float(choose_thresholds(target, probs[:, [pos]], rule)[0])
        record |= {"n": len(y), "val": operating_point(y, probs, pos, threshold)}
    record["threshold"] = threshold
    runs.write_atomic(Path(run_dir) / runs.THRESHOLD, json.dumps(record, indent=2) + "\n")
    log.info("decision threshold %.4f on p(%s) (%s)%s", threshold, positive, rule, _val_figures(record.get("val")))
    return threshold


def _val_figures(val: dict[str, Any] | None) -> str:
    if not val:
        return ""
    return ", on val: " + ", ".join(f"{k} {val[k]:.3f}" for k in ("sensitivity", "specificity", "ppv", "npv") if val.get(k) is not None)


def choose_operating_point(
    run_dir: Path, net: torch.nn.Module, loader, calibration: str, rule: str, positive: str | None, classes: list[str]
) -> None:
    """After training, on val: the temperature (``calibration``) and, when ``positive`` is given, the binary threshold."""
    run_dir = Path(run_dir)
    for stale in (CALIBRATION_FILE, runs.THRESHOLD):  # a resumed run whose config dropped them
        (run_dir / stale).unlink(missing_ok=True)
    if loader is None:  # no val split: only a fixed threshold (check_data refused the rest)
        if positive is not None:
            choose_threshold(run_dir, None, None, classes, positive, rule)
        return
    y, logits = predict_logits(net, loader)
    temperature = calibrate(run_dir, y, logits) if calibration != "none" else 1.0
    if positive is not None:
        probs = tempered_softmax(temperature)(torch.from_numpy(logits)).numpy()  # the threshold applies to what the bundle returns
        choose_threshold(run_dir, y, probs, classes, positive, rule)


def read_temperature(run_dir: Path) -> float:
    """The run's fitted temperature (1.0 when it was not calibrated)."""
    path = Path(run_dir) / CALIBRATION_FILE
    return float(json.loads(path.read_text()).get("temperature", 1.0)) if path.is_file() else 1.0  # multi-label: "temperatures"


def evaluate(
    run_dir: Path, loader, data: Any, net: torch.nn.Module, split: str, top_k: list[int], images=None, bootstrap: int = 0, seed: int = 0,
    prep: Any = None,
) -> dict[str, Any]:
    """Evaluate ``net`` on ``loader`` (one split of ``data``); write ``eval/<split>/``, update summary.json.

    ``images(path) -> PIL image`` lets the plots show the most confidently misclassified inputs; with the
    image preprocessing ``prep`` too, the report's gallery shows where the model looked (Grad-CAM).
    """
    from pixelmill.evaluation.metrics import write_evaluation

    y_true, logits = predict_logits(net, loader)
    temperature = read_temperature(run_dir)  # 1.0 unless eval.calibrate fitted one
    probs = tempered_softmax(temperature)(torch.from_numpy(logits)).numpy()
    paths = [path for path, _ in data.splits[split]]  # image paths, or 'file.csv:LINE' row ids
    decision = runs.read_decision(run_dir)  # binary: decide at the run's threshold
    metrics = write_evaluation(
        Path(run_dir) / "eval" / split, y_true, probs, data.classes, paths, top_k=top_k, images=images, bootstrap=bootstrap, seed=seed,
        uncalibrated=softmax(torch.from_numpy(logits)).numpy() if temperature != 1.0 else None, temperature=temperature,
        decision=(data.classes.index(decision[0]), decision[1]) if decision else None,
    )
    if images is not None and prep is not None:
        from pixelmill.evaluation.metrics import EXPLAINED_FILE, decide
        from pixelmill.explain.gallery import write_gallery

        predicted = decide(probs, (data.classes.index(decision[0]), decision[1]) if decision else None)
        write_gallery(net, prep, images, paths, y_true, probs, predicted, data.classes, Path(run_dir) / "eval" / split / EXPLAINED_FILE, seed=seed)
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
        drop_path_rate=cfg.model.drop_path_rate,
        freeze_backbone=cfg.model.freeze_backbone,
        **extra,
    )
