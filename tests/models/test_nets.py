"""Every pixelmill net trains: forward + backward at small sizes, grayscale and RGB."""

from __future__ import annotations

import pytest
import torch

from pixelmill.models import create_model, list_models, model_data_config

OWN_NETS = [name for name, source in list_models() if source == "pixelmill"]


def test_own_nets_are_registered() -> None:
    assert {"small_cnn", "xray_cnn"} <= set(OWN_NETS)


@pytest.mark.parametrize("name", OWN_NETS)
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_backward(name: str, size: int, in_chans: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=in_chans)
    x = torch.randn(2, in_chans, size, size)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.logsumexp(dim=1).sum().backward()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", OWN_NETS)
def test_head_and_default_cfg(name: str) -> None:
    model = create_model(name, num_classes=4, in_chans=1, drop_rate=0.1)
    head = model.get_classifier()
    assert isinstance(head, torch.nn.Linear) and head.out_features == 4
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    cfg = model_data_config(model, name)
    assert cfg["input_size"][0] == 1 and cfg["input_size"][1] >= 32
    assert cfg["mean"] == (0.5,) and cfg["std"] == (0.5,)
    assert cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0


def test_own_net_has_no_hub_weights() -> None:
    from pixelmill.errors import ModelError

    with pytest.raises(ModelError, match="model.weights"):
        create_model("small_cnn", 3, pretrained=True)
