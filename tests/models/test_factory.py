"""create_model / list_models / model_data_config over own nets, timm and torchvision (offline)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pixelmill.errors import ModelError
from pixelmill.models import create_model, list_models, model_data_config


def _same_output(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("name", ["resnet18", "timm:resnet18", "tv:resnet18", "torchvision:resnet18"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_timm_and_torchvision_create_offline(name: str, in_chans: int) -> None:
    model = create_model(name, num_classes=3, in_chans=in_chans)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_chans, 64, 64)).shape == (2, 3)


def test_prefix_picks_the_source() -> None:
    timm_model = create_model("timm:resnet18", 3)
    tv_model = create_model("tv:resnet18", 3)
    assert type(timm_model).__module__.startswith("timm")
    assert type(tv_model).__module__.startswith("torchvision")
    assert type(create_model("pixelmill:small_cnn", 3)).__module__ == "pixelmill.models.nets"


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ModelError) as err:
        create_model("resnt18", 3)
    msg = str(err.value)
    assert "unknown model 'resnt18'" in msg and "resnet18" in msg and "pixelmill models" in msg
    assert "\n" not in msg


def test_unknown_prefix_lists_valid_ones() -> None:
    with pytest.raises(ModelError, match="tv:"):
        create_model("keras:resnet18", 3)


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_pretrained_offline_fails_fast_with_a_way_out(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty torch hub cache
    if name == "resnet18":
        import timm

        from pixelmill.models.factory import _timm_cached_file

        if _timm_cached_file(timm.models.get_pretrained_cfg(name)):
            pytest.skip("resnet18 weights already in the local Hugging Face cache")
    with pytest.raises(ModelError) as err:
        create_model(name, 3, pretrained=True)
    msg = str(err.value)
    assert "could not download pretrained weights for 'resnet18'" in msg
    assert "model.weights" in msg and "model.pretrained=false" in msg


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_pretrained_weights_already_cached_load_offline(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # an offline machine with a pre-seeded torch hub cache (as copied from an online one)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if name == "resnet18":
        import timm

        seeded, url = timm.create_model("resnet18"), timm.models.get_pretrained_cfg("resnet18").url
    else:
        import torchvision

        seeded = torchvision.models.resnet18()
        url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(seeded.state_dict(), cache / url.rsplit("/", 1)[-1])
    model = create_model(name, 3, pretrained=True)
    assert torch.equal(model.conv1.weight, seeded.conv1.weight)
    assert model.fc.out_features == 3


# ----------------------------------------------------------------------------- local weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_roundtrip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    trained = create_model("small_cnn", 10, in_chans=1)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(1)
    fresh = create_model("small_cnn", 10, in_chans=1, weights=path)
    assert _same_output(trained, fresh, torch.randn(2, 1, 32, 32))


def test_lightning_checkpoint_with_prefix_loads(tmp_path: Path) -> None:
    trained = create_model("small_cnn", 4)
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}, path)
    fresh = create_model("small_cnn", 4, weights=str(path))
    assert _same_output(trained, fresh, torch.randn(2, 3, 32, 32))


def test_other_head_size_loads_backbone_and_skips_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = create_model("small_cnn", 10)
    path = tmp_path / "ten_classes.safetensors"
    save_file(source.state_dict(), str(path))
    with caplog.at_level(logging.WARNING, logger="pixelmill.models.factory"):
        model = create_model("small_cnn", 3, weights=path)
    assert model.get_classifier().out_features == 3
    assert torch.equal(model.features[0].conv.weight, source.features[0].conv.weight)
    assert "fc.weight" in caplog.text and "shapes differ" in caplog.text


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nope.pt"):
        create_model("small_cnn", 3, weights=tmp_path / "nope.pt")


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelError, match="no weight in"):
        create_model("small_cnn", 3, weights=path)


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


@pytest.mark.reliability("untrusted: malicious pickle as weights refused, payload not run")
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"fc.weight": _Evil(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(ModelError, match="refusing to load"):
        create_model("small_cnn", 3, weights=path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "tv:resnet18", "tv:efficientnet_b0"])
def test_freeze_backbone_leaves_only_the_head_trainable(name: str) -> None:
    model = create_model(name, 3, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    expected = {n for n, p in model.named_parameters() if head is not None and any(p is q for q in head.parameters())}
    if head is None:  # torchvision: the replaced final Linear
        expected = {n for n in trainable if n.startswith(("fc.", "classifier."))}
    assert trainable and trainable == expected
    assert len(trainable) == 2  # weight and bias of the final Linear


# ----------------------------------------------------------------------------- listing and data config


def test_list_models_pattern_and_order() -> None:
    listed = list_models("resnet1*")
    assert ("resnet18", "timm") in listed and ("resnet18", "torchvision") in listed
    assert all(name.startswith("resnet1") for name, _ in listed)
    everything = list_models()
    own = [entry for entry in everything if entry[1] == "pixelmill"]
    assert everything[: len(own)] == own and ("small_cnn", "pixelmill") in own
    assert ("fasterrcnn_resnet50_fpn", "torchvision") not in everything  # classifiers only
    assert list_models("tv:resnet18") == [("resnet18", "torchvision")]


def test_data_config_per_source() -> None:
    gray = model_data_config(create_model("small_cnn", 3, in_chans=1), "small_cnn")
    assert gray["input_size"] == (1, 32, 32) and gray["mean"] == (0.5,) and gray["std"] == (0.5,)

    timm_cfg = model_data_config(create_model("resnet18", 3), "resnet18")
    assert timm_cfg["input_size"] == (3, 224, 224)
    assert len(timm_cfg["mean"]) == 3 and len(timm_cfg["std"]) == 3

    tv_gray = model_data_config(create_model("tv:resnet18", 3, in_chans=1), "tv:resnet18")
    assert tv_gray["input_size"] == (1, 224, 224) and len(tv_gray["mean"]) == 1
    assert tv_gray["interpolation"] == "bilinear" and tv_gray["crop_pct"] == pytest.approx(0.875)
