"""pixelmill's own small nets, registered by name (timm style: a plain dict plus a decorator).

The CNNs are a stack of conv blocks (conv3x3-BN-ReLU, then 2x2 max-pool), a global
average pool and a small head. They work for any input of at least 32 px and for
1 (grayscale) or 3 (RGB) input channels. ``mlp`` takes preprocessed tabular features,
(B, in_features) floats, instead of images.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pixelmill.config.schema import ACTIVATIONS

__all__ = [
    "MLP", "ConvNet", "is_model", "list_nets", "mlp", "model_entrypoint", "register_model", "small_cnn",
    "tabular_nets", "xray_cnn",
]

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name; `create_model(name)` finds it there."""
    _model_entrypoints[fn.__name__] = fn
    return fn


def list_nets() -> list[str]:
    """Sorted names of pixelmill's own nets."""
    return sorted(_model_entrypoints)


def is_model(name: str) -> bool:
    """True if `name` is one of pixelmill's own nets."""
    return name in _model_entrypoints


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The factory function registered as `name` (KeyError if there is none)."""
    return _model_entrypoints[name]


def tabular_nets() -> list[str]:
    """Sorted names of the own nets that take tabular features (an `in_features` argument), not images."""
    return sorted(n for n, fn in _model_entrypoints.items() if "in_features" in inspect.signature(fn).parameters)


def _default_cfg(in_chans: int, size: int) -> dict[str, Any]:
    # Preprocessing that travels with the net (timm's pretrained_cfg); our nets train from scratch
    # on [0, 1] pixels mapped to [-1, 1].
    return {
        "input_size": (in_chans, size, size),
        "mean": (0.5,) * in_chans,
        "std": (0.5,) * in_chans,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "first_conv": "features.0.conv",
        "classifier": "fc",
    }


def _norm(kind: str, chs: int) -> nn.Module:
    # GroupNorm does not depend on the batch: the same result on one process or split over ranks.
    return nn.BatchNorm2d(chs) if kind == "batch" else nn.GroupNorm(min(8, chs), chs)


class ConvBlock(nn.Sequential):
    """conv3x3 (no bias) -> BatchNorm (or GroupNorm) -> ReLU, repeated `depth` times, then 2x2 max-pool."""

    def __init__(self, in_chs: int, out_chs: int, depth: int = 1, norm: str = "batch") -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(depth):
            suffix = "" if i == 0 else str(i + 1)
            layers[f"conv{suffix}"] = nn.Conv2d(in_chs if i == 0 else out_chs, out_chs, 3, padding=1, bias=False)
            layers[f"bn{suffix}"] = _norm(norm, out_chs)
            layers[f"act{suffix}"] = nn.ReLU(inplace=True)
        layers["pool"] = nn.MaxPool2d(2)
        super().__init__(layers)


class ConvNet(nn.Module):
    """A plain CNN: conv blocks -> global average pool -> [hidden Linear-ReLU] -> dropout -> Linear.

    Args:
        num_classes: Number of output logits.
        in_chans: Input channels (1 for grayscale, 3 for RGB).
        channels: Output channels of each conv block; each block halves the resolution.
        depth: Convs per block.
        hidden: Width of an extra Linear-ReLU-Dropout layer before the classifier (0 = none).
        drop_rate: Dropout probability before each Linear of the head.
        input_size: Default square input size in pixels, recorded in `default_cfg`.
        norm: "batch" (BatchNorm) or "group" (GroupNorm, independent of the batch size).
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        channels: Sequence[int] = (32, 64, 128),
        depth: int = 1,
        hidden: int = 0,
        drop_rate: float = 0.2,
        input_size: int = 32,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        chs = [in_chans, *channels]
        self.features = nn.Sequential(*(ConvBlock(chs[i], chs[i + 1], depth, norm) for i in range(len(channels))))
        self.pool = nn.AdaptiveAvgPool2d(1)
        width = channels[-1]
        if hidden:
            self.pre_logits: nn.Module = nn.Sequential(
                nn.Dropout(drop_rate), nn.Linear(width, hidden), nn.ReLU(inplace=True)
            )
            width = hidden
        else:
            self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(width, num_classes)
        self.default_cfg = _default_cfg(in_chans, input_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Linear:
        """The final Linear layer (the part that is trained when the backbone is frozen)."""
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, channels[-1], H/2^n, W/2^n) feature maps."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, h, w) feature maps -> (B, num_classes) logits."""
        x = self.pool(x).flatten(1)  # (B, F)
        x = self.pre_logits(x)
        return self.fc(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float images -> (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


@register_model
def small_cnn(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.2, **kwargs: Any) -> ConvNet:
    """Small fast CNN for 32-128 px images (digits, CIFAR-like): 3 blocks of 32/64/128 channels."""
    cfg: dict[str, Any] = dict(channels=(32, 64, 128), depth=1, hidden=0, input_size=32)
    return ConvNet(num_classes, in_chans, drop_rate=drop_rate, **{**cfg, **kwargs})


@register_model
def small_cnn_gn(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.2, **kwargs: Any) -> ConvNet:
    """small_cnn with GroupNorm: batch-size independent (tiny batches, CPU multi-process training)."""
    cfg: dict[str, Any] = dict(channels=(32, 64, 128), depth=1, hidden=0, input_size=32, norm="group")
    return ConvNet(num_classes, in_chans, drop_rate=drop_rate, **{**cfg, **kwargs})


@register_model
def xray_cnn(num_classes: int = 2, in_chans: int = 3, drop_rate: float = 0.5, **kwargs: Any) -> ConvNet:
    """The 4-block CNN with a dropout head common in chest X-ray projects: 32/64/128/256 channels,
    then Dropout-Linear(256, 128)-ReLU-Dropout-Linear(num_classes). Default input 128 px."""
    cfg: dict[str, Any] = dict(channels=(32, 64, 128, 256), depth=1, hidden=128, input_size=128)
    return ConvNet(num_classes, in_chans, drop_rate=drop_rate, **{**cfg, **kwargs})


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
assert tuple(_ACTIVATIONS) == ACTIVATIONS, "model.activation choices and _ACTIVATIONS differ"


class MLP(nn.Module):
    """A plain multi-layer perceptron: [Linear -> activation -> Dropout] per hidden size, then Linear.

    Args:
        num_classes: Number of output logits.
        in_features: Width of the (already preprocessed) input rows.
        hidden_sizes: Width of each hidden layer; empty gives a linear (logistic) classifier.
        drop_rate: Dropout probability after each hidden layer.
        activation: One of relu, gelu, silu, tanh.
    """

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        hidden_sizes: Sequence[int] = (128, 64),
        drop_rate: float = 0.1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_features < 1:
            raise ValueError(f"num_classes and in_features must be >= 1, got {num_classes} and {in_features}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; choose one of: {', '.join(_ACTIVATIONS)}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, int(size)), _ACTIVATIONS[activation](), nn.Dropout(drop_rate)]
            width = int(size)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.default_cfg = {"input_size": (in_features,), "classifier": "fc"}

    def get_classifier(self) -> nn.Linear:
        """The final Linear layer (the part that is trained when the backbone is frozen)."""
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) float -> (B, num_classes) logits."""
        return self.fc(self.features(x))


@register_model
def mlp(
    num_classes: int = 2,
    in_features: int | None = None,
    hidden_sizes: Sequence[int] = (128, 64),
    drop_rate: float = 0.1,
    activation: str = "relu",
    in_chans: int | None = None,
) -> MLP:
    """MLP for tabular rows; `in_features` is the preprocessor's output width (`in_chans` is ignored)."""
    if in_features is None:
        raise ValueError("mlp needs in_features (the number of preprocessed tabular features); train it with data.kind=tabular")
    return MLP(num_classes, in_features, tuple(hidden_sizes), drop_rate, activation)
