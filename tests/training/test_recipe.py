"""The training recipe a timm user reaches for: weight averaging (EMA, SWA), drop-path, augmentation,
memory format, torch.compile, gradient checkpointing, the learning-rate and batch-size finders and
the worker default. Each test shows the option's effect, not only that a run finishes."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from helpers import clean_env
from pixelmill.config import load_config
from pixelmill.errors import ConfigError, ModelError
from pixelmill.training.checkpoint import net_state_dict, read_checkpoint
from pixelmill.training.fit import resume, train


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _checkpoint(run_dir: Path, which: str = "last") -> dict:
    return read_checkpoint(run_dir / "checkpoints" / f"{which}.ckpt")


def _trained(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights training itself reached (a weight-averaging checkpoint keeps them beside the average)."""
    return net_state_dict({"state_dict": checkpoint["current_model_state"]})


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``pixelmill train ARGS`` as a user runs it (user errors: one line on stderr, exit code 2)."""
    return subprocess.run([sys.executable, "-m", "pixelmill.cli", "train", *args], capture_output=True, text=True, env=clean_env(env or {}))


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]  # log lines (INFO ...) may come before it
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return errors[0]


# ----------------------------------------------------------------------------- EMA


@pytest.fixture(scope="module")
def ema_run(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three short epochs with model.ema=true (and its warm-up), the test split evaluated after training."""
    from helpers import fast_train_overrides

    out = tmp_path_factory.mktemp("ema")
    args = fast_train_overrides(digits_root, out / "runs", "run_name=ema", "model.ema=true", "trainer.limit_train_batches=6", "eval.splits=[test]",
                                "eval.bootstrap=0", "data.num_workers=0", epochs=3)
    result = train(load_config(args))
    assert result.status == "finished"
    return result.run_dir


def _probabilities(net: torch.nn.Module, run_dir: Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, softmax probabilities) of ``net`` on a split of the run's data, in file order (the first ``limit`` batches)."""
    from pixelmill.runs import load_run

    loaded = load_run(run_dir)
    datamodule = loaded.task.datamodule(loaded.config, loaded.task.load_data(loaded.config), loaded.preprocessing)
    net.eval()
    ys, ps = [], []
    with torch.inference_mode():
        for i, (x, y) in enumerate(datamodule.eval_loader(split)):
            if limit is not None and i >= limit:
                break
            ps.append(torch.softmax(net(x), dim=1).numpy())
            ys.append(y.numpy())
    return np.concatenate(ys), np.concatenate(ps)


