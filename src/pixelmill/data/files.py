"""Which files pixelmill treats as images: one list for training (the scan) and prediction (folders).

Import-free on purpose: torch-free modules (predict, serving) import it.

Netpbm (``.ppm``, ``.pgm``) is left out: a folder handed to ``pixelmill predict`` yields the
files a training scan of that folder would read, no more. A file named explicitly (or by a
glob) is predicted whatever its extension.
"""

from __future__ import annotations

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
