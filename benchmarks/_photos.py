"""Realistic-size JPEG photos for the data benchmarks, made offline from scikit-learn's sample photos.

Each image is a random crop of ``china.jpg`` or ``flower.jpg`` (427x640), rescaled to about
500x375 (some portrait), recoloured, with shapes and sensor-like noise drawn on top; the
class decides the shape drawn, so the folder is a learnable 4-class problem.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circles", "squares", "stripes", "plain")
_VERSION = 1  # bump when the generator changes: cached folders are keyed by it


def _sources() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(img) for img in load_sample_images().images]


def _one(src: Image.Image, cls: str, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = src.size
    scale = rng.uniform(0.5, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = src.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-20, 20)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, size[0] - 60)), int(rng.integers(0, size[1] - 60))
        d = int(rng.integers(30, 120))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if cls == "circles":
            draw.ellipse((x0, y0, x0 + d, y0 + d), fill=colour)
        elif cls == "squares":
            draw.rectangle((x0, y0, x0 + d, y0 + d), fill=colour)
        elif cls == "stripes":
            draw.line((x0, 0, x0 + d, size[1]), fill=colour, width=int(rng.integers(4, 12)))
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(size[1], size[0], 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_photos(root: str | Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """Write ``n`` JPEGs as ``root/<class>/<i>.jpg`` (a quarter of them portrait); reuse a complete folder."""
    root = Path(root)
    done = root / f".complete-v{_VERSION}-{n}-{size[0]}x{size[1]}-{seed}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    sources = _sources()
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        portrait = rng.random() < 0.25
        img = _one(sources[i % len(sources)], cls, rng, size[::-1] if portrait else size)
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=int(rng.integers(80, 95)))
    done.touch()
    return root


def bench_dir() -> Path:
    """Where benchmark inputs are kept between runs ($PIXELMILL_BENCH_DATA, else the temp dir)."""
    import tempfile

    base = Path(os.environ.get("PIXELMILL_BENCH_DATA", tempfile.gettempdir())) / "pixelmill-bench"
    base.mkdir(parents=True, exist_ok=True)
    return base


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``path``.lock: concurrent benchmark runs build shared inputs once."""
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def photo_dir(n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """A reusable folder of ``n`` photos under ``bench_dir()`` (made on first use).

    Another ``seed`` draws other photos of the same classes: images no run trained on.
    """
    root = bench_dir() / f"photos-{n}-{size[0]}x{size[1]}-v{_VERSION}{f'-seed{seed}' if seed else ''}"
    with locked(root):
        return make_photos(root, n, size, seed)
