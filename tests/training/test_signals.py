"""SIGINT / SIGTERM stop training at an epoch boundary, with a checkpoint, and resume continues it."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from helpers import fast_train_overrides


@pytest.mark.slow
@pytest.mark.reliability("training: SIGINT/SIGTERM stop at an epoch boundary, marked interrupted, resumable")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_resume_finishes(sig, digits_root, tmp_path):
    epochs = 6
    mlflow = [f"tracking.mlflow.uri=sqlite:///{tmp_path}/mlruns.db", f"tracking.mlflow.artifact_location={tmp_path}/art"]
    args = fast_train_overrides(digits_root, tmp_path / "runs", "run_name=s", "eval.splits=[]", "trainer.limit_train_batches=4",
                                "logger=[csv,mlflow]", *mlflow, epochs=epochs)
    proc = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", "train", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "default" / "s"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "summary.json").is_file() and json.loads((run_dir / "summary.json").read_text()).get("status") == "running":
            break
        time.sleep(0.02)
    time.sleep(0.5)
    assert proc.poll() is None, "training ended before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    stopped_after = summary["epochs_completed"]
    assert 1 <= stopped_after < epochs
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "resume=" in err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    (run,) = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["pixelmill.status"] == "interrupted"

    out = subprocess.run([sys.executable, "-m", "pixelmill.cli", "train", f"resume={run_dir}"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == list(range(epochs))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    (run,) = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["pixelmill.status"] == "finished"
