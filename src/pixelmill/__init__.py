"""pixelmill: image and tabular classifiers from a folder or a CSV to a served model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pixelmill.inference.predictor import Predictor

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import pixelmill` (and `pixelmill --help`) stays light.
    if name == "Predictor":
        from pixelmill.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'pixelmill' has no attribute '{name}'")
