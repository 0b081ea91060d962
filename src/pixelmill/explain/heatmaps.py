"""Heatmaps with NumPy only: what the torch-free runtime, the CLI and the server do with class activation maps."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class Explanation:
    """One image's explanation of one class: the class, its probability and the (H, W) heatmap in [0, 1]."""

    label: str
    probability: float
    heatmap: np.ndarray

    def peak(self) -> tuple[int, int]:
        """(row, column) of the heatmap's maximum."""
        return tuple(int(v) for v in np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape))  # type: ignore[return-value]


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and the weight of hi for each output position: half-pixel centres, edges clamped."""
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) -> (..., H, W) bilinear resize with half-pixel centres.

    The same rule as ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``,
    which the PyTorch path uses; the server has no torch, and Pillow's bilinear filter treats the
    borders differently, so the few lines are written out here.
    """
    maps = np.asarray(maps, dtype=np.float32)
    (rlo, rhi, rw), (clo, chi, cw) = _axis_weights(maps.shape[-2], size[0]), _axis_weights(maps.shape[-1], size[1])
    rows = maps[..., rlo, :] * (1 - rw)[:, None] + maps[..., rhi, :] * rw[:, None]
    return (rows[..., clo] * (1 - cw) + rows[..., chi] * cw).astype(np.float32)


def normalise(maps: np.ndarray) -> np.ndarray:
    """Per map (the last two axes): divide by the maximum; all zero when the maximum is not positive."""
    maps = np.asarray(maps, dtype=np.float32)
    top = maps.max(axis=(-2, -1), keepdims=True)
    return np.where(top > 0, maps / np.where(top > 0, top, 1.0), 0.0).astype(np.float32)


def heatmaps_from_cams(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Raw class activation maps (..., h, w) -> heatmaps (..., H, W): ReLU, upsample, normalise."""
    return normalise(upsample(np.maximum(cams, 0.0), size))


def _colours(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 through matplotlib's 'jet' colour map (its look-up table, no pyplot)."""
    from matplotlib import colormaps

    lut = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    return lut[np.clip(np.rint(heatmap * 255), 0, 255).astype(np.int64)]


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The heatmap in colour over ``image`` (resized to the heatmap's size), as RGB."""
    base = image.convert("RGB").resize((heatmap.shape[1], heatmap.shape[0]), Image.BILINEAR)
    mixed = (1 - alpha) * np.asarray(base, dtype=np.float32) + alpha * _colours(heatmap).astype(np.float32)
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def heatmap_png(heatmap: np.ndarray, image: Any = None) -> bytes:
    """PNG bytes of the coloured heatmap, over ``image`` (PIL) when given."""
    picture = overlay(image, heatmap) if image is not None else Image.fromarray(_colours(heatmap))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def grid(heatmap: np.ndarray, cells: int) -> list[list[float]]:
    """The heatmap averaged down to ``cells`` x ``cells`` (a low-resolution float grid for JSON answers)."""
    h, w = heatmap.shape
    rows = np.array_split(np.arange(h), cells)
    cols = np.array_split(np.arange(w), cells)
    return [[round(float(heatmap[np.ix_(r, c)].mean()), 4) for c in cols] for r in rows]
