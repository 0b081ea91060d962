"""LightningDataModules: over a scanned image folder, and over preprocessed CSV rows."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from pixelmill.data.cache import make_cache
from pixelmill.data.images import ImageDataset, SeededSampler, collate
from pixelmill.data.preprocess import Preprocessing
from pixelmill.data.scan import ScanResult
from pixelmill.data.transforms import eval_transform, train_transform

if TYPE_CHECKING:
    from pixelmill.data.tabular import TabularData
    from pixelmill.data.tabular_preprocess import TabularPreprocessor


MAX_AUTO_WORKERS = 8  # Ultralytics' default cap; more workers rarely feed one device faster


def resolve_workers(value: int | str, processes: int = 1) -> int:
    """``data.num_workers``: a number as it is; ``auto``: the CPU cores this process may use, shared
    among the ``processes`` training processes of this machine, minus one for the training process
    itself, at most 8 (Ultralytics divides the cores by the devices and caps at 8; timm's default is a fixed 4).
    """
    if value != "auto":
        return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # taskset / cgroup limits count
    return max(0, min(MAX_AUTO_WORKERS, cores // max(1, processes) - 1))


def _local_processes(datamodule: L.LightningDataModule) -> int:
    """Training processes on this machine (DDP: one per device) once Lightning has attached a Trainer, else 1."""
    trainer = datamodule.trainer
    return max(1, trainer.num_devices) if trainer is not None else 1


def _seeded_order(datamodule: L.LightningDataModule, sampler: SeededSampler) -> SeededSampler:
    """``sampler`` set to the epoch its loader starts in.

    Lightning builds the training loader's iterator before it calls ``set_epoch``, and a resumed run
    keeps that first iterator for its first epoch; a loader with workers reads the sampler's order
    as it builds the iterator (to prefetch), so without this a run resumed at epoch N would replay
    epoch 0's order. Lightning itself numbers the epoch by ``epoch_progress.current.processed``.
    """
    trainer = datamodule.trainer
    if trainer is not None:
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
    return sampler


class _BatchSize:
    """``batch_size`` read from and written to ``data.batch_size``: the attribute Lightning's batch-size
    finder (``Tuner.scale_batch_size``) looks for on a datamodule and sets before it builds the loaders again."""

    cfg: Any

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.cfg.batch_size = value


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, sampler=None, collate_fn=None) -> DataLoader:
    """A DataLoader in ``sampler`` order (a training SeededSampler) or in dataset order (evaluation)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # A final batch of one sample breaks BatchNorm in training; drop only that case.
        drop_last=sampler is not None and len(dataset) % batch_size == 1,
        collate_fn=collate_fn,
    )


class ImageDataModule(_BatchSize, L.LightningDataModule):
    """Train/val/test loaders for one scan; train order and augmentation are seeded."""

    def __init__(self, scan: ScanResult, prep: Preprocessing, data_cfg, seed: int):
        super().__init__()
        self.scan = scan
        self.prep = prep
        self.cfg = data_cfg
        self.seed = seed

    def dataset(self, split: str, train: bool = False) -> ImageDataset:
        """A split's dataset; with ``data.cache`` its images are decoded and resized once."""
        transform = train_transform(self.prep, self.cfg.augment) if train else eval_transform(self.prep)
        items = self.scan.splits[split]
        mode = getattr(self.cfg, "cache", "none")  # a hand-built data config may not have the key
        cache = make_cache(mode, [path for path, _ in items], self.prep, train=train)
        return ImageDataset(items, self.prep.channels, transform, cache)

    def _loader(self, dataset: ImageDataset, batch_size: int, sampler=None) -> DataLoader:
        if sampler is not None:
            _seeded_order(self, sampler)
        return make_loader(dataset, batch_size, resolve_workers(self.cfg.num_workers, _local_processes(self)), sampler, collate_fn=collate)

    def eval_loader(self, split: str) -> DataLoader:
        """Deterministic loader (no augmentation, file order) for any split."""
        return self._loader(self.dataset(split), self.cfg.eval_batch_size or self.cfg.batch_size)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train", train=True)
        labels = [label for _, label in dataset.items]
        sampler = SeededSampler(labels, self.seed, balanced=self.cfg.sampler == "balanced")
        return self._loader(dataset, self.cfg.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")


class TensorRows(Dataset):
    """(x (N, F) float32, y (N,) int64) rows; a key may be an int or a SeededSampler ``(index, seed)`` pair."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = key[0] if isinstance(key, tuple) else key  # rows have no random augmentation
        return self.x[index], self.y[index]


class TabularDataModule(_BatchSize, L.LightningDataModule):
    """Train/val/test loaders over CSV rows run through the run's fitted preprocessor; train order is seeded."""

    def __init__(self, data: TabularData, prep: TabularPreprocessor, data_cfg, seed: int):
        super().__init__()
        self.data = data
        self.prep = prep
        self.cfg = data_cfg
        self.seed = seed

    def dataset(self, split: str) -> TensorRows:
        x = torch.from_numpy(self.prep.transform(self.data.frames[split]))  # (N, F) float32
        y = torch.tensor([label for _, label in self.data.splits[split]], dtype=torch.long)
        return TensorRows(x, y)

    def eval_loader(self, split: str) -> DataLoader:
        """Deterministic loader (file order) for any split."""
        return make_loader(self.dataset(split), self.cfg.eval_batch_size or self.cfg.batch_size, self._workers())

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        sampler = SeededSampler(dataset.y.tolist(), self.seed, balanced=self.cfg.sampler == "balanced")
        return make_loader(dataset, self.cfg.batch_size, self._workers(), _seeded_order(self, sampler))

    def _workers(self) -> int:
        return resolve_workers(self.cfg.num_workers, _local_processes(self))

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")
