"""``data.cache``: images decoded and resized once, then shared by every DataLoader worker.

``memory`` keeps them in anonymous shared memory that forked workers inherit; ``disk`` in a
memory-mapped file in the image cache folder (``$PIXELMILL_IMAGE_CACHE_DIR``, else
``<user cache>/pixelmill/images``; see ``pixelmill.caches``), shared by workers, DDP ranks and
later runs on the same files. Either way an image decoded by any worker is a hit for all of
them afterwards.

What is stored is ``preprocess.resize_short`` of the decoded image (shorter side =
``resize_to``), so evaluation - a centre crop of it - sees exactly the pixels it sees
without a cache. Training augmentation runs after the cache, on that resized image (so a
random crop starts from ``resize_to`` pixels, not the full photo), and training splits are
decoded the fast way (``ImageCache._decode``): training pixels differ slightly from
``data.cache=none``, but never between epochs, workers, cache hits and misses or runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resize

from pixelmill.caches import IMAGE_CACHE_ENV, image_cache_dir
from pixelmill.data.choices import CACHE_MODES
from pixelmill.data.preprocess import Preprocessing, load_image, resize_short, resized_size
from pixelmill.errors import DataError

log = logging.getLogger(__name__)

CACHE_DIR_ENV = IMAGE_CACHE_ENV  # the variable that moves the disk cache (error messages name it)
_LAYOUT_VERSION = 1


def _slot_bytes(path: str, prep: Preprocessing) -> int:
    """Bytes of the resized image, from the file header alone (0 = never cached)."""
    try:
        with Image.open(path) as img:
            w, h = resized_size(img.size, prep)  # an EXIF rotation swaps w and h: same bytes
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0
    return w * h * prep.channels


def _available_ram() -> int | None:
    """Bytes of RAM available without swapping (Linux: MemAvailable), or None if unknown."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, NotImplementedError):
        return None


