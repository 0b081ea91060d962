"""Model-name source prefixes (``tv:resnet18``): import-free, so the CLI checks a name before torch loads."""

from __future__ import annotations

from pixelmill.errors import ModelError

# prefix -> the source create_model looks the bare name up in.
PREFIXES: dict[str, str] = {"pixelmill": "pixelmill", "timm": "timm", "tv": "torchvision", "torchvision": "torchvision"}


def split_prefix(name: str) -> tuple[str | None, str]:
    """'tv:resnet18' -> ('torchvision', 'resnet18'); 'resnet18' -> (None, 'resnet18'); ModelError for an unknown prefix."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        return None, name
    if prefix.lower() not in PREFIXES:
        valid = ", ".join(f"{p}:" for p in PREFIXES)
        raise ModelError(f"unknown model source '{prefix}' in '{name}'; valid prefixes: {valid}")
    return PREFIXES[prefix.lower()], rest
