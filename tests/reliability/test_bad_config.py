"""Bad configuration: every mistake exits 2 with one line naming the key; random overrides never crash."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pixelmill import cli
from pixelmill.config import load_config
from pixelmill.errors import PixelmillError


def _run(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["pixelmill", *argv])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


BAD = [
    (["data.batchsize=3"], "data.batchsize"),
    (["trainer.max_epochs=ten"], "trainer.max_epochs"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs"),
    (["trainer.max_epochs=1.5"], "trainer.max_epochs"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=abc"], "optim.lr"),
    (["optim.name=adagrad"], "optim.name"),
    (["optim.momentum=2"], "optim.momentum"),
    (["scheduler.name=poly"], "scheduler.name"),
    (["trainer.precision=4"], "trainer.precision"),
    (["trainer.mode=up"], "trainer.mode"),
    (["trainer.monitor=loss"], "trainer.monitor"),
    (["trainer.limit_train_batches=2.5"], "trainer.limit_train_batches"),
    (["data.val_ratio=1.5"], "data.val_ratio"),
    (["data.image_size=3"], "data.image_size"),
    (["data.sampler=weighted"], "data.sampler"),
    (["data.layout=tree"], "data.layout"),
    (["data.augment.rotation=400"], "data.augment.rotation"),
    (["data.augment.auto_augment=magic"], "data.augment.auto_augment"),
    (["model.class_weights=balanced"], "model.class_weights"),
    (["model.in_chans=7"], "model.in_chans"),
    (["model.label_smoothing=2"], "model.label_smoothing"),
    (["logger=[tensorboard,comet]"], "logger"),
    (["data=cifar"], "data"),
    (["trainer=fastest"], "trainer"),
    (["seed=-3"], "seed"),
    (["eval.top_k=[0]"], "eval.top_k"),
    (["nonsense"], "key=value"),
]


@pytest.mark.reliability("config: malformed overrides exit 2 naming the key")
@pytest.mark.parametrize("argv, key", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_override_exits_2_with_one_line(argv, key, capsys, monkeypatch):
    code, err = _run(["train", "data.path=.", *argv], capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert key in err and "Traceback" not in err


@pytest.mark.reliability("config: bad files, paths and models exit 2 with one line")
@pytest.mark.parametrize("case", ["bad yaml", "not a mapping", "missing file", "missing data path", "unknown model"])
def test_bad_files_and_paths(case, tmp_path, capsys, monkeypatch, digits_root):
    cfg = tmp_path / "exp.yaml"
    argv = ["train"]
    if case == "bad yaml":
        cfg.write_text("trainer:\n  max_epochs: [1\n")
        argv += ["--config", str(cfg), f"data.path={digits_root}"]
    elif case == "not a mapping":
        cfg.write_text("- just\n- a list\n")
        argv += ["--config", str(cfg), f"data.path={digits_root}"]
    elif case == "missing file":
        argv += ["--config", str(tmp_path / "nope.yaml")]
    elif case == "missing data path":
        argv += [f"data.path={tmp_path / 'nowhere'}"]
    else:
        argv += [f"data.path={digits_root}", "model.name=resnet_9000", f"output_dir={tmp_path}"]
    code, err = _run(argv, capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err


KEYS = ["data.batch_size", "optim.lr", "trainer.max_epochs", "data.augment.rotation", "model.name", "logger", "seed",
        "trainer.precision", "scheduler.name", "data.sampler", "nope", "data", "model", "trainer.devices", "eval.top_k",
        "data.columns", "tracking.mlflow.uri", "trainer.limit_train_batches", "data.augment"]


@pytest.mark.reliability("config: random key=value overrides never raise a traceback")
# Derandomized in CI (the same 200 cases each run, so a landing never hinges on luck); random locally.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=os.environ.get("CI") == "true")
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(min_size=0, max_size=12), st.text(max_size=20)), max_size=4))
@example([("a[", "1")]).via("found by this test: OmegaConf crashed on bracket keys")
def test_random_overrides_give_a_config_or_a_clear_error(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        load_config(overrides)
    except PixelmillError as exc:
        assert "\n" not in str(exc)