class ImageCache:
    """One file list's resized images in one flat uint8 buffer: ``load(i, path)`` -> (H, W, C) uint8.

    The slots are laid out up front from the image headers. The buffer holds N fill flags,
    N (height, width) pairs, then the pixels; a slot is written before its flag is set, so
    a reader never sees half an image. A hit returns exactly the pixels a miss computes, so
    nothing a model sees depends on what happens to be cached.

    ``train``: a training split, whose pixels are augmented anyway - decoded faster (see
    ``_decode``), a little differently from evaluation's exact pixels.
    """

    def __init__(self, paths: list[str], prep: Preprocessing, mode: str, train: bool = False):
        if mode not in ("memory", "disk"):
            raise ValueError(f"invalid cache mode '{mode}'; only memory and disk are supported")
        self.prep = prep
        self.mode = mode
        self.train = train
        sizes = np.array([_slot_bytes(p, prep) for p in paths], dtype=np.int64)
        self.n = len(paths)
        self._pixels_at = -(-self.n // 8) * 8 + 8 * self.n  # after flags (padded) and shapes
        self.offsets = self._pixels_at + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.sizes = sizes
        self.total = int(self._pixels_at + sizes.sum())
        self.path: Path | None = self._disk_file(paths) if mode == "disk" else None
        self._buf: np.ndarray | None = None
        self._check_room()
        self._open()
        log.info("data.cache=%s: up to %.1f MB for %d images%s", mode, self.total / 1e6, self.n, f" in {self.path}" if self.path else "")

    # -- storage ----------------------------------------------------------------------------

    def _disk_file(self, paths: list[str]) -> Path:
        """The cache file's name: a hash of the files (path, size, mtime) and the preprocessing."""
        digest = hashlib.sha256()
        digest.update(json.dumps([_LAYOUT_VERSION, self.prep.channels, self.prep.resize_to, self.prep.interpolation, self.train]).encode())
        for p in paths:
            try:
                st = os.stat(p)
                digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                digest.update(f"{p}\0missing\n".encode("utf-8", "surrogateescape"))
        return image_cache_dir() / f"{digest.hexdigest()[:24]}.u8"

    def _check_room(self) -> None:
        if self.mode == "memory":
            free = _available_ram()
            if free is not None and self.total > 0.8 * free:
                raise DataError(
                    f"data.cache=memory needs up to {self.total / 1e9:.1f} GB but {free / 1e9:.1f} GB of RAM is free; "
                    "set data.cache=disk or data.cache=none"
                )
            return
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create the cache directory '{self.path.parent}' ({exc.strerror}); set {CACHE_DIR_ENV} to a writable folder") from None
        present = self.path.stat().st_size if self.path.exists() else 0
        if present != self.total and shutil.disk_usage(self.path.parent).free < self.total:
            raise DataError(
                f"data.cache=disk needs {self.total / 1e9:.1f} GB in '{self.path.parent}' and less is free; "
                f"set {CACHE_DIR_ENV} to a bigger disk or data.cache=memory or none"
            )

    def _open(self) -> None:
        if self.total == 0:
            self._buf = np.zeros(0, dtype=np.uint8)
        elif self.mode == "memory":
            # MAP_SHARED | MAP_ANONYMOUS: forked workers write into the same pages; RAM is only
            # used as slots fill, and no /dev/shm space is needed.
            self._buf = np.frombuffer(mmap.mmap(-1, self.total), dtype=np.uint8)
        else:
            assert self.path is not None
            if not self.path.exists() or self.path.stat().st_size != self.total:
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                with open(tmp, "wb") as fh:
                    fh.truncate(self.total)  # sparse: zero flags, no space used until written
                os.replace(tmp, self.path)
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(self.total,))

    def __getstate__(self) -> dict:
        # Pickled (a 'spawn' DataLoader worker): a disk cache reopens its file; anonymous memory
        # cannot travel, so that worker keeps a private cache - still correct, less shared.
        state = self.__dict__.copy()
        state["_buf"] = None
        return state

    def _buffer(self) -> np.ndarray:
        if self._buf is None:
            self._open()
        return self._buf

    # -- access -----------------------------------------------------------------------------

    def _flags(self, buf: np.ndarray) -> np.ndarray:
        return buf[: self.n]

    def _shapes(self, buf: np.ndarray) -> np.ndarray:
        start = -(-self.n // 8) * 8
        return buf[start : start + 8 * self.n].view(np.int32).reshape(self.n, 2)

    def get(self, index: int) -> np.ndarray | None:
        """The cached (H, W, C) uint8 image (a view of the shared buffer), or None."""
        buf = self._buffer()
        if not self._flags(buf)[index]:
            return None
        h, w = (int(v) for v in self._shapes(buf)[index])
        start = int(self.offsets[index])
        return buf[start : start + int(self.sizes[index])].reshape(h, w, self.prep.channels)

    def put(self, index: int, image: np.ndarray) -> None:
        """Store one (H, W, C) resized image (skipped if it does not fit its slot: the file changed)."""
        if image.nbytes != int(self.sizes[index]) or image.nbytes == 0:
            return
        buf = self._buffer()
        start = int(self.offsets[index])
        buf[start : start + image.nbytes] = image.reshape(-1)
        self._shapes(buf)[index] = image.shape[:2]
        self._flags(buf)[index] = 1

    def load(self, index: int, path: str) -> np.ndarray:
        """Image ``index`` (file ``path``) after ``resize_short``, (H, W, C) uint8: cached, else decoded and stored.

        Treat the result as read-only: it may be the shared buffer itself.
        """
        pixels = self.get(index)
        if pixels is not None:
            return pixels
        pixels = self._decode(path)
        self.put(index, pixels)
        return pixels

    def _decode(self, path: str) -> np.ndarray:
        """The file as (H, W, C) uint8 after ``resize_short``: exactly (evaluation splits), or fast
        (training: JPEG draft mode, then torch's uint8 antialiased resize - 2.7x faster than PIL's,
        within 1 grey level of it)."""
        c = self.prep.channels
        if not self.train:
            img = resize_short(load_image(path, c), self.prep)
            return np.array(img, dtype=np.uint8).reshape(img.height, img.width, c)
        img = load_image(path, c, draft_short=self.prep.resize_to)
        x = torch.from_numpy(np.array(img, dtype=np.uint8).reshape(img.height, img.width, c)).permute(2, 0, 1)
        w, h = resized_size(img.size, self.prep)
        if (w, h) != img.size:  # (C, H, W) channels-last uint8: torch's vectorised path
            x = resize(x, [h, w], interpolation=InterpolationMode(self.prep.interpolation), antialias=True)
        return x.permute(1, 2, 0).contiguous().numpy()


def make_cache(mode: str, paths: list[str], prep: Preprocessing, train: bool = False) -> ImageCache | None:
    """An ``ImageCache`` for ``data.cache=memory|disk``; None for ``none``."""
    if mode not in CACHE_MODES:
        raise DataError(f"invalid data.cache '{mode}'; choose one of: {', '.join(CACHE_MODES)}")
    return None if mode == "none" else ImageCache(paths, prep, mode, train=train)
