"""LightningDataModules: over a scanned image folder, and over preprocessed CSV rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

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


class ImageDataModule(L.LightningDataModule):
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
        return make_loader(dataset, batch_size, self.cfg.num_workers, sampler, collate_fn=collate)

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


class TabularDataModule(L.LightningDataModule):
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
        return make_loader(self.dataset(split), self.cfg.eval_batch_size or self.cfg.batch_size, self.cfg.num_workers)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        sampler = SeededSampler(dataset.y.tolist(), self.seed, balanced=self.cfg.sampler == "balanced")
        return make_loader(dataset, self.cfg.batch_size, self.cfg.num_workers, sampler)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")
