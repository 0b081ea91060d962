"""Where pixelmill keeps its caches: one folder per cache, each named by its own variable.

- ``$PIXELMILL_IMAGE_CACHE_DIR``: ``data.cache=disk`` files (decoded, resized images);
  default ``<user cache>/pixelmill/images``.
- ``$PIXELMILL_MODEL_CACHE_DIR``: bundles downloaded from the model registry (``models:/`` URIs);
  default ``<user cache>/pixelmill/models``.
- ``$PIXELMILL_SCAN_CACHE_DIR``: what the scan learnt about each image file (``data.scan_cache``);
  default ``<user cache>/pixelmill/scans``.

``<user cache>`` is the platform's user cache folder (platformdirs): ``$XDG_CACHE_HOME`` or
``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows.
``$PIXELMILL_CACHE_DIR`` is the older name that meant every folder at once; it is still read,
as any of them, when that folder's own variable is unset.

Light on purpose (no torch, no mlflow): the serving process resolves ``models:/`` URIs through it.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

IMAGE_CACHE_ENV = "PIXELMILL_IMAGE_CACHE_DIR"
MODEL_CACHE_ENV = "PIXELMILL_MODEL_CACHE_DIR"
SCAN_CACHE_ENV = "PIXELMILL_SCAN_CACHE_DIR"
LEGACY_CACHE_ENV = "PIXELMILL_CACHE_DIR"  # the old name for all of them; the variables above take precedence


def _cache_dir(env: str, name: str) -> Path:
    given = os.environ.get(env) or os.environ.get(LEGACY_CACHE_ENV)
    return Path(given) if given else platformdirs.user_cache_path("pixelmill", appauthor=False) / name


def image_cache_dir() -> Path:
    """Where ``data.cache=disk`` files live."""
    return _cache_dir(IMAGE_CACHE_ENV, "images")


def model_cache_dir() -> Path:
    """Where bundles downloaded for ``models:/`` URIs live."""
    return _cache_dir(MODEL_CACHE_ENV, "models")


def scan_cache_dir() -> Path:
    """Where the scan keeps each image file's verdict and hash (``data.scan_cache``)."""
    return _cache_dir(SCAN_CACHE_ENV, "scans")
