"""The image dataset over a scanned file list, with per-sample seeded augmentation."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from pixelmill.data.preprocess import load_image
from pixelmill.errors import DataError

if TYPE_CHECKING:
    from pixelmill.data.cache import ImageCache


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Draw from the CPU generator seeded with ``seed`` inside, restore its state after.

    ``torch.random.fork_rng`` + ``torch.manual_seed`` give the same draws, but seed every
    device type too: about 0.3 ms per sample, more than resizing a small image.
    """
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class ImageDataset(Dataset):
    """(path, label) pairs -> (tensor, label).

    An index may be an ``int`` or an ``(int, seed)`` pair from ``SeededSampler``: with a
    seed, the random augmentation of that sample is drawn from its own generator state, so
    the result depends on (seed, epoch, position) only - not on the number of workers.

    With a ``cache`` (``data.cache``), images come resized from it as (C, H, W) uint8 tensors
    (see ``data/cache.py``); the transforms take those as well as PIL images.
    """

    def __init__(
        self,
        items: list[tuple[str, int]],
        channels: int,
        transform: Callable[[Image.Image | torch.Tensor], torch.Tensor],
        cache: ImageCache | None = None,
    ):
        self.items = items
        self.channels = channels
        self.transform = transform
        self.cache = cache

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.items[index]
        try:
            if self.cache is None:
                img: Image.Image | torch.Tensor = load_image(path, self.channels)
            else:  # (H, W, C) uint8, already resize_short-ed -> (C, H, W) view
                img = torch.from_numpy(self.cache.load(index, path)).permute(2, 0, 1)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image '{path}' ({exc}); it changed after the scan - re-run training") from None
        if seed is None or not getattr(self.transform, "random", True):
            return self.transform(img), label
        with seeded_cpu_rng(seed):
            return self.transform(img), label


class SeededSampler(Sampler[tuple[int, int]]):
    """Shuffled (or class-balanced) order plus a per-sample augmentation seed, per epoch.

    Order and seeds are a pure function of (seed, epoch): Lightning calls ``set_epoch``,
    so a resumed run draws exactly what an uninterrupted one would have drawn. Under
    distributed training each rank takes every ``world``-th position of the same global
    order, so the global batch of N ranks x B equals a one-process batch of N x B.
    """

    def __init__(self, labels: list[int], seed: int, balanced: bool = False):
        self.labels = torch.as_tensor(labels)
        self.seed = seed
        self.balanced = balanced
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _world() -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        _, world = self._world()
        return -(-len(self.labels) // world)

    def weights(self) -> torch.Tensor:
        """Per-sample weights that give every class the same expected share."""
        counts = torch.bincount(self.labels).clamp(min=1).double()
        return (1.0 / counts)[self.labels]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.labels)
        if self.balanced:
            order = torch.multinomial(self.weights(), n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        seeds = torch.randint(0, 2**31 - 1, (n,), generator=g)
        pairs = list(zip(order.tolist(), seeds.tolist()))
        rank, world = self._world()
        if world > 1:
            pairs += pairs[: len(self) * world - n]  # pad so every rank gets as many
            pairs = pairs[rank::world]
        return iter(pairs)