def _net_with(run_dir: Path, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    from pixelmill.runs import load_run

    net = load_run(run_dir).net
    net.load_state_dict(weights)
    return net


def test_ema_weights_differ_from_the_trained_ones_and_are_validated(ema_run: Path):
    last = _checkpoint(ema_run)
    average, trained = net_state_dict(last), _trained(last)
    assert average.keys() == trained.keys()
    assert not any(torch.equal(average[k], trained[k]) for k in average if k.endswith(".weight"))
    assert int(last["averaging_state"]["n_averaged"]) == last["global_step"] == 18  # one update per optimizer step
    # The last epoch's val/loss is the average's, not the trained weights' (val: 2 batches of 32, in file order).
    val_loss = float(_rows(ema_run)[-1]["val/loss"])

    def loss(weights: dict[str, torch.Tensor]) -> float:
        y, p = _probabilities(_net_with(ema_run, weights), ema_run, "val", limit=2)
        return float(-np.log(p[np.arange(len(y)), y]).mean())

    assert val_loss == pytest.approx(loss(average), rel=1e-4)
    assert abs(val_loss - loss(trained)) > 1e-3


def test_ema_weights_are_evaluated_and_exported(ema_run: Path, tmp_path: Path):
    from pixelmill.export import export_run
    from pixelmill.inference.predictor import Predictor

    best = _checkpoint(ema_run, "best")
    ema_net, raw_net = _net_with(ema_run, net_state_dict(best)), _net_with(ema_run, _trained(best))
    # Evaluation after training: predictions.csv holds the average's probabilities.
    with open(ema_run / "eval" / "test" / "predictions.csv") as f:
        written = np.array([[float(v) for k, v in row.items() if k.startswith("p_")] for row in csv.DictReader(f)])
    _, ema_p = _probabilities(ema_net, ema_run, "test")
    _, raw_p = _probabilities(raw_net, ema_run, "test")
    assert np.abs(written - ema_p).max() < 1e-5
    assert np.abs(written - raw_p).max() > 1e-3
    # The exported bundle's graph computes the average's outputs.
    bundle = export_run(ema_run, out=tmp_path / "bundle")
    runtime = Predictor.load(bundle.path).classifier
    files = sorted((Path(OmegaConf.load(ema_run / "config.yaml").data.path) / "test").rglob("*.png"))[:16]
    images = np.stack([runtime.prepare(str(f)) for f in files])  # (N, H, W, C) uint8, resized and cropped
    onnx_p = runtime.run(images)
    prep = Predictor.load(bundle.path).preprocessing
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(prep.mean).view(1, -1, 1, 1)) / torch.tensor(prep.std).view(1, -1, 1, 1)
    with torch.inference_mode():
        ema_x, raw_x = (torch.softmax(net(x), dim=1).numpy() for net in (ema_net, raw_net))
    assert np.abs(onnx_p - ema_x).max() < 1e-4
    assert np.abs(onnx_p - raw_x).max() > 1e-3


def test_resume_with_ema_is_bit_exact(fast):
    """1 epoch, then resume to 3, equals 3 epochs straight: the trained weights, the average and its update count."""
    full = train(load_config(fast("run_name=full", "model.ema=true", "data.num_workers=1", epochs=3)))
    part = train(load_config(fast("run_name=part", "model.ema=true", "data.num_workers=1", epochs=1)))
    resumed = resume(part.run_dir, ["trainer.max_epochs=3"])
    a, b = _checkpoint(full.run_dir), _checkpoint(resumed.run_dir)
    assert _equal(net_state_dict(a), net_state_dict(b))
    assert _equal(_trained(a), _trained(b))
    assert int(a["averaging_state"]["n_averaged"]) == int(b["averaging_state"]["n_averaged"]) == 12
    assert not _equal(net_state_dict(a), _trained(a))
    assert _rows(resumed.run_dir) == _rows(full.run_dir)


def test_ema_decay_warms_up_like_timm():
    from pixelmill.training.averaging import ema_decay

    assert ema_decay(1, 0.9998, warmup=False) == 0.9998
    assert ema_decay(1, 0.9998, warmup=True) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay(999, 0.9998, warmup=True) == pytest.approx(0.99, abs=1e-4)
    assert ema_decay(10**9, 0.9998, warmup=True) == 0.9998


# ----------------------------------------------------------------------------- SWA


