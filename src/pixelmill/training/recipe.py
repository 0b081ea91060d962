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
    if wants_channels_last(cfg.model.channels_last, net, cfg.model.name):
        use_channels_last(net)
    if cfg.trainer.compile:
        check_compiler(_device(cfg.trainer.accelerator))
        net.compile()  # in place: state_dict keys stay unprefixed (torch.compile(net) would add _orig_mod.)
    return net


def wants_channels_last(setting: bool | str, net: nn.Module, name: str = "the network") -> bool:
    """``model.channels_last``: true, false, or auto - on when 2-D convolutions hold at least half of ``net``'s weights.

    Measured on this project's 2-core CPU (training steps at 128 px, batch 32, NHWC / NCHW):
    resnet18 1.12x, resnet50 1.27x, efficientnet_b0 1.35x, mobilenetv3_large_100 1.60x,
    regnety_008 1.24x, convnext_nano 1.02x (its weights are mostly in linear layers), while
    vit_tiny_patch16_224, whose only convolution is the patch embedding, is 0.97x. On GPUs NHWC
    is what tensor cores want for convolutions. Table models have no convolution and stay as they are.
    """
    if setting != "auto":
        return bool(setting)
    total = sum(p.numel() for p in net.parameters())
    conv = sum(p.numel() for m in net.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    chosen = total > 0 and conv >= total / 2
    log.info("model.channels_last=auto: %s (2-D convolutions hold %.0f%% of %s's weights)", "on" if chosen else "off", 100 * conv / max(total, 1), name)
    return chosen


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
