"""The PyTorch side of explanations: Grad-CAM through Captum, the target layer, and the CAM head of an export."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from pixelmill.errors import ConfigError
from pixelmill.explain import CAM_OUTPUT
from pixelmill.explain.heatmaps import normalise


def normalised_input(batch: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, H, W, C) uint8 model inputs -> (N, C, H, W) float, normalised exactly as the bundle's graph does it."""
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)


def feature_layers(net: nn.Module, sample: torch.Tensor) -> list[str]:
    """Names of the modules whose output is a 4-D feature map with more than one position, in the order they finish.

    The last one is the final feature map before pooling: ``features`` of pixelmill's CNNs,
    ``layer4`` of a resnet, the last stage or head convolution of most timm networks.
    """
    finished: list[str] = []
    hooks = [
        module.register_forward_hook(lambda m, i, out, name=name: finished.append(name) if _spatial(out) else None)
        for name, module in net.named_modules() if name
    ]
    try:
        with torch.inference_mode():
            net.eval()(sample)
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(finished))  # a module called twice counts where it first finished


def _spatial(out: object) -> bool:
    return isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1


def target_layer(net: nn.Module, sample: torch.Tensor, name: str | None = None) -> tuple[str, nn.Module]:
    """(name, module) Grad-CAM attributes to: ``name``, else the last 4-D feature map. ConfigError listing the valid names."""
    layers = feature_layers(net, sample)
    if not layers:
        raise ConfigError("this network has no 4-D feature map to explain (a table model?); explanations need an image CNN")
    chosen = name or layers[-1]
    if chosen not in layers:
        shown = ", ".join(layers[-40:]) + (f" (and {len(layers) - 40} earlier ones)" if len(layers) > 40 else "")
        raise ConfigError(f"unknown layer '{chosen}' for --layer; layers with a feature map: {shown}")
    return chosen, dict(net.named_modules())[chosen]


def gradcam(net: nn.Module, x: torch.Tensor, targets: Sequence[int], layer: nn.Module) -> np.ndarray:
    """(N, C, H, W) normalised inputs, one class index per input -> (N, H, W) heatmaps in [0, 1].

    Captum's ``LayerGradCam`` (ReLU'd), upsampled bilinearly to the input size and divided by its maximum.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    net.eval()
    with torch.enable_grad():
        maps = LayerGradCam(net, layer).attribute(x, target=list(targets), relu_attributions=True)
    maps = LayerAttribution.interpolate(maps.detach().float(), tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return normalise(maps[:, 0].numpy())


def cam_weights(net: nn.Module) -> torch.Tensor | None:
    """The classifier's (classes, channels) weights when the head is global average pooling + one linear layer, else None.

    Checked numerically rather than by type: ``forward_head`` of random feature maps must equal the
    linear layer applied to their spatial mean (a head with a hidden layer, a norm after pooling or
    attention pooling fails it and gets no CAM output).
    """
    if not all(hasattr(net, attr) for attr in ("forward_features", "forward_head", "get_classifier")):
        return None
    fc = net.get_classifier()
    if not isinstance(fc, nn.Linear):
        return None
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, fc.in_features, 3, 4, generator=generator)
    try:
        with torch.inference_mode():
            head = net.eval().forward_head(features)
            linear = fc(features.mean(dim=(2, 3)))
    except RuntimeError:  # the head takes another width: there are layers between pooling and the classifier
        return None
    if head.shape != linear.shape or not torch.allclose(head, linear, atol=1e-5, rtol=1e-4):
        return None
    return fc.weight.detach().clone()


class CamHead(nn.Module):
    """uint8 NHWC pixels -> (the task's head activation, raw class activation maps (N, classes, h, w)): the explainable graph."""

    output_names = ("probabilities", CAM_OUTPUT)

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], activation: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor) -> None:
        super().__init__()
        self.net = net.eval()
        self.activation = activation
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("weights", weights.float())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        features = self.net.forward_features((x - self.mean) / self.std)  # (N, C, h, w)
        cams = torch.einsum("nchw,kc->nkhw", features, self.weights)  # sum_c w[k, c] * F_c
        return self.activation(self.net.forward_head(features)), cams
