"""A real ``mlflow server`` on PostgreSQL, as the README sets it up: trainings, a resume and the registry through it.

The server stores runs in the private PostgreSQL of ``conftest.py`` and artifacts in its own folder
(``--serve-artifacts``): pixelmill processes reach it only over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from helpers import clean_env, fast_train_overrides, free_port, serve_process, stop_process_group

PIXELMILL = [sys.executable, "-m", "pixelmill.cli"]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


@dataclass
class MlflowServer:
    url: str
    artifacts: Path


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free 127.0.0.1 port with a PostgreSQL backend store; ready once ``/health`` answers."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port, artifacts, log = free_port(), root / "artifacts", root / "server.log"
    cmd = [MLFLOW, "server", "--backend-store-uri", postgres.database("mlflow"), "--serve-artifacts",
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    # pixelmill uses none of the server's job runners (GenAI features): they would add eight processes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # the first start creates the tables (alembic migrations)
        while True:
            assert proc.poll() is None, f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"mlflow server not healthy within 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield MlflowServer(url=url, artifacts=artifacts)
    finally:
        stop_process_group(proc)


def _train_args(digits_root: Path, out: Path, server: MlflowServer, *extra: str, epochs: int = 2) -> list[str]:
    """A quick digits run tracked by the server only (csv for the run directory's own metrics)."""
    return fast_train_overrides(digits_root, out, "logger=[csv,mlflow]", f"tracking.mlflow.uri={server.url}", *extra, epochs=epochs)


def _start(args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([*PIXELMILL, *args], stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=clean_env(env or {}), start_new_session=True)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([*PIXELMILL, *args], capture_output=True, text=True, cwd=cwd, env=clean_env({"COLUMNS": "200", **(env or {})}), timeout=600)
    assert out.returncode == 0, f"pixelmill {' '.join(args[:2])} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _files_under(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server_runs(mlflow_server: MlflowServer, digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two ``pixelmill train`` processes started together, both logging to the server: their run directories."""
    root = tmp_path_factory.mktemp("server-runs")
    procs = [_start(["train", *_train_args(digits_root, root / "runs", mlflow_server, f"run_name={name}")], root, root / f"{name}.log") for name in ("a", "b")]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            stop_process_group(p)
    assert codes == [0, 0], [(root / f"{name}.log").read_text()[-3000:] for name in ("a", "b")]
    assert not (root / "mlruns.db").exists() and not (root / "mlartifacts").exists(), "nothing may fall back to local MLflow files"
    return [root / "runs" / "default" / name for name in ("a", "b")]


@pytest.mark.slow
def test_two_trainings_log_to_one_server_at_once(mlflow_server, server_runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_ids = [_summary(run_dir)["trackers"]["mlflow"] for run_dir in server_runs]
    assert len(set(run_ids)) == 2
    for run_dir, run_id in zip(server_runs, run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
        assert run.data.params["model.name"] == "small_cnn"
        for key in ("train/loss", "val/acc", "val/loss"):
            assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1], key
        assert run.data.metrics["val/acc"] == pytest.approx(_summary(run_dir)["last_epoch_metrics"]["val/acc"])
        # Artifacts went through the server into its own folder, not onto the trainer's disk.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert {"config.yaml", "summary.json"} <= {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "summary.json", "best.ckpt"} <= _files_under(mlflow_server.artifacts / run.info.experiment_id / run_id)


@pytest.mark.slow
def test_killed_and_resumed_run_continues_its_server_run_without_gaps(mlflow_server, digits_root, tmp_path):
    from mlflow.tracking import MlflowClient

    epochs = 4
    args = _train_args(digits_root, tmp_path / "runs", mlflow_server, "run_name=k", "eval.splits=[]", "trainer.limit_train_batches=4", epochs=epochs)
    proc = _start(["train", *args], tmp_path, tmp_path / "first.log")
    run_dir = tmp_path / "runs" / "default" / "k"
    try:
        deadline = time.monotonic() + 300
        while not ((run_dir / "summary.json").is_file() and _summary(run_dir).get("epochs_completed", 0) >= 1):
            assert proc.poll() is None, f"training ended before it could be killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no epoch finished within 300 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-run: no chance to close the MLflow run
        proc.wait()
    finally:
        stop_process_group(proc)
    run_id = _summary(run_dir)["trackers"]["mlflow"]
    client = MlflowClient(tracking_uri=mlflow_server.url)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert _summary(run_dir)["epochs_completed"] < epochs

    _run(["train", f"resume={run_dir}"], tmp_path)

    assert _summary(run_dir)["trackers"]["mlflow"] == run_id, "resume must continue the same MLflow run"
    experiment = client.get_experiment_by_name("default")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id], "attributes.run_name = 'k'")] == [run_id]
    for key in ("train/loss", "val/acc"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(epochs)), f"{key}: a gap or a repeated step"
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_registry_register_promote_predict_and_serve_through_the_server(mlflow_server, server_runs, digit_files, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = server_runs[0]
    # register finds the server in the run's own config; promote, predict and serve in MLFLOW_TRACKING_URI.
    out = _run(["registry", "register", str(run_dir), "--name", "digits"], tmp_path)
    assert "registered digits version 1" in " ".join(out.stdout.split())
    out = _run(["registry", "promote", "digits", "1", "--alias", "champion"], tmp_path, {"MLFLOW_TRACKING_URI": mlflow_server.url})
    assert "models:/digits@champion -> version 1" in out.stdout

    version = MlflowClient(tracking_uri=mlflow_server.url).get_model_version_by_alias("digits", "champion")
    assert version.version == "1"
    # The bundle was uploaded through the server into its artifact folder.
    assert {"bundle.json", "model.onnx"} <= _files_under(next(mlflow_server.artifacts.glob(f"*/{version.run_id}")))
    assert not (tmp_path / "mlruns.db").exists(), "nothing may fall back to a local store"

    predict_cache, serve_cache = tmp_path / "predict-cache", tmp_path / "serve-cache"  # each downloads from the server
    preds = tmp_path / "preds.csv"
    _run(["predict", "models:/digits@champion", *map(str, digit_files[:4]), "--out", str(preds)], tmp_path,
         {"MLFLOW_TRACKING_URI": mlflow_server.url, "PIXELMILL_MODEL_CACHE_DIR": str(predict_cache)})
    assert len(preds.read_text().strip().splitlines()) == 5  # header + 4 images

    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "PIXELMILL_MODEL_CACHE_DIR": str(serve_cache)}
    with serve_process("models:/digits@champion", tmp_path, env) as server:
        answer = httpx.post(f"{server.url}/predict", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in digit_files[:2]], timeout=30)
        assert answer.status_code == 200, answer.text
        served = httpx.get(f"{server.url}/model", timeout=10).json()
    assert len(answer.json()["predictions"]) == 2
    for cache in (predict_cache, serve_cache):
        cached = list(cache.rglob("bundle.json"))
        assert len(cached) == 1 and cached[0].parent.name == "1"  # <cache>/<store>/digits/1/bundle.json
        assert json.loads(cached[0].read_text())["files"]["model.onnx"] == served["sha256"]
    assert (served["name"], served["version"]) == ("digits", "1")  # served under its registry name and version
