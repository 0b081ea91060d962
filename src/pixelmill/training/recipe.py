"""How the network runs in training: gradient checkpointing, memory format, torch.compile.

Applied to the task's network before training (and before the finders), in place: the weights
and their names stay as they are, so checkpoints, evaluation and export see the same network.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig
from torch import nn

from pixelmill.errors import ConfigError

log = logging.getLogger(__name__)


def prepare_net(cfg: DictConfig, net: nn.Module) -> nn.Module:
    """``model.grad_checkpointing``, ``model.channels_last`` and ``trainer.compile`` applied to ``net`` (returned)."""
    if cfg.model.grad_checkpointing:
        from pixelmill.models.factory import enable_grad_checkpointing

        enable_grad_checkpointing(net, cfg.model.name)
    if cfg.model.channels_last:
        use_channels_last(net)
    if cfg.trainer.compile:
        check_compiler(_device(cfg.trainer.accelerator))
        net.compile()  # in place: state_dict keys stay unprefixed (torch.compile(net) would add _orig_mod.)
    return net


def use_channels_last(net: nn.Module) -> None:
    """NHWC memory for ``net``'s 4-D weights and for every 4-D input it is given (training, validation, evaluation)."""
    net.to(memory_format=torch.channels_last)
    net.register_forward_pre_hook(_channels_last_inputs)


def _channels_last_inputs(module: nn.Module, args: tuple) -> tuple:
    # (B, C, H, W) float -> the same values with NHWC strides; other inputs (table rows) pass as they are.
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.ndim == 4 else a for a in args)


def _device(accelerator: str) -> str:
    """The device type training will use, for the compiler check (Lightning picks a GPU under ``auto`` when there is one)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "mps":
        return "mps"
    return "cpu"


def check_compiler(device: str) -> None:
    """Compile and run a one-line function on ``device``: a missing or broken compiler (no C++ compiler for
    CPU code, no Triton for GPU code) fails here, in a second or two, instead of at the first training step."""
    probe = torch.compile(lambda x: x * 2 + 1)
    try:
        probe(torch.ones(4, device=device))
    except Exception as exc:  # noqa: BLE001 - inductor raises its own types (InvalidCxxCompiler, BackendCompilerFailed, ...)
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(
            f"trainer.compile=true but torch.compile cannot compile for {device} here ({reason[:200]}); "
            "install a C++ compiler (CPU) or Triton (GPU), or set trainer.compile=false"
        ) from None
    log.info("torch.compile works for %s; the network compiles at its first training step", device)
