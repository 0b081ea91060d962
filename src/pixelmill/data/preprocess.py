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

from pixelmill.data.choices import INTERPOLATIONS

MAX_ASPECT = 64  # longest side / shortest side we agree to resize

_EXIF_ORIENTATION = 0x0112

# ``data.interpolation`` name -> PIL filter, for every name the config accepts. torchvision needs
# no table: its InterpolationMode has these names as values (``InterpolationMode(name)``).
PIL_INTERPOLATION: dict[str, Image.Resampling] = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}


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
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, ...) to 'L' or 'RGB', upright per its EXIF orientation.

    May return ``img`` itself when nothing changes; never modifies it.
    """
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)  # a copy (without a rotation it would only copy)
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


def load_image(path: str | Path, channels: int, draft_short: int | None = None) -> Image.Image:
    """Open an image file fully decoded in 'L' or 'RGB' mode.

    ``draft_short`` is for training-time loading only: a JPEG whose shorter side is at least
    twice ``draft_short`` decodes at 1/2, 1/4 or 1/8 scale (PIL draft mode, much faster), its
    shorter side staying at least ``draft_short``. Those pixels differ slightly from a full
    decode, so evaluation, export and serving never pass it.
    """
    img = Image.open(path)
    try:
        if draft_short and img.format == "JPEG" and min(img.size) >= 2 * draft_short:
            w, h = img.size
            short = min(w, h)
            img.draft(img.mode, (-(-w * draft_short // short), -(-h * draft_short // short)))
        img.load()
        out = to_mode(img, channels)
    except BaseException:
        img.close()
        raise
    # Closing an image invalidates its pixels, so the decoded image itself is returned
    # unclosed (no copy) once loading has released its file; multi-frame formats keep it open.
    if out is img and getattr(img, "fp", None) is not None:
        out = img.copy()
    if out is not img:
        img.close()
    return out


def resized_size(size: tuple[int, int], prep: Preprocessing) -> tuple[int, int]:
    """(width, height) once the shorter side of ``size`` is resized to ``prep.resize_to``."""
    w, h = size
    short, long = (w, h) if w <= h else (h, w)
    if long > MAX_ASPECT * short:  # a 1 x 1,000,000 strip would be resized to gigapixels
        raise ValueError(f"image of {w}x{h} pixels is too elongated (over {MAX_ASPECT}:1) to resize")
    new_short = prep.resize_to
    new_long = int(new_short * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def resize_short(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the shorter side to ``prep.resize_to`` (torchvision's ``Resize(int)`` on PIL images).

    ``data.cache`` stores exactly this, so a cached image centre-cropped is the evaluation input.
    """
    new_size = resized_size(img.size, prep)
    return img if new_size == img.size else img.resize(new_size, PIL_INTERPOLATION[prep.interpolation])


def resize_and_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the shorter side to ``prep.resize_to`` and centre-crop ``prep.size`` square.

    Matches torchvision's ``Resize(int)`` + ``CenterCrop`` on PIL images.
    """
    img = resize_short(img, prep)
    w, h = img.size
    if (w, h) != (prep.size, prep.size):
        left, top = crop_origin((w, h), prep.size)
        img = img.crop((left, top, left + prep.size, top + prep.size))
    return img


def crop_origin(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """(left, top) of the centred ``crop`` x ``crop`` square in an image of (width, height) ``size``."""
    w, h = size
    return int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))


def to_model_input(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A PIL image of any mode -> (H, W, C) uint8, the bundle's input for one image."""
    arr = np.asarray(resize_and_crop(to_mode(img, prep.channels), prep), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
