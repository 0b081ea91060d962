"""Model creation by name over pixelmill's own nets, timm and torchvision.

Attributes load lazily so `import pixelmill.models` (and `pixelmill --help`) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pixelmill.models.factory import create_model, list_models, model_data_config

__all__ = ["create_model", "list_models", "model_data_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pixelmill.models import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'pixelmill.models' has no attribute '{name}'")