class _EpochWeights(Callback):
    """The trained weights (not an average) at the end of every training epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def test_swa_averages_the_last_epochs_and_changes_the_final_weights(fast):
    seen = _EpochWeights()
    swa = train(load_config(fast("run_name=swa", "trainer.swa=true", "trainer.swa_epoch_start=2", "trainer.swa_lr=0.0005",
                                 "data.num_workers=0", epochs=3)), callbacks=[seen])
    plain = train(load_config(fast("run_name=plain", "data.num_workers=0", epochs=3)))
    last = _checkpoint(swa.run_dir)
    average = net_state_dict(last)
    # The average of epochs 2 and 3 (their last steps), batch-norm statistics included; training kept its own weights.
    assert _equal(_trained(last), seen.epochs[2])
    for key, value in average.items():
        if value.is_floating_point():
            assert torch.allclose(value, (seen.epochs[1][key] + seen.epochs[2][key]) / 2, atol=1e-6), key
    assert int(last["averaging_state"]["n_averaged"]) == 2
    # SWA changes the final weights (and the best checkpoint, which evaluation and export read).
    assert not _equal(average, net_state_dict(_checkpoint(plain.run_dir)))
    assert not _equal(average, _trained(last))
    # Epoch 1 is the plain run's, then the SWA learning rate holds.
    assert _rows(swa.run_dir)[0] == _rows(plain.run_dir)[0]
    assert [float(r["lr"]) for r in _rows(swa.run_dir)][1:] == pytest.approx([0.0005, 0.0005])


class _StopAfterFirstEpoch(Callback):
    """What a Ctrl+C in the first epoch does (GracefulStop): finish and save that epoch, then stop."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_swa_resume_is_bit_exact(fast):
    args = ("trainer.swa=true", "trainer.swa_epoch_start=2", "data.num_workers=1")
    full = train(load_config(fast("run_name=full", *args, epochs=3)))
    part = train(load_config(fast("run_name=part", *args, epochs=3)), callbacks=[_StopAfterFirstEpoch()])
    assert len(_rows(part.run_dir)) == 1 and "averaging_state" not in _checkpoint(part.run_dir)  # stopped before averaging began
    resumed = resume(part.run_dir)
    a, b = _checkpoint(full.run_dir), _checkpoint(resumed.run_dir)
    assert _equal(net_state_dict(a), net_state_dict(b)) and _equal(_trained(a), _trained(b))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.ema=true", "trainer.swa=true"], "both replace the trained weights"),
        (["model.ema=true", "model.freeze_backbone=true"], "model.freeze_backbone=true trains only its head"),
        (["trainer.swa=true", "trainer.swa_epoch_start=0"], "trainer.swa_epoch_start"),
        (["trainer.swa=true", "trainer.swa_epoch_start=1.5"], "trainer.swa_epoch_start"),
        (["trainer.swa=true", "trainer.swa_epoch_start=12", "trainer.max_epochs=10"], "never start"),
        (["trainer.compile=maybe"], "trainer.compile"),
        (["optim.lr=fast"], "optim.lr"),
        (["data.batch_size=12.5"], "whole number"),
        (["data.num_workers=some"], "data.num_workers"),
        (["model.ema_decay=1.5"], "model.ema_decay"),
    ],
)
def test_recipe_config_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as caught:
        load_config(overrides)
    assert "\n" not in str(caught.value)


@pytest.mark.reliability("recipe: EMA with a frozen backbone exits 2 with one line")
def test_ema_with_a_frozen_backbone_exits_2(digits_root: Path, tmp_path: Path):
    line = _one_error_line(_train_cli([f"data.path={digits_root}", "model.ema=true", "model.freeze_backbone=true", f"output_dir={tmp_path}"]))
    assert "model.ema=true" in line and "model.freeze_backbone" in line
    assert not (tmp_path / "default").exists()  # refused before any run directory


# ----------------------------------------------------------------------------- model options


def _timm_net(*overrides: str) -> torch.nn.Module:
    from pixelmill.tasks.classification import build_net

    return build_net(load_config(["model.name=resnet18", "model.in_chans=3", *overrides]), 4)


