"""pixelmill: image and tabular classifiers from a folder or a CSV to a served model."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
