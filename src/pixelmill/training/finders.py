"""``data.batch_size=auto`` and ``optim.lr=auto``: Lightning's Tuner picks them before training.

Both finders run on a scratch Trainer (no loggers, no checkpoints, files in a temporary folder)
over the run's own network, data and loss; the network's weights are put back afterwards, so the
run then trains exactly as it would with the found values given as numbers. The values go into
the config, which the run saves in config.yaml and logs to its trackers.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from typing import Any

import torch
from omegaconf import DictConfig

from pixelmill.errors import ConfigError

log = logging.getLogger(__name__)

LR_RANGE = (1e-8, 1.0)  # Lightning's defaults: the range test sweeps this range exponentially
LR_STEPS = 100  # learning rates tried, one optimizer step each (Lightning's default), at most one epoch's worth
MIN_LR_STEPS = 20  # fewer points leave the steepest descent to chance (the suggestion skips the first 10 and the last)
BATCH_START, BATCH_STEPS = 2, 3  # the batch-size search doubles from 2, 3 training steps per try (Lightning's defaults)
# The largest batch tried. Running out of CUDA memory is an error the finder catches and backs off
# from; elsewhere (CPU, MPS) memory running out may end the process instead, so the search stops lower.
MAX_BATCH = {"cuda": 8192, "other": 256}


def find_settings(cfg: DictConfig, task: Any, data: Any, net: torch.nn.Module, prep: Any, distributed: bool) -> dict[str, Any]:
    """Resolve the ``auto`` values of ``data.batch_size`` and ``optim.lr`` in ``cfg`` (batch size first: the
    learning rate depends on it); return what was found, by key. Nothing to do -> ``{}``."""
    wanted = [key for key in ("data.batch_size", "optim.lr") if _get(cfg, key) == "auto"]
    if not wanted:
        return {}
    if distributed:
        raise ConfigError(f"{wanted[0]}=auto runs Lightning's finder in one process; run it without DDP once, then give the value found")
    weights = copy.deepcopy(net.state_dict())  # Lightning restores them too; this keeps the run's start exact whatever it does
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pixelmill-finder-") as scratch:
        if "data.batch_size" in wanted:
            cfg.data.batch_size = found["data.batch_size"] = _find_batch_size(cfg, task, data, net, prep, scratch)
            log.info("data.batch_size=auto: Lightning's batch-size finder chose %d", cfg.data.batch_size)
        if "optim.lr" in wanted:
            cfg.optim.lr = found["optim.lr"] = _find_lr(cfg, task, data, net, prep, scratch)
            log.info("optim.lr=auto: Lightning's learning-rate finder chose %g", cfg.optim.lr)
    net.load_state_dict(weights)
    return found


def _get(cfg: DictConfig, key: str) -> Any:
    group, name = key.split(".")
    return cfg[group][name]


def _trial(cfg: DictConfig, batch_size: int) -> DictConfig:
    """A copy of ``cfg`` the finders train with: numbers for the ``auto`` keys (the learning rate is the
    finder's to set), no schedule (the finders replace or ignore it) and one process."""
    trial = copy.deepcopy(cfg)
    trial.data.batch_size = batch_size
    if trial.optim.lr == "auto":
        trial.optim.lr = 1e-3
    trial.scheduler.name = "none"
    return trial


def _scratch_trainer(cfg: DictConfig, scratch: str):
    import lightning as L

    t = cfg.trainer
    return L.Trainer(
        default_root_dir=scratch,
        max_epochs=1,
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        deterministic=t.deterministic,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _find_batch_size(cfg: DictConfig, task: Any, data: Any, net: torch.nn.Module, prep: Any, scratch: str) -> int:
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.tuner import Tuner

    trial = _trial(cfg, BATCH_START)
    trainer = _scratch_trainer(trial, scratch)
    device = "cuda" if isinstance(trainer.accelerator, CUDAAccelerator) else "other"
    datamodule = task.datamodule(trial, data, prep)  # its batch_size attribute is the trial config's data.batch_size
    size = Tuner(trainer).scale_batch_size(
        task.lightning_module(trial, net, data), datamodule=datamodule, mode="power",
        steps_per_trial=BATCH_STEPS, init_val=BATCH_START, max_val=MAX_BATCH[device],
    )
    # A size that reached the whole training split was tried as one batch of the split.
    return int(min(size or BATCH_START, len(data.splits["train"])))


def _find_lr(cfg: DictConfig, task: Any, data: Any, net: torch.nn.Module, prep: Any, scratch: str) -> float:
    from lightning.pytorch.tuner import Tuner

    trial = _trial(cfg, cfg.data.batch_size)
    datamodule = task.datamodule(trial, data, prep)
    batches = len(datamodule.train_dataloader())
    steps = batches // cfg.trainer.accumulate_grad_batches
    if steps < MIN_LR_STEPS:
        samples = len(data.splits["train"])
        fits = samples // (MIN_LR_STEPS * cfg.trainer.accumulate_grad_batches)  # a batch size that gives enough steps
        advice = f"set optim.lr to a number, or data.batch_size to {fits} or less" if fits else "set optim.lr to a number"
        raise ConfigError(
            f"optim.lr=auto: the learning-rate finder takes one optimizer step per rate and needs {MIN_LR_STEPS} or more in one epoch,"
            f" but {samples} training samples in batches of {cfg.data.batch_size} give {steps}; {advice}"
        )
    trainer = _scratch_trainer(trial, scratch)
    finder = Tuner(trainer).lr_find(
        task.lightning_module(trial, net, data), datamodule=datamodule,
        min_lr=LR_RANGE[0], max_lr=LR_RANGE[1], num_training=min(LR_STEPS, steps), update_attr=False,
    )
    lr = finder.suggestion() if finder is not None else None
    if lr is None:
        raise ConfigError("optim.lr=auto: the learning-rate finder's losses left no steepest descent to pick (too few finite losses); set optim.lr to a number")
    return float(f"{lr:.3g}")  # 3 significant digits: what a person would write in config.yaml
