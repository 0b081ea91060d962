"""train(): a run directory a user can rely on, every training option really applied."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelmill.config import load_config
from pixelmill.errors import ConfigError, DataError, RunError
from pixelmill.training.checkpoint import net_state_dict, read_checkpoint
from pixelmill.training.fit import resume, train


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _weights(run_dir: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return net_state_dict(read_checkpoint(run_dir / "checkpoints" / f"{which}.ckpt"))


def test_run_directory_has_everything(fast):
    result = train(load_config(fast("run_name=r1", "logger=[csv,tensorboard]", "eval.splits=[test]")))
    run = result.run_dir
    assert result.status == "finished"
    for name in ("config.yaml", "metrics.csv", "train.log", "summary.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert {"train/loss", "val/acc", "val/f1_macro", "lr"} <= set(rows[0])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["data"]["counts"]["train"] > 1000 and summary["data"]["fingerprint"]
    assert summary["best"]["epoch"] in (0, 1)
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["durations"]["fit_s"] > 0
    assert summary["preprocessing"]["channels"] == 1 and summary["preprocessing"]["size"] == 32
    assert "data.path" in (run / "config.yaml").read_text() or "path:" in (run / "config.yaml").read_text()
    # Test split evaluated with the best checkpoint.
    assert result.test_metrics and 0.0 <= result.test_metrics["accuracy"] <= 1.0
    assert (run / "eval" / "test" / "metrics.json").is_file()


def test_same_seed_same_weights_different_seed_different(fast):
    a = train(load_config(fast("run_name=a", epochs=1)))
    b = train(load_config(fast("run_name=b", epochs=1)))
    c = train(load_config(fast("run_name=c", "seed=7", epochs=1)))
    wa, wb, wc = _weights(a.run_dir), _weights(b.run_dir), _weights(c.run_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_existing_run_name_is_refused(fast):
    train(load_config(fast("run_name=dup", epochs=1)))
    with pytest.raises(RunError, match="resume="):
        train(load_config(fast("run_name=dup", epochs=1)))


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_continues_to_identical_weights(fast, workers):
    """In-process: 1 epoch, then resume to 3, equals 3 epochs straight (with a loader worker too: it reads the
    sampler's order as its iterator is built, which Lightning does before it sets the resumed epoch)."""
    full = train(load_config(fast("run_name=full", f"data.num_workers={workers}", epochs=3)))
    part = train(load_config(fast("run_name=part", f"data.num_workers={workers}", epochs=1)))
    resumed = resume(part.run_dir, ["trainer.max_epochs=3"])
    assert resumed.run_dir == part.run_dir
    wf, wr = _weights(full.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert [r["epoch"] for r in _rows(resumed.run_dir)] == ["0", "1", "2"]
    assert _rows(resumed.run_dir) == _rows(full.run_dir)


def test_resume_removes_a_save_the_killed_run_left_unfinished(fast, caplog):
    """A kill mid-save leaves a hidden partial file; resuming deletes it, unless its process still runs."""
    part = train(load_config(fast("run_name=p", epochs=1)))
    checkpoints = part.run_dir / "checkpoints"
    dead = subprocess.Popen(["true"])
    dead.wait()
    with subprocess.Popen(["sleep", "60"]) as live:
        try:
            (checkpoints / f".last.ckpt.tmp-{dead.pid}").write_bytes(b"half a checkpoint")
            (checkpoints / f".best.ckpt.tmp-{live.pid}").write_bytes(b"a save in progress")
            with caplog.at_level("INFO", logger="pixelmill"):
                resume(part.run_dir, ["trainer.max_epochs=2"])
        finally:
            live.kill()
    assert sorted(p.name for p in checkpoints.iterdir()) == [f".best.ckpt.tmp-{live.pid}", "best.ckpt", "last.ckpt"]
    assert f"removed .last.ckpt.tmp-{dead.pid}" in caplog.text


def test_resume_refuses_changing_the_experiment(fast):
    part = train(load_config(fast("run_name=p", epochs=1)))
    with pytest.raises(ConfigError, match="cannot change on resume"):
        resume(part.run_dir, ["optim.lr=0.5"])
    with pytest.raises(RunError, match="does not exist"):
        resume(part.run_dir.parent / "nope")


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(fast, tmp_path):
    """A real SIGKILL after a completed epoch; the resumed run ends with the same weights."""
    epochs = 4
    args = fast(epochs=epochs)
    straight = train(load_config(args + ["run_name=straight"]))

    cmd = [sys.executable, "-m", "pixelmill.cli", "train", *args, "run_name=killed"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "default" / "killed"
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run_dir / "metrics.csv").is_file() and len(_rows(run_dir)) >= 1:
            break
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(_rows(run_dir))
    assert 1 <= done < epochs, f"killed after {done} epochs"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # died mid-run

    out = subprocess.run(
        [sys.executable, "-m", "pixelmill.cli", "train", f"resume={run_dir}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ws, wk = _weights(straight.run_dir), _weights(run_dir)
    assert all(torch.equal(ws[k], wk[k]) for k in ws), "resumed weights differ from the uninterrupted run"
    assert _rows(run_dir) == _rows(straight.run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize(
    "extra",
    [
        ["optim.name=sgd", "scheduler.name=step", "scheduler.step_size=1"],
        ["optim.name=adam", "scheduler.name=cosine", "scheduler.warmup_epochs=1"],
        ["optim.name=rmsprop", "optim.lr=0.0005", "scheduler.name=onecycle"],
        ["optim.name=adamw", "scheduler.name=plateau", "scheduler.patience=0"],
        ["model.label_smoothing=0.1", "trainer.gradient_clip_val=1.0", "trainer.accumulate_grad_batches=2"],
        ["trainer.precision=bf16-mixed"],
        ["data.sampler=balanced", "model.class_weights=auto"],
        ["data.augment.mixup_alpha=0.2", "data.augment.cutmix_alpha=1.0"],
        ["data.augment.auto_augment=trivialaugment", "data.augment.random_resized_crop=true", "data.augment.color_jitter=0.2"],
        ["model.freeze_backbone=true"],
        ["model.name=xray_cnn", "data.image_size=32"],
        ["model.ema=true", "model.channels_last=true", "scheduler.name=cosine", "trainer.accumulate_grad_batches=2"],
        ["trainer.swa=true", "trainer.swa_epoch_start=0.5", "data.augment.translate=0.1", "data.augment.zoom=0.2",
         "data.augment.shear=10", "data.augment.blur=0.5", "data.augment.random_erasing=0.25"],
    ],
    ids=["sgd-step", "adam-cosine", "rmsprop-onecycle", "adamw-plateau", "smooth-clip-accum", "bf16", "balanced",
         "mixup-cutmix", "autoaug", "freeze", "xray_cnn", "ema-channels-last", "swa-affine-blur-erasing"],
)
def test_training_options_train(fast, extra):
    result = train(load_config(fast(*extra, epochs=2)))
    rows = _rows(result.run_dir)
    assert len(rows) == 2
    assert all(float(r["train/loss"]) == float(r["train/loss"]) for r in rows)  # not NaN


def test_scheduler_changes_lr(fast):
    result = train(load_config(fast("optim.name=sgd", "optim.lr=0.1", "scheduler.name=step", "scheduler.step_size=1", "scheduler.gamma=0.5", epochs=2)))
    lrs = [float(r["lr"]) for r in _rows(result.run_dir)]
    assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.05)


def test_epoch_row_is_the_mean_over_the_epochs_steps(fast):
    """metrics.csv's train/loss is the batch-size weighted mean of the epoch's step losses, lr the
    mean of the learning rates its steps used, train/acc the epoch's accuracy."""
    from lightning.pytorch.callbacks import Callback

    class Steps(Callback):
        def __init__(self) -> None:
            self.epochs: list[list[tuple[float, int, float]]] = []
            self.accs: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.epochs.append([])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.epochs[-1].append((float(outputs["loss"]), len(batch[1]), self.lr))
            self.acc = float(pl_module.train_acc.compute())  # over every step so far this epoch

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.accs.append(self.acc)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    steps = Steps()
    # Cosine with warm-up: the learning rate moves every step; the digits' training split
    # leaves a short last batch, so the weighting by batch size shows.
    result = train(
        load_config(fast("scheduler.name=cosine", "scheduler.warmup_epochs=1", "trainer.limit_train_batches=1.0", epochs=2)),
        callbacks=[steps],
    )
    rows = _rows(result.run_dir)
    assert len(rows) == len(steps.epochs) == 2
    for row, epoch, acc in zip(rows, steps.epochs, steps.accs):
        sizes = [n for _, n, _ in epoch]
        assert len(set(sizes)) == 2  # a short last batch
        loss = sum(value * n for value, n, _ in epoch) / sum(sizes)
        assert float(row["train/loss"]) == pytest.approx(loss, rel=1e-5)
        assert float(row["lr"]) == pytest.approx(sum(lr for *_, lr in epoch) / len(epoch), rel=1e-5)
        assert len({lr for *_, lr in epoch}) > 1  # the mean is over changing values
        assert float(row["train/acc"]) == pytest.approx(acc, rel=1e-6)
    assert float(rows[1]["train/acc"]) > float(rows[0]["train/acc"])


def test_freeze_backbone_only_changes_the_head(fast):
    result = train(load_config(fast("model.freeze_backbone=true", "run_name=frozen", epochs=1)))
    from lightning import seed_everything

    from pixelmill.models import create_model

    seed_everything(42)  # the run's seed: the same initial weights
    fresh = create_model("small_cnn", 10, in_chans=1)
    trained = _weights(result.run_dir)
    for name, value in fresh.state_dict().items():
        changed = not torch.equal(value, trained[name])
        assert changed == name.startswith("fc."), name  # BatchNorm statistics stay frozen too


def test_early_stopping_stops(fast):
    result = train(load_config(fast("optim.lr=1e-12", "trainer.early_stopping_patience=1", epochs=6)))
    assert len(_rows(result.run_dir)) < 6


def test_bad_files_are_skipped_and_counted(fast, image_folder_factory, tmp_path):
    root = image_folder_factory(tmp_path / "imgs", {"cat": 24, "dog": 24}, size=(32, 32))
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    (root / "dog" / "empty.jpg").write_bytes(b"")
    cfg = load_config(fast(f"data.path={root}", "model.in_chans=3", "run_name=bad", epochs=1))
    result = train(cfg)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert sum(summary["data"]["counts"].values()) == 48
    assert sum(summary["data"]["skipped"].values()) == 2


def test_missing_data_path_is_a_clear_error(fast, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(load_config(fast(f"data.path={tmp_path / 'nowhere'}")))
    with pytest.raises(ConfigError, match="data.path is not set"):
        train(load_config(["trainer.max_epochs=1"]))


def test_unwritable_output_dir_fails_before_training(fast, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunError, match="cannot write the run directory"):
        train(load_config(fast(f"output_dir={blocker}")))


def test_validation_auroc_is_logged_and_can_pick_the_checkpoint(fast):
    result = train(load_config(fast("trainer.monitor=val/auc_macro", epochs=3)))
    rows = _rows(result.run_dir)
    values = [float(r["val/auc_macro"]) for r in rows]
    assert all(0.0 <= v <= 1.0 for v in values) and values[-1] > values[0], values  # a learning model ranks better
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["best"]["epoch"] == int(np.argmax(values))
