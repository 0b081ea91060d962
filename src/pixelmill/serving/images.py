"""Uploaded bytes -> model input, refusing bombs, non-images and corrupt files with a 4xx naming the file."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

from pixelmill.data.preprocess import Preprocessing, to_model_input


def _shown(name: str) -> str:
    return name if len(name) <= 120 else name[:117] + "..."


def decode_image(data: bytes, name: str, prep: Preprocessing, max_pixels: int) -> np.ndarray:
    """Image file bytes -> (H, W, C) uint8, prepared exactly as evaluation prepared it.

    The header is read first and ``width * height`` checked against ``max_pixels`` before
    a single pixel is decoded: a 50 kB PNG that inflates to gigabytes is a 413, not an OOM.
    """
    shown = _shown(name)
    if not data:
        raise HTTPException(422, f"file '{shown}' is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"file '{shown}' is too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise HTTPException(415, f"file '{shown}' is not an image format the server can read (PNG, JPEG, BMP, GIF, TIFF, WebP)") from None
    except Exception as exc:  # any failure on these bytes is the upload's fault, never a 500
        raise HTTPException(422, f"file '{shown}' is a corrupt image: {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise HTTPException(413, f"file '{shown}' is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width < 1 or height < 1:
        raise HTTPException(422, f"file '{shown}' has no pixels ({width}x{height})")
    # Preprocessing scales the shorter side up or down to resize_to: a 1 x 1,000,000 strip would become 32 x 32,000,000.
    short, long = sorted((width, height))
    resized = prep.resize_to * int(prep.resize_to * long / short)
    if resized > max_pixels:
        raise HTTPException(
            413, f"file '{shown}' is {width}x{height}: resized to a shorter side of {prep.resize_to} it has {resized} pixels; the limit is {max_pixels}"
        )
    try:
        img.load()
        return to_model_input(img, prep)
    except Exception as exc:  # truncated data, broken chunks, bad palettes, ...
        raise HTTPException(422, f"file '{shown}' is a corrupt or truncated image: {exc}") from None
    finally:
        img.close()


def decode_images(files: list[tuple[str, bytes]], prep: Preprocessing, max_pixels: int) -> np.ndarray:
    """[(name, bytes)] -> (N, H, W, C) uint8 batch."""
    return np.stack([decode_image(data, name, prep, max_pixels) for name, data in files])


def decode_each(files: list[tuple[str, bytes]], prep: Preprocessing, max_pixels: int) -> list[np.ndarray | str]:
    """[(name, bytes)] -> per file its (H, W, C) uint8 image or the message of why it was refused.

    The same checks as :func:`decode_images`, but one bad file does not fail the others
    (``/explain`` answers the readable images and names the rest).
    """
    out: list[np.ndarray | str] = []
    for name, data in files:
        try:
            out.append(decode_image(data, name, prep, max_pixels))
        except HTTPException as exc:
            out.append(str(exc.detail))
    return out


def decode_base64(text: str, name: str) -> bytes:
    """A base64 string (or ``data:image/...;base64,`` URL) -> bytes; 422 naming the instance if invalid."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{name} is not valid base64") from None
