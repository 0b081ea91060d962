"""Weight averaging (``model.ema``, ``trainer.swa``) on Lightning's ``WeightAveraging`` callback.

Lightning's callback keeps a ``torch.optim.swa_utils.AveragedModel`` beside the module, swaps the
average in for every validation, and saves it as the checkpoint's ``state_dict`` (the trained
weights go to ``current_model_state``, the averaging state to ``averaging_state``). So the best and
last checkpoints hold the average, and evaluation, export and ``load_run`` read it with no change,
while a resume restores both and continues bit for bit.

Lightning's ``StochasticWeightAveraging`` is not used for SWA: it validates and checkpoints the
trained weights rather than the average, adds an extra epoch to recompute batch-norm statistics
(an extra row in metrics.csv and an extra checkpoint), and leaves the average of a network
without batch norm only in memory at the end, where neither evaluation nor export would see it.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from omegaconf import DictConfig
from torch import Tensor


def ema_decay(n_averaged: int, decay: float, warmup: bool) -> float:
    """The decay of the average's ``n_averaged + 1``-th update (the first one copies the weights).

    timm's ``ModelEmaV3.get_decay`` with its default warm-up (gamma 1, power 2/3): ``1 - (1 + n)^(-2/3)``,
    at most ``decay``; it reaches 0.99 after about 1,000 updates and 0.999 after about 31,000.
    """
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + n_averaged) ** (-2.0 / 3.0))


def ema_update(decay: float, warmup: bool) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """``AveragedModel``'s ``multi_avg_fn``: average <- average + (1 - decay) * (weights - average), per dtype group.

    torch's ``get_ema_multi_avg_fn`` has a fixed decay; the warm-up needs the update count it is given.
    """

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        if not averaged[0].is_floating_point():  # batch norm's num_batches_tracked: a count, copied as timm does
            for a, c in zip(averaged, current):
                a.copy_(c)
            return
        torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(int(n_averaged), decay, warmup))

    return update


class ExponentialAverage(WeightAveraging):
    """``model.ema``: an exponential moving average of the weights and buffers, updated after every optimizer step."""

    def __init__(self, decay: float, warmup: bool = True):
        super().__init__(use_buffers=True, multi_avg_fn=ema_update(decay, warmup))
        self.decay = decay
        self.warmup = warmup


class EpochAverage(WeightAveraging):
    """``trainer.swa``: the equal-weight average of the weights (and batch-norm statistics) at the end of each
    epoch from ``start`` (0-based) on; ``lr``, when given, is the learning rate held from that epoch on.

    The average takes each epoch's weights at its last training step, so the validation that
    follows (and the checkpoint saved after it) already includes that epoch. Until the first
    update there is no average: validation and checkpoints use the trained weights.
    """

    def __init__(self, start: int, lr: float | None = None):
        super().__init__(use_buffers=True)  # no avg_fn: AveragedModel's equal-weight running mean
        self.start = start
        self.lr = lr

    def _averaging(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        # Set before every step, the rate holds whatever the scheduler does after it (SWA's constant
        # learning rate); it depends on the epoch alone, so a resumed run sets the same rates.
        if self.lr is not None and trainer.current_epoch >= self.start:
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = batch_idx + 1 >= trainer.num_training_batches
        if last and trainer.current_epoch >= self.start and trainer.global_step > self._latest_update_step:
            assert self._average_model is not None
            self._average_model.update_parameters(pl_module)
            self._latest_update_step = trainer.global_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # updated at the epoch's last step instead, before its validation

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._averaging():
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._averaging():
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._averaging():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._averaging():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "averaging_state" in checkpoint:  # saved once averaging had begun; before that there is nothing to restore
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def swa_start_epoch(start: int | float, max_epochs: int) -> int:
    """``trainer.swa_epoch_start`` as a 0-based epoch: an epoch number (1: the first) or a fraction of ``max_epochs``."""
    if isinstance(start, float):
        return min(max_epochs - 1, int(start * max_epochs))
    return start - 1


def averaging_callbacks(cfg: DictConfig) -> list[WeightAveraging]:
    """The weight-averaging callback the config asks for (the config refuses both at once), or none."""
    if cfg.model.ema:
        return [ExponentialAverage(cfg.model.ema_decay, cfg.model.ema_warmup)]
    if cfg.trainer.swa:
        return [EpochAverage(swa_start_epoch(cfg.trainer.swa_epoch_start, cfg.trainer.max_epochs), cfg.trainer.swa_lr)]
    return []
