"""LightningDataModule over a scanned image folder."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from pixelmill.data.images import ImageDataset, SeededSampler
from pixelmill.data.preprocess import Preprocessing
from pixelmill.data.scan import ScanResult
from pixelmill.data.transforms import eval_transform, train_transform


class ImageDataModule(L.LightningDataModule):
    """Train/val/test loaders for one scan; train order and augmentation are seeded."""

    def __init__(self, scan: ScanResult, prep: Preprocessing, data_cfg, seed: int):
        super().__init__()
        self.scan = scan
        self.prep = prep
        self.cfg = data_cfg
        self.seed = seed

    def dataset(self, split: str, train: bool = False) -> ImageDataset:
        transform = train_transform(self.prep, self.cfg.augment) if train else eval_transform(self.prep)
        return ImageDataset(self.scan.splits[split], self.prep.channels, transform)

    def _loader(self, dataset: ImageDataset, batch_size: int, sampler=None) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            persistent_workers=workers > 0,
            # A final batch of one sample breaks BatchNorm in training; drop only that case.
            drop_last=sampler is not None and len(dataset) % batch_size == 1,
        )

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
