"""Real two-process Lightning DDP on CPU (gloo): the same result as one process, one run, one tracker run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import fast_train_overrides
from pixelmill.training.checkpoint import net_state_dict, read_checkpoint


def _train(args, cwd):
    out = subprocess.run([sys.executable, "-m", "pixelmill.cli", "train", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(digits_root, tmp_path):
    """2 ranks x 16 images == 1 process x 32 images: the same global batches in the same order.

    With a batch-independent network (GroupNorm, no dropout) DDP's averaged gradients equal
    the one-process gradient up to float summation order (~1e-7 relative per step; training
    amplifies it over many steps): after 4 SGD steps weights and validation loss agree within 1e-4.
    (BatchNorm normalises per rank on CPU, where SyncBatchNorm does not run.)
    """
    mlflow = [f"tracking.mlflow.uri=sqlite:///{tmp_path}/mlruns.db", f"tracking.mlflow.artifact_location={tmp_path}/art"]
    common = ["optim.name=sgd", "optim.lr=0.01", "model.name=small_cnn_gn", "model.drop_rate=0.0", "data.eval_batch_size=32", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "eval.splits=[]",
              "logger=[csv,mlflow]", "trainer.accelerator=cpu", *mlflow]
    single = fast_train_overrides(digits_root, tmp_path / "runs", *common, "run_name=single", "data.batch_size=32", epochs=1)
    ddp = fast_train_overrides(digits_root, tmp_path / "runs", *common, "experiment=ddp", "data.batch_size=16",
                               "trainer.devices=2", "trainer.strategy=ddp", epochs=1)
    _train(single, tmp_path)
    _train(ddp, tmp_path)

    ddp_runs = list((tmp_path / "runs" / "ddp").iterdir())
    assert len(ddp_runs) == 1, "exactly one run directory for all ranks"
    run_dir = ddp_runs[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_completed"] == 1

    one = json.loads((tmp_path / "runs" / "default" / "single" / "summary.json").read_text())["last_epoch_metrics"]
    two = summary["last_epoch_metrics"]
    assert one["val/loss"] == pytest.approx(two["val/loss"], abs=1e-4)
    w1 = net_state_dict(read_checkpoint(tmp_path / "runs" / "default" / "single" / "checkpoints" / "last.ckpt"))
    w2 = net_state_dict(read_checkpoint(run_dir / "checkpoints" / "last.ckpt"))
    worst = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    print(f"largest weight difference DDP vs one process: {worst:.2e}")
    assert worst < 1e-4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.get_experiment_by_name("ddp")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1, "exactly one MLflow run for all ranks"
    assert [m.step for m in client.get_metric_history(found[0].info.run_id, "val/acc")] == [0]
