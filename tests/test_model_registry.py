"""The MLflow Model Registry on a real SQLite store: register, list, promote, resolve, and two writers at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pixelmill.cli import app
from pixelmill.errors import ModelError
from pixelmill.export.bundle import read_bundle
from pixelmill.inference.predictor import Predictor


@pytest.fixture(scope="module")
def run_copy(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared run (registering writes RUN_DIR/bundle), without a bundle yet."""
    run = shutil.copytree(trained_run, tmp_path_factory.mktemp("registry") / "run", ignore=shutil.ignore_patterns("bundle*"))
    assert not (run / "bundle").exists()
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db"


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def test_register_list_promote_and_resolve(
    run_copy: Path, store: str, digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from pixelmill.model_registry import resolve_model

    monkeypatch.setenv("PIXELMILL_CACHE_DIR", str(tmp_path / "cache"))
    assert "version 1" in _cli("registry", "register", str(run_copy), "--name", "digits", "--tracking-uri", store)
    assert (run_copy / "bundle" / "model.onnx").is_file()  # exported first, because it was missing
    assert "version 2" in _cli("registry", "register", str(run_copy), "--name", "digits", "--tracking-uri", store)

    listing = _cli("registry", "list", "digits", "--tracking-uri", store)
    assert "digits" in listing and " 1 " in listing and " 2 " in listing
    assert "@champion -> version 1" in _cli("registry", "promote", "digits", "1", "--alias", "champion", "--tracking-uri", store)
    overview = _cli("registry", "list", "--tracking-uri", store)  # latest version and aliased ones
    assert "champion" in overview and " 2 " in overview

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    champion = client.get_model_version_by_alias("digits", "champion")
    assert int(champion.version) == 1
    summary_acc = read_bundle(run_copy / "bundle").meta["metrics"]["eval"]["test"]["accuracy"]
    assert float(champion.tags["test/accuracy"]) == pytest.approx(summary_acc, rel=1e-5)
    assert champion.tags["bundle_sha256"] == read_bundle(run_copy / "bundle").meta["files"]["model.onnx"]
    # the ONNX flavour: what `mlflow models serve` would load
    mlflow.set_tracking_uri(store)
    try:
        onnx_model = mlflow.onnx.load_model("models:/digits@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert onnx_model.graph.input[0].name == "image"

    local = read_bundle(run_copy / "bundle")
    for uri in ("models:/digits@champion", "models:/digits/2"):
        path = resolve_model(uri, tracking_uri=store)
        assert path.is_relative_to(tmp_path / "cache")
        assert read_bundle(path).meta["files"] == local.meta["files"]
    assert resolve_model("models:/digits@champion", tracking_uri=store) == resolve_model("models:/digits/1", tracking_uri=store)
    assert resolve_model(run_copy) == local.path

    image = sorted((digits_root / "test" / "3").glob("*.png"))[0]
    preds = Predictor.load("models:/digits@champion", tracking_uri=store).predict([image])
    assert preds[0].probabilities == Predictor.load(run_copy / "bundle").predict([image])[0].probabilities

    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("models:/digits@nobody", tracking_uri=store)
    with pytest.raises(ModelError, match="no version 9"):
        from pixelmill.model_registry import promote

        promote("digits", 9, tracking_uri=store)


def test_models_uris_resolve_through_mlflow_tracking_uri_again_and_again(
    run_copy: Path, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server resolves its models:/ URIs more than once (the plan check, then the worker): each
    lookup must still find $MLFLOW_TRACKING_URI, never fall back to a local ./mlruns.db."""
    from pixelmill.model_registry import resolve_model

    assert "@champion -> version 1" in _cli("registry", "promote", "digits", "1", "--alias", "champion", "--tracking-uri", store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    for attempt in range(3):
        monkeypatch.setenv("PIXELMILL_CACHE_DIR", str(tmp_path / f"cache{attempt}"))  # each downloads again
        assert (resolve_model("models:/digits@champion") / "model.onnx").is_file()
        assert os.environ["MLFLOW_TRACKING_URI"] == store
    assert not (tmp_path / "mlruns.db").exists()


def test_predict_cli_takes_a_models_uri(run_copy: Path, store: str, digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXELMILL_CACHE_DIR", str(tmp_path / "cache"))
    image = sorted((digits_root / "test" / "7").glob("*.png"))[0]
    out = tmp_path / "p.json"
    _cli("predict", "models:/digits/1", str(image), "--tracking-uri", store, "--out", str(out))
    assert '"error": null' in out.read_text()


def test_two_processes_register_at_once(run_copy: Path, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/concurrent.db"  # a fresh store: both also race to create the tables
    cmd = [sys.executable, "-m", "pixelmill.cli", "registry", "register", str(run_copy), "--name", "race", "--tracking-uri", store]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    versions = sorted(int(out.split("version")[1].split()[0]) for out, _ in outputs)
    assert versions == [1, 2]

    from pixelmill.model_registry import list_versions

    assert [v.version for v in list_versions("race", tracking_uri=store)] == [2, 1]
