"""Checkpoint files: atomic writes, and loading a trained network back safely."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from pixelmill.errors import ModelError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, fsync, then rename: a kill mid-save keeps the old file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain data, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint '{path}' does not exist") from None
    except Exception as exc:  # pickle and zip errors both mean "not a safe checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"refusing to load checkpoint '{path}': not a plain tensor file ({first[:200]})") from None


def net_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network's weights from a Lightning checkpoint (keys without the ``net.`` prefix)."""
    state = checkpoint.get("state_dict", checkpoint)
    return {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}


def load_net(net: nn.Module, path: str | Path) -> nn.Module:
    """Load checkpoint weights into ``net`` (strictly) and put it in eval mode."""
    net.load_state_dict(net_state_dict(read_checkpoint(path)), strict=True)
    return net.eval()
