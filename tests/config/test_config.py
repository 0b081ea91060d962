"""Config composition and the one-line errors users see for every kind of mistake."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pixelmill.config import flatten, load_config, load_saved, to_yaml
from pixelmill.errors import ConfigError


def test_defaults_then_file_then_overrides(tmp_path):
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("model: xray_cnn\noptim:\n  lr: 0.01\ntrainer:\n  max_epochs: 3\n")
    cfg = load_config(["trainer.max_epochs=5", "logger=[csv,mlflow]"], cfg_file)
    assert cfg.model.name == "xray_cnn" and cfg.model.in_chans == 1  # packaged group file
    assert cfg.optim.lr == 0.01  # from the file
    assert cfg.trainer.max_epochs == 5  # the override wins
    assert list(cfg.logger) == ["csv", "mlflow"]


def test_model_override_names_any_architecture():
    assert load_config(["model=convnext_tiny"]).model.name == "convnext_tiny"
    assert load_config(["model.name=tv:resnet18"]).model.name == "tv:resnet18"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["data.path=/x", "data.augment.rotation=15", "eval.top_k=[1,3]"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_saved(tmp_path / "config.yaml")
    assert flatten(again) == flatten(cfg)
    assert flatten(cfg)["data.augment.rotation"] == 15.0


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["data.batchsize=3"], ["data.batchsize", "did you mean 'data.batch_size'"]),
        (["foo=1"], ["unknown config key 'foo'", "experiment"]),
        (["trainer.max_epochs=abc"], ["trainer.max_epochs", "abc"]),
        (["trainer.max_epochs=0"], ["trainer.max_epochs", "must be in"]),
        (["optim.name=lion"], ["optim.name", "sgd, adam, adamw, rmsprop"]),
        (["scheduler.name=linear"], ["scheduler.name", "cosine"]),
        (["trainer.precision=8"], ["trainer.precision", "bf16-mixed"]),
        (["data.sampler=random"], ["data.sampler", "balanced"]),
        (["model.class_weights=yes"], ["model.class_weights", "auto"]),
        (["logger=[csv,neptune]"], ["neptune", "wandb"]),
        (["trainer.monitor=train/acc"], ["trainer.monitor", "val/acc"]),
        (["data.val_ratio=0.6", "data.test_ratio=0.5"], ["val_ratio", "test_ratio"]),
        (["data=imagenet"], ["data config 'imagenet'", "digits"]),
        (["nonsense"], ["key=value"]),
        (["optim.lr=-1"], ["optim.lr"]),
        (["eval.top_k=[0]"], ["eval.top_k"]),
    ],
)
def test_bad_config_is_one_clear_line(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_yaml_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([], bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([], tmp_path / "missing.yaml")


def test_cli_config_error_exits_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pixelmill.cli", "train", "data.path=x", "trainer.max_epoch=3"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "did you mean 'trainer.max_epochs'" in proc.stderr
