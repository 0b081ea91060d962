"""Every pixelmill net trains: image nets forward + backward at small sizes, grayscale and RGB; the MLP on rows."""

from __future__ import annotations

import pytest
import torch

from pixelmill.models import create_model, list_models, model_data_config
from pixelmill.models.nets import tabular_nets

OWN_NETS = [name for name, source in list_models() if source == "pixelmill" and name not in tabular_nets()]


def test_own_nets_are_registered() -> None:
    assert {"small_cnn", "xray_cnn"} <= set(OWN_NETS)
    assert tabular_nets() == ["mlp"]


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("hidden_sizes", [(), (16,), (32, 16, 8)])
def test_mlp_forward_backward(activation: str, hidden_sizes: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = create_model("mlp", 3, in_features=7, hidden_sizes=hidden_sizes, drop_rate=0.2, activation=activation)
    logits = model(torch.randn(4, 7))
    assert logits.shape == (4, 3)
    logits.logsumexp(dim=1).sum().backward()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 7 and first.weight.grad.abs().sum() > 0
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [*hidden_sizes, 3]
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.get_classifier().out_features == 3


def test_mlp_needs_in_features_and_a_known_activation() -> None:
    with pytest.raises(ValueError, match="in_features"):
        create_model("mlp", 2)
    with pytest.raises(ValueError, match="relu, gelu, silu, tanh"):
        create_model("mlp", 2, in_features=3, activation="swish")


def test_model_options_are_for_own_nets_only() -> None:
    from pixelmill.errors import ModelError

    with pytest.raises(ModelError, match="own nets only"):
        create_model("tv:resnet18", 2, hidden_sizes=[8])


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
