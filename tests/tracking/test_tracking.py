"""Trackers read back with their real clients: MLflow, TensorBoard, W&B (offline) and CSV."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import fast_train_overrides
from pixelmill.config import load_config
from pixelmill.errors import ConfigError
from pixelmill.training.fit import train


def _mlflow_args(tmp_path: Path) -> list[str]:
    return [f"tracking.mlflow.uri=sqlite:///{tmp_path}/mlruns.db", f"tracking.mlflow.artifact_location={tmp_path}/mlartifacts"]


def _mlflow_run(tmp_path: Path, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.get_experiment_by_name("default")
    found = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return client, found


def _wandb_records(run_file: Path) -> tuple[dict, list[dict]]:
    """(config, history rows) from an offline ``.wandb`` file (LevelDB-log framed protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    header = 7  # b":W&B" + version + magic
    records, pending, pos, block = [], b"", header, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last fragment
            records.append(pending)
            pending = b""
        elif kind == 0 and length == 0:
            break
    config, rows = {}, []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "config":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.config.update})
    return config, rows


def test_every_tracker_gets_the_same_run(digits_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    args = fast_train_overrides(digits_root, tmp_path / "runs", "run_name=all", "logger=[csv,tensorboard,mlflow,wandb]", *_mlflow_args(tmp_path))
    result = train(load_config(args))
    run_dir = result.run_dir
    epochs = [0, 1]

    # MLflow: one run with params, tags, full metric history and artifacts.
    client, found = _mlflow_run(tmp_path, "all")
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "small_cnn" and run.data.params["optim.lr"] == "0.003"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.tags["data_fingerprint"] == summary["data"]["fingerprint"]
    assert run.data.tags["version.torch"] == summary["versions"]["torch"]
    for key in ("train/loss", "val/acc", "val/f1_macro", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == epochs, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "report.html", "eval", "checkpoints"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/best.ckpt"}

    # TensorBoard: the event files hold the same scalars at the same steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("val/acc")] == epochs
    mlflow_acc = [m.value for m in client.get_metric_history(run.info.run_id, "val/acc")]
    assert [e.value for e in events.Scalars("val/acc")] == pytest.approx(mlflow_acc)

    # CSV: Lightning's CSV logger and pixelmill's metrics.csv agree.
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc")]
    assert [int(r["step"]) for r in rows] == epochs
    assert [float(r["val/acc"]) for r in rows] == pytest.approx(mlflow_acc)

    # W&B offline: the run directory holds the config and the history.
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    config, history = _wandb_records(next(offline[0].glob("*.wandb")))
    assert config["model.name"] == "small_cnn" and config["optim.lr"] == 0.003
    acc = [row["val/acc"] for row in history if "val/acc" in row]
    assert acc == pytest.approx(mlflow_acc)


def test_unreachable_mlflow_fails_before_training(digits_root, tmp_path):
    args = fast_train_overrides(digits_root, tmp_path / "runs", "run_name=x", "logger=[mlflow]", "tracking.mlflow.uri=http://127.0.0.1:9")
    started = time.time()
    with pytest.raises(ConfigError, match="cannot reach the MLflow tracking store"):
        train(load_config(args))
    assert time.time() - started < 60
    assert not (tmp_path / "runs" / "default" / "x").exists()


@pytest.mark.slow
def test_kill_and_resume_keeps_one_mlflow_run_without_gaps(digits_root, tmp_path):
    epochs = 4
    args = fast_train_overrides(digits_root, tmp_path / "runs", "run_name=k", "logger=[csv,mlflow]", "eval.splits=[]",
                                "trainer.limit_train_batches=4", *_mlflow_args(tmp_path), epochs=epochs)
    proc = subprocess.Popen([sys.executable, "-m", "pixelmill.cli", "train", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "default" / "k"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        summary = run_dir / "summary.json"
        if summary.is_file() and json.loads(summary.read_text()).get("epochs_completed", 0) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    out = subprocess.run([sys.executable, "-m", "pixelmill.cli", "train", f"resume={run_dir}"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    client, found = _mlflow_run(tmp_path, "k")
    assert len(found) == 1, "resume must continue the same MLflow run"
    history = client.get_metric_history(found[0].info.run_id, "val/acc")
    assert sorted(m.step for m in history) == list(range(epochs)), "a gap or a repeated step"
    assert found[0].info.status == "FINISHED"


def test_runs_commands_print_tables(digits_root, tmp_path):
    for name, lr in (("one", "0.003"), ("two", "0.01")):
        train(load_config(fast_train_overrides(digits_root, tmp_path / "runs", f"run_name={name}", f"optim.lr={lr}",
                                               "eval.splits=[]", "trainer.limit_train_batches=2", epochs=1)))
    cli = [sys.executable, "-m", "pixelmill.cli", "runs"]
    env = {**os.environ, "COLUMNS": "200"}
    listed = subprocess.run(cli + ["list", "--output-dir", str(tmp_path / "runs")], capture_output=True, text=True, env=env)
    assert listed.returncode == 0, listed.stderr
    assert "one" in listed.stdout and "two" in listed.stdout and "finished" in listed.stdout
    shown = subprocess.run(cli + ["show", str(tmp_path / "runs" / "default" / "two")], capture_output=True, text=True, env=env)
    assert "optim.lr" in shown.stdout and "0.01" in shown.stdout
    compared = subprocess.run(cli + ["compare", str(tmp_path / "runs" / "default" / "one"), str(tmp_path / "runs" / "default" / "two")],
                              capture_output=True, text=True, env=env)
    assert compared.returncode == 0, compared.stderr
    assert "optim.lr" in compared.stdout and "0.003" in compared.stdout and "val/acc" in compared.stdout
