"""The PyTorch side of multi-label classification: sigmoid head, BCE training, thresholds, evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torchmetrics.classification import MultilabelAUROC, MultilabelAveragePrecision, MultilabelF1Score

from pixelmill import runs
from pixelmill.data.datamodule import ImageDataModule
from pixelmill.data.images import SeededSampler
from pixelmill.errors import RunError
from pixelmill.tasks.classification import CALIBRATION_FILE, module_options, predict_logits
from pixelmill.tasks.multilabel.data import rarest_label
from pixelmill.training.module import ClassificationModule

log = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"  # RUN_DIR/thresholds.json: {"rule": ..., "split": "val", "thresholds": {label: t}}
# The metrics of an evaluation that summary.json keeps per split (the rest is in eval/<split>/metrics.json).
HEADLINE = ("map", "auc_macro", "f1_micro", "f1_macro", "subset_accuracy", "hamming_loss")


def sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """The multi-label head: (N, L) logits -> (N, L) float32 independent label probabilities."""
    return torch.sigmoid(logits.float())


def positive_weights(targets: np.ndarray) -> list[float]:
    """Per label negatives / positives in train: BCE's ``pos_weight`` that balances each label's two sides."""
    positives = targets.sum(axis=0)
    return [float((len(targets) - p) / max(p, 1.0)) for p in positives]


class MultiLabelModule(ClassificationModule):
    """``ClassificationModule`` with a sigmoid per label: BCE-with-logits loss, multi-label metrics.

    Optimizer, scheduler, seeding and mixup/cutmix (torchvision's, on (B, L) targets) are the
    single-label module's. Per-epoch F1 scores use 0.5 (the run's thresholds are chosen after training).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        num_classes: int,
        optim: dict[str, Any],
        scheduler: dict[str, Any],
        monitor: str = "val/map",
        mode: str = "max",
        pos_weight: list[float] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        seed: int = 42,
    ):
        super().__init__(
            net, num_classes, optim, scheduler, sigmoid, monitor=monitor, mode=mode,
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, seed=seed,
        )
        weight = torch.tensor(pos_weight, dtype=torch.float32) if pos_weight else None
        self.register_buffer("pos_weight", weight, persistent=False)
        del self.train_acc, self.val_acc, self.val_f1  # val_auc is replaced below by the multi-label one
        self.train_f1 = MultilabelF1Score(num_classes, average="micro")
        self.val_map = MultilabelAveragePrecision(num_classes, average="macro")
        self.val_auc = MultilabelAUROC(num_classes, average="macro")
        self.val_f1_micro = MultilabelF1Score(num_classes, average="micro")
        self.val_f1_macro = MultilabelF1Score(num_classes, average="macro")

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=self.pos_weight)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        y = y.float()
        target = y
        if self.mix is not None:
            x, target = self.mix(x, y)  # (B, L) targets mixed like the images
        logits = self(x)
        loss = self.loss(logits, target)
        self.train_f1.update(logits.detach(), y.int() if self.mix is None else (target > 0.5).int())
        self.train_loss.update(loss.detach(), len(y))
        self.train_lr.update(self.trainer.optimizers[0].param_groups[0]["lr"])
        if batch_idx == 0:  # see ClassificationModule.training_step: metric objects logged once per epoch
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True, logger=False)
            self.log("train/f1_micro", self.train_f1, on_step=False, on_epoch=True, logger=False)
            self.log("lr", self.train_lr, on_step=False, on_epoch=True, logger=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        labels = y.int()
        for metric in (self.val_map, self.val_auc, self.val_f1_micro, self.val_f1_macro):
            metric.update(logits, labels)
        n = len(y)
        self.log("val/loss", F.binary_cross_entropy_with_logits(logits, y.float()), on_epoch=True, prog_bar=True, batch_size=n, logger=False)
        self.log("val/map", self.val_map, on_epoch=True, prog_bar=True, batch_size=n, logger=False)
        self.log("val/auc_macro", self.val_auc, on_epoch=True, batch_size=n, logger=False)
        self.log("val/f1_micro", self.val_f1_micro, on_epoch=True, batch_size=n, logger=False)
        self.log("val/f1_macro", self.val_f1_macro, on_epoch=True, batch_size=n, logger=False)


class MultiLabelDataModule(ImageDataModule):
    """The image loaders over (path, (L,) targets) items; the balanced sampler balances each image's rarest label."""

    def train_dataloader(self):
        dataset = self.dataset("train", train=True)
        targets = self.scan.targets("train")
        sampler = SeededSampler(rarest_label(targets).tolist(), self.seed, balanced=self.cfg.sampler == "balanced")
        return self._loader(dataset, self.cfg.batch_size, sampler)


def lightning_module(cfg: Any, net: torch.nn.Module, data: Any) -> MultiLabelModule:
    weights = positive_weights(data.targets("train")) if cfg.model.class_weights == "auto" else None
    return MultiLabelModule(net, num_classes=len(data.classes), pos_weight=weights, **module_options(cfg))


Calibration = tuple[np.ndarray, np.ndarray]  # per label (scale, bias): probabilities are sigmoid(scale * logit + bias)


def calibrated_sigmoid(calibration: Calibration | None):
    """The multi-label head: sigmoid(scale * logits + bias) per label (eval.calibrate); plain sigmoid without calibration."""
    if calibration is None:
        return sigmoid
    scale, bias = (torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in calibration)
    return lambda logits: torch.sigmoid(logits.float() * scale + bias)


def predict_probs(net: torch.nn.Module, loader, calibration: Calibration | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, L), probabilities (N, L)) for every batch of ``loader``, calibrated when ``calibration`` is given."""
    y, logits = predict_logits(net, loader)
    return y.astype(np.float32), calibrated_sigmoid(calibration)(torch.from_numpy(logits)).numpy()


def fit_label_calibration(logits: np.ndarray, y: np.ndarray, method: str) -> Calibration:
    """Per label (scale, bias) minimising that label's binary cross-entropy on ``logits`` (N, L) and 0/1 ``y``.

    ``temperature``: a scale 1/T and no bias (temperature scaling, Guo et al. 2017, per sigmoid).
    ``platt``: scale and bias (Platt scaling; scikit-learn's ``CalibratedClassifierCV(method="sigmoid")``
    fits the same model one classifier at a time, on scores, not inside a network's graph).
    A label without both positives and negatives keeps (1, 0): there is nothing to fit. The labels
    are independent problems, solved together by L-BFGS on log scale (and bias).
    """
    z, target = torch.from_numpy(logits).double(), torch.from_numpy(np.asarray(y, dtype=np.float64))
    fittable = ((target.sum(0) > 0) & (target.sum(0) < len(target))).double()
    log_scale = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=method == "platt")
    params = [log_scale, bias] if method == "platt" else [log_scale]
    optimizer = torch.optim.LBFGS(params, lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        losses = F.binary_cross_entropy_with_logits(z * log_scale.exp() + bias, target, reduction="none").mean(0)
        loss = (losses * fittable).sum()  # separable: each label follows its own loss
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    keep = fittable.numpy() > 0
    return np.where(keep, log_scale.exp().detach().numpy(), 1.0), np.where(keep, bias.detach().numpy(), 0.0)


def fit_label_temperatures(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One temperature per label (1 / the scale of ``fit_label_calibration(..., "temperature")``)."""
    return 1.0 / fit_label_calibration(logits, y, "temperature")[0]


def calibrate_labels(run_dir: Path, net: torch.nn.Module, loader, classes: list[str], method: str) -> Calibration:
    """``eval.calibrate`` for a multi-label run: per-label scale and bias on val, written to RUN_DIR/calibration.json."""
    from pixelmill.evaluation.multilabel import label_calibration_error

    y, logits = predict_logits(net, loader)
    scale, bias = fit_label_calibration(logits, y, method)
    before, after = (calibrated_sigmoid(c)(torch.from_numpy(logits)).numpy() for c in (None, (scale, bias)))
    record: dict[str, Any] = {
        "method": method, "scale": dict(zip(classes, map(float, scale))), "bias": dict(zip(classes, map(float, bias))),
        "split": "val", "n": len(y), "ece_before": label_calibration_error(y, before), "ece_after": label_calibration_error(y, after),
    }
    if method == "temperature":
        record["temperatures"] = {name: 1.0 / a for name, a in record["scale"].items()}
    runs.write_atomic(Path(run_dir) / CALIBRATION_FILE, json.dumps(record, indent=2) + "\n")
    log.info("%s calibration per label on %d val images: ECE %.4f -> %.4f", method, len(y), record["ece_before"], record["ece_after"])
    if record["ece_after"] > record["ece_before"] and method == "temperature":
        log.warning("temperature scaling raised the val ECE (a label's probabilities are shifted, not only too sharp); eval.calibrate=platt also fits a bias")
    return scale, bias


def read_label_calibration(run_dir: Path, classes: list[str]) -> Calibration | None:
    """The run's per-label (scale, bias) in label order, None when it was not calibrated."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    scale, bias = record.get("scale") or {}, record.get("bias") or {}
    return np.array([float(scale.get(name, 1.0)) for name in classes]), np.array([float(bias.get(name, 0.0)) for name in classes])


def choose_thresholds(run_dir: Path, loader, data: Any, net: torch.nn.Module, rule: str) -> dict[str, float]:
    """Pick one threshold per label on the validation loader by ``rule``; write RUN_DIR/thresholds.json."""
    from pixelmill.evaluation.multilabel import choose_thresholds as choose

    y_true, probs = predict_probs(net, loader, read_label_calibration(run_dir, data.classes))  # thresholds on what the bundle returns
    thresholds = {name: float(t) for name, t in zip(data.classes, choose(y_true, probs, rule))}
    record = {"rule": rule, "split": "val", "n": len(y_true), "thresholds": thresholds}
    runs.write_atomic(Path(run_dir) / THRESHOLDS_FILE, json.dumps(record, indent=2) + "\n")
    log.info("thresholds (%s on %d val images): %s", rule, len(y_true), ", ".join(f"{k} {v:.3f}" for k, v in thresholds.items()))
    return thresholds


def read_thresholds(run_dir: Path, classes: list[str]) -> dict[str, float]:
    """The run's per-label thresholds (RunError when training never chose them)."""
    path = Path(run_dir) / THRESHOLDS_FILE
    try:
        thresholds = json.loads(path.read_text())["thresholds"]
    except (OSError, ValueError, KeyError):
        raise RunError(f"'{run_dir}' has no {THRESHOLDS_FILE}; finish training first (pixelmill train resume={run_dir})") from None
    if list(thresholds) != list(classes):
        raise RunError(f"{path} names labels {list(thresholds)}, the run {list(classes)}; evaluate the run again")
    return {k: float(v) for k, v in thresholds.items()}


def evaluate(run_dir: Path, loader, data: Any, net: torch.nn.Module, split: str, bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Evaluate ``net`` on one split at the run's thresholds; write ``eval/<split>/``, update summary.json."""
    from pixelmill.evaluation.multilabel import write_multilabel_evaluation

    thresholds = read_thresholds(run_dir, data.classes)
    calibration = read_label_calibration(run_dir, data.classes)
    y_true, logits = predict_logits(net, loader)
    y_true = y_true.astype(np.float32)
    probs = calibrated_sigmoid(calibration)(torch.from_numpy(logits)).numpy()
    paths = [path for path, _ in data.splits[split]]
    t = np.array([thresholds[c] for c in data.classes])
    metrics = write_multilabel_evaluation(
        Path(run_dir) / "eval" / split, y_true, probs, t, data.classes, paths, bootstrap, seed,
        uncalibrated=sigmoid(torch.from_numpy(logits)).numpy() if calibration is not None else None, calibration=calibration,
    )
    evals = runs.load_summary(run_dir).eval
    evals[split] = {k: metrics.get(k) for k in HEADLINE} | {"n": len(y_true)}
    runs.update_summary(run_dir, eval=evals)
    log.info("%s: mAP %.4f, micro F1 %.4f on %d images", split, metrics["map"] or float("nan"), metrics["f1_micro"], len(y_true))
    return metrics