def test_drop_path_is_active_in_training_only():
    torch.manual_seed(0)
    dropping, plain = _timm_net("model.drop_path_rate=0.5"), _timm_net()
    probs = [m.drop_prob for m in dropping.modules() if type(m).__name__ == "DropPath"]
    assert probs and max(probs) == pytest.approx(0.5)
    assert not any(type(m).__name__ == "DropPath" for m in plain.modules())
    for net in (dropping, plain):
        # timm starts each residual block's last batch norm at zero (a skipped block would change nothing): start at one.
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
    x = torch.randn(8, 3, 32, 32)

    def twice(net: torch.nn.Module, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        net.train(training)
        with torch.no_grad():
            return net(x), net(x)

    a, b = twice(dropping, training=True)
    assert not torch.equal(a, b)  # blocks skipped at random, per sample
    assert torch.equal(*twice(dropping, training=False))
    assert torch.equal(*twice(plain, training=True))  # without drop-path, training mode is deterministic here


def test_drop_path_and_grad_checkpointing_are_refused_where_the_model_lacks_them():
    from pixelmill.tasks.classification import build_net
    from pixelmill.training.recipe import prepare_net

    with pytest.raises(ModelError, match="drop_path_rate applies to timm models"):
        build_net(load_config(["model.name=small_cnn", "model.drop_path_rate=0.1"]), 3)
    cfg = load_config(["model.name=tv:resnet18", "model.grad_checkpointing=true"])
    with pytest.raises(ModelError, match="does not support gradient checkpointing"):
        prepare_net(cfg, build_net(cfg, 3))


def test_grad_checkpointing_recomputes_without_changing_the_gradients():
    from pixelmill.training.recipe import prepare_net

    cfg = load_config(["model.name=resnet18", "model.grad_checkpointing=true", "model.channels_last=false"])  # one memory format on both sides
    torch.manual_seed(0)
    checkpointed = prepare_net(cfg, _timm_net())
    torch.manual_seed(0)
    plain = _timm_net()
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for net in (checkpointed, plain):
        torch.nn.functional.cross_entropy(net.train()(x), y).backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


class _MemoryFormat(Callback):
    """Whether a convolution's weight and the input it gets are channels-last, at the first training step (the first
    convolution with several input channels: with one, NCHW and NHWC strides are the same)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx:
            return
        conv = next(m for m in pl_module.net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        self.weight = conv.weight.is_contiguous(memory_format=torch.channels_last)
        handle = conv.register_forward_pre_hook(self._seen)
        pl_module.net(batch[0][:2])
        handle.remove()

    def _seen(self, module, args) -> None:
        self.input = args[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("setting, expected", [("true", True), ("false", False), ("auto", True)])  # auto: the small CNN is convolutions
def test_channels_last_sets_the_memory_format_of_weights_and_inputs(fast, setting, expected, caplog):
    seen = _MemoryFormat()
    with caplog.at_level("INFO", logger="pixelmill"):
        train(load_config(fast(f"model.channels_last={setting}", "model.in_chans=1", "data.num_workers=0", epochs=1)), callbacks=[seen])
    assert seen.weight is expected and seen.input is expected
    assert ("model.channels_last=auto: on" in caplog.text) is (setting == "auto")


def test_channels_last_auto_is_on_for_convolutional_nets_only():
    """auto follows where the weights are: convolutions (ResNet, EfficientNet) or attention and MLPs (ViT, table MLPs)."""
    import timm

    from pixelmill.training.recipe import wants_channels_last

    for name, expected in (("resnet18", True), ("efficientnet_b0", True), ("vit_tiny_patch16_224", False)):
        assert wants_channels_last("auto", timm.create_model(name, pretrained=False, num_classes=3), name) is expected, name
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    assert wants_channels_last("auto", mlp) is False
    assert wants_channels_last(True, mlp) is True


def test_channels_last_takes_only_true_false_or_auto(fast):
    with pytest.raises(ConfigError, match="'model.channels_last'; choose one of: true, false, auto"):
        load_config(fast("model.channels_last=fast"))


@pytest.mark.slow
def test_compile_trains_a_compiled_network(fast):
    from torch._dynamo.utils import counters

    counters.clear()
    # With the EMA and channels-last too: the average is a copy of the compiled network, the inputs go NHWC before it.
    result = train(load_config(fast("trainer.compile=true", "model.ema=true", "model.channels_last=true", "trainer.limit_train_batches=3",
                                    "trainer.limit_val_batches=1", "data.num_workers=0", epochs=2)))
    rows = _rows(result.run_dir)
    assert len(rows) == 2 and all(np.isfinite(float(r["train/loss"])) for r in rows)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo captured the network's forward
    # The checkpoint names the weights as an uncompiled network does: evaluation and export load it as usual.
    from pixelmill.runs import load_run

    assert load_run(result.run_dir).net is not None
    assert not _equal(net_state_dict(_checkpoint(result.run_dir)), _trained(_checkpoint(result.run_dir)))


@pytest.mark.reliability("recipe: trainer.compile=true without a working compiler exits 2 with one line")
def test_compile_without_a_working_compiler_exits_2_before_training(digits_root: Path, tmp_path: Path):
    """A real environment whose C++ compiler does not exist (and an empty kernel cache, so nothing compiled before is reused)."""
    env = {"CXX": str(tmp_path / "no-such-compiler" / "g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = _train_cli([f"data.path={digits_root}", "data.image_size=32", "model.in_chans=1", "trainer.compile=true", "logger=[csv]",
                      "trainer.progress_bar=false", f"output_dir={tmp_path / 'runs'}", "run_name=c"], env)
    line = _one_error_line(out)
    assert "trainer.compile=true" in line and "compiler" in line.lower()
    assert not (tmp_path / "runs" / "default" / "c").exists()


# ----------------------------------------------------------------------------- augmentation


def _datamodule(digits_root: Path, **augment):
    from pixelmill.config.schema import AugmentConfig
    from pixelmill.data.datamodule import ImageDataModule
    from pixelmill.data.preprocess import Preprocessing
    from pixelmill.data.scan import scan_images

    prep = Preprocessing(channels=1, size=32, crop_pct=1.0, interpolation="bilinear", mean=(0.5,), std=(0.5,))
    cfg = OmegaConf.create({"augment": OmegaConf.structured(AugmentConfig(hflip=False, **augment)), "num_workers": 0,
                            "batch_size": 16, "eval_batch_size": None, "sampler": "shuffle", "cache": "none"})
    return ImageDataModule(scan_images(digits_root), prep, cfg, seed=3)


@pytest.mark.parametrize(
    "augment",
    [{"random_erasing": 1.0}, {"translate": 0.2}, {"zoom": 0.3}, {"shear": 20.0}, {"blur": 1.0}],
    ids=["random_erasing", "translate", "zoom", "shear", "blur"],
)
def test_augmentations_change_training_images_not_evaluation_images(digits_root: Path, augment):
    plain, augmented = _datamodule(digits_root), _datamodule(digits_root, **augment)
    loader = plain.train_dataloader()
    loader.sampler.set_epoch(0)
    keys = list(loader.sampler)[:16]
    train_plain, train_aug = plain.dataset("train", train=True), augmented.dataset("train", train=True)
    changed = [not torch.equal(train_plain[k][0], train_aug[k][0]) for k in keys]
    assert sum(changed) >= 12, changed  # (blur and erasing at p=1 change every image; a small shift may miss a blank border)
    assert all(torch.equal(train_aug[k][0], train_aug[k][0]) for k in keys[:4])  # seeded per sample: the same draw again
    eval_plain, eval_aug = plain.dataset("val"), augmented.dataset("val")
    assert all(torch.equal(eval_plain[i][0], eval_aug[i][0]) for i in range(16))


def test_random_erasing_fills_with_the_mean_colour(digits_root: Path):
    """Erased pixels are the normalised 0 (the mean), what timm erases to after normalisation."""
    dm = _datamodule(digits_root, random_erasing=1.0)
    x = dm.dataset("train", train=True)[(0, 123)][0]  # (1, 32, 32), normalised
    plain = _datamodule(digits_root).dataset("train", train=True)[(0, 123)][0]
    erased = x != plain
    assert erased.any() and torch.all(x[erased].abs() <= 1 / 255 / 0.5 + 1e-6)


# ----------------------------------------------------------------------------- finders


def test_lr_finder_value_lands_in_config_summary_and_log(fast):
    auto = train(load_config(fast("run_name=auto", "optim.lr=auto", "data.num_workers=0", epochs=1)))
    saved = yaml.safe_load((auto.run_dir / "config.yaml").read_text())
    lr = saved["optim"]["lr"]
    assert isinstance(lr, float) and 1e-8 < lr < 1.0 and lr == float(f"{lr:.3g}")
    assert json.loads((auto.run_dir / "summary.json").read_text())["tuned"] == {"optim.lr": lr}
    assert f"learning-rate finder chose {lr:g}" in (auto.run_dir / "train.log").read_text()
    # The run then trains exactly as a run given that value: the finder put the initial weights back.
    given = train(load_config(fast("run_name=given", f"optim.lr={lr}", "data.num_workers=0", epochs=1)))
    assert _equal(net_state_dict(_checkpoint(auto.run_dir)), net_state_dict(_checkpoint(given.run_dir)))


def test_batch_size_finder_value_lands_in_config(fast, image_folder_factory, tmp_path: Path):
    root = image_folder_factory(tmp_path / "imgs", {"a": 40, "b": 40}, size=(32, 32))
    run = train(load_config(fast(f"data.path={root}", "model.in_chans=3", "data.batch_size=auto", "data.num_workers=0", "trainer.limit_train_batches=1.0", epochs=1)))
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    size = saved["data"]["batch_size"]
    train_size = json.loads((run.run_dir / "summary.json").read_text())["data"]["counts"]["train"]
    # On CPU nothing runs out of memory at this size: the search doubles from 2 until the training split is used up.
    assert isinstance(size, int) and size == train_size
    assert json.loads((run.run_dir / "summary.json").read_text())["tuned"] == {"data.batch_size": size}
    assert int(_rows(run.run_dir)[0]["step"]) == 1  # one batch holds the whole split


@pytest.mark.reliability("recipe: the learning-rate finder on a dataset too small for it exits 2 with one line")
def test_lr_finder_on_a_dataset_too_small_exits_2(image_folder_factory, tmp_path: Path):
    root = image_folder_factory(tmp_path / "imgs", {"a": 30, "b": 30}, size=(32, 32))
    out = _train_cli([f"data.path={root}", "data.image_size=32", "optim.lr=auto", "data.batch_size=8", "logger=[csv]",
                      "trainer.progress_bar=false", f"output_dir={tmp_path / 'runs'}"])
    line = _one_error_line(out)
    assert "optim.lr=auto" in line and "needs 20 or more" in line and re.search(r"in batches of 8 give \d+;", line)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- defaults


def test_num_workers_auto_follows_the_cores(monkeypatch):
    from pixelmill.data.datamodule import resolve_workers

    cores = len(os.sched_getaffinity(0))
    assert resolve_workers("auto") == max(0, min(8, cores - 1))
    for usable, processes, expected in [(1, 1, 0), (2, 1, 1), (4, 1, 3), (16, 1, 8), (64, 1, 8), (16, 2, 7), (8, 4, 1)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=usable: set(range(n)))
        assert resolve_workers("auto", processes) == expected, (usable, processes)
    assert resolve_workers(3) == 3 and resolve_workers(0) == 0
    assert load_config([]).data.num_workers == "auto"
    assert load_config(["data=tabular"]).data.num_workers == 0  # rows are tensors in memory already


def test_an_error_in_a_loader_worker_stays_one_line():
    """With workers on by default, a file that breaks after the scan is reported as itself, not as a worker traceback."""
    from torch.utils.data import DataLoader, Dataset

    from pixelmill.errors import DataError

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):
            raise DataError("cannot read image 'a.png' (truncated); it changed after the scan - re-run training")

    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(caught.value) == "cannot read image 'a.png' (truncated); it changed after the scan - re-run training"
