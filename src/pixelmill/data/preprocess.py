"""Evaluation-time preprocessing shared by training, export, predict and serving.

Torch-free on purpose: the serving process imports this module, so the pixels a served
model sees are produced by the very code that produced them during evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

MAX_ASPECT = 64  # longest side / shortest side we agree to resize

_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    """How a raw image becomes the model's input: one source of truth for every consumer."""

    channels: int
    size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def resize_to(self) -> int:
        """Shorter side before the centre crop (timm's ``crop_pct`` convention)."""
        return int(self.size / self.crop_pct) if self.crop_pct < 1.0 else self.size

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(
            channels=int(data["channels"]),
            size=int(data["size"]),
            crop_pct=float(data["crop_pct"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, ...) to 'L' or 'RGB'."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * 255.0 / top + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white, as an image viewer shows them, not black.
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def load_image(path: str | Path, channels: int) -> Image.Image:
    """Open an image file fully decoded in 'L' or 'RGB' mode."""
    with Image.open(path) as img:
        img.load()
        return to_mode(img, channels)


def resize_and_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the shorter side to ``prep.resize_to`` and centre-crop ``prep.size`` square.

    Matches torchvision's ``Resize(int)`` + ``CenterCrop`` on PIL images.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short = prep.resize_to
    if long > MAX_ASPECT * short:  # a 1 x 1,000,000 strip would be resized to gigapixels
        raise ValueError(f"image of {w}x{h} pixels is too elongated (over {MAX_ASPECT}:1) to resize")
    new_long = int(new_short * long / short)
    new_size = (new_short, new_long) if w <= h else (new_long, new_short)
    if new_size != img.size:
        img = img.resize(new_size, _PIL_INTERPOLATION[prep.interpolation])
    w, h = img.size
    top = int(round((h - prep.size) / 2.0))
    left = int(round((w - prep.size) / 2.0))
    if (w, h) != (prep.size, prep.size):
        img = img.crop((left, top, left + prep.size, top + prep.size))
    return img


def to_model_input(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A PIL image of any mode -> (H, W, C) uint8, the bundle's input for one image."""
    arr = np.asarray(resize_and_crop(to_mode(img, prep.channels), prep), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
