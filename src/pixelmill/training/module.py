"""ClassificationModule: the training system around an injected network."""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from pixelmill.config.schema import OPTIMIZERS, SCHEDULERS
from pixelmill.data.transforms import batch_mix

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"], nesterov=c["momentum"] > 0),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c["lr"], weight_decay=c["weight_decay"]),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c["lr"], weight_decay=c["weight_decay"]),
    "rmsprop": lambda p, c: torch.optim.RMSprop(p, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"]),
}
assert tuple(_OPTIMIZERS) == OPTIMIZERS, "optim.name choices (config/schema.py) and _OPTIMIZERS differ"


def warmup_cosine(warmup_steps: int, total_steps: int, min_factor: float) -> Callable[[int], float]:
    """LR factor per optimizer step: linear warm-up, then cosine decay to ``min_factor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class ClassificationModule(L.LightningModule):
    """Loss, metrics, optimizer and scheduler around ``net`` (any ``nn.Module`` giving logits).

    Hyper-parameters are plain dicts so checkpoints load with ``weights_only=True``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optim: dict[str, Any],
        scheduler: dict[str, Any],
        activation: Callable[[torch.Tensor], torch.Tensor],
        monitor: str = "val/acc",
        mode: str = "max",
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        seed: int = 42,
    ):
        super().__init__()
        # Trackers get the full config instead; the activation is code, not a hyper-parameter.
        self.save_hyperparameters(ignore=["net", "activation"], logger=False)
        self.net = net
        self.activation = activation  # the task's head (single-label: softmax)
        self.mix = batch_mix(num_classes, mixup_alpha, cutmix_alpha)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weight", weight, persistent=False)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss = MeanMetric()  # weighted by batch size
        self.train_lr = MeanMetric()  # the mean learning rate of the epoch's steps
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.val_auc = MulticlassAUROC(num_classes, average="macro")  # one-vs-rest, over the epoch's scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=self.class_weight, label_smoothing=self.hparams.label_smoothing)

    def on_train_epoch_start(self) -> None:
        # A frozen backbone keeps its BatchNorm statistics frozen too (timm's freeze semantics).
        for m in self.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout, mixup and friends draw from the global RNG: make it a function of the
        # epoch alone, so a run resumed at an epoch boundary continues bit for bit. (At the
        # first batch, not at epoch start: creating the loader's iterator draws from it too.)
        if batch_idx == 0:
            torch.manual_seed(self.hparams.seed * 1_000_003 + self.current_epoch + 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        target = y
        if self.mix is not None:
            x, target = self.mix(x, y)  # target: (B, num_classes) soft labels
        logits = self(x)
        loss = self.loss(logits, target)
        # The epoch's training metrics are torchmetrics objects updated every step and handed to
        # self.log once per epoch: Lightning computes (across ranks) and resets them at epoch
        # end. A self.log call costs about 1 ms (a Module.to per call), 2-3% of a small CNN's
        # step if made three times per step; update() skips the per-batch compute of forward().
        self.train_acc.update(logits.detach(), y if target.ndim == 1 else target.argmax(dim=1))
        self.train_loss.update(loss.detach(), len(y))
        self.train_lr.update(self.trainer.optimizers[0].param_groups[0]["lr"])
        if batch_idx == 0:
            # logger=False: epoch rows reach the trackers through RunHistory, once checkpointed.
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True, logger=False)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, logger=False)
            self.log("lr", self.train_lr, on_step=False, on_epoch=True, logger=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_f1(logits, y)
        self.val_auc.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=True, batch_size=len(y), logger=False)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=len(y), logger=False)
        self.log("val/f1_macro", self.val_f1, on_epoch=True, batch_size=len(y), logger=False)
        self.log("val/auc_macro", self.val_auc, on_epoch=True, batch_size=len(y), logger=False)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.activation(self(batch[0]))  # the task's head: (N, C) logits -> probabilities

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = _OPTIMIZERS[self.hparams.optim["name"]](params, self.hparams.optim)
        sched = self.hparams.scheduler
        name = sched["name"]
        if name == "none":
            return optimizer
        if name == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=self.hparams.mode, factor=sched["gamma"], patience=sched["patience"], min_lr=sched["min_lr"]
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.monitor}}
        if name == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=sched["step_size"], gamma=sched["gamma"])
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        total = int(self.trainer.estimated_stepping_batches)
        if name == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.optim["lr"], total_steps=total)
        elif name == "cosine":  # with optional linear warm-up
            steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs))
            min_factor = sched["min_lr"] / self.hparams.optim["lr"]
            fn = warmup_cosine(sched["warmup_epochs"] * steps_per_epoch, total, min_factor)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
        else:
            raise ValueError(f"Invalid scheduler {name!r}. Only {', '.join(SCHEDULERS)} are supported.")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
