"""Checkpoint files: atomic writes, and loading a trained network back safely."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from pixelmill.errors import ModelError, RunError
from pixelmill.runs import pid_alive

PARTIAL_SAVE = ".{name}.tmp-{pid}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, fsync, then rename: a kill mid-save keeps the old file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(PARTIAL_SAVE.format(name=path.name, pid=os.getpid()))
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: a disk error below is then a clean OSError
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:  # disk full, quota, file-size limit, read-only file system
            run_dir = path.parent.parent
            raise RunError(
                f"could not save checkpoint '{path}' ({exc.strerror or exc}); the previous checkpoint is intact - "
                f"free space, then continue with: pixelmill train resume={run_dir}"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)


def remove_partial_saves(directory: Path) -> list[Path]:
    """Delete the temporary files of saves that a killed process never finished; return them.

    A save in progress belongs to a live process and is kept.
    """
    removed = []
    for tmp in sorted(Path(directory).glob(PARTIAL_SAVE.format(name="*", pid="*"))):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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
