"""A multi-label bundle end to end: ONNX ending in a sigmoid, thresholds in bundle.json, and the same label
sets from ``pixelmill predict``, ``Predictor``, the eager run, the native API, v2 (tritonclient) and the registry."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from helpers import serve_process
from pixelmill.cli import app
from pixelmill.export.bundle import read_bundle
from pixelmill.inference.predictor import Predictor

tritonclient_http = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def images(multidigits: Path) -> list[Path]:
    files = sorted((multidigits.parent / "images" / "test").glob("*.png"))
    return files[:12]


@pytest.fixture(scope="module")
def server(multilabel_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    with serve_process(str(multilabel_bundle), tmp_path_factory.mktemp("ml-server"), {"PIXELMILL_MAX_DELAY_MS": "5"}) as srv:
        yield srv


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.output


def test_bundle_carries_thresholds_and_ends_in_a_sigmoid(multilabel_bundle: Path, multilabel_run: Path) -> None:
    meta = json.loads((multilabel_bundle / "bundle.json").read_text())
    saved = json.loads((multilabel_run / "thresholds.json").read_text())["thresholds"]
    assert meta["kind"] == "multilabel" and meta["thresholds"] == saved
    assert meta["output"] == {"name": "probabilities", "shape": [-1, 10], "activation": "sigmoid"}
    assert meta["export"]["max_abs_diff"] <= 1e-4 and meta["export"]["checked_images"] >= 32
    graph = onnx.load(multilabel_bundle / "model.onnx").graph
    last = next(node for node in graph.node if "probabilities" in node.output)
    assert last.op_type == "Sigmoid"


def test_predict_cli_predictor_and_eager_run_agree(multilabel_bundle: Path, multilabel_run: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    _cli("predict", str(multilabel_bundle), *map(str, images), "--out", str(out))
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:3] == ["source", "labels", "error"] and len([c for c in rows[0] if c.startswith("p_")]) == 10
    bundle = Predictor.load(multilabel_bundle)
    eager = Predictor.load(multilabel_run)
    from_bundle, from_run = bundle.predict(images), eager.predict(images)
    thresholds = read_bundle(multilabel_bundle).info.thresholds
    for row, p, q in zip(rows, from_bundle, from_run):
        assert row["labels"] == "|".join(p.labels) == "|".join(q.labels)
        assert p.labels == [name for name in bundle.classes if p.probabilities[name] >= thresholds[name]]
        assert max(abs(p.probabilities[c] - q.probabilities[c]) for c in bundle.classes) < 1e-4
        assert float(row["p_3"]) == pytest.approx(p.probabilities["3"], abs=1e-6)
    assert any(len(p.labels) >= 2 for p in from_bundle)  # label sets, not one label


def test_predictions_match_the_truth_mostly(multilabel_bundle: Path, multidigits: Path) -> None:
    with open(multidigits, newline="") as fh:
        truth = {row["path"]: row["labels"] for row in csv.DictReader(fh) if row["split"] == "test"}
    paths = sorted(truth)[:60]
    predicted = Predictor.load(multilabel_bundle).predict([str(multidigits.parent / p) for p in paths])
    hits = np.mean([set(p.labels) == set(filter(None, truth[path].split("|"))) for p, path in zip(predicted, paths)])
    assert hits > 0.1  # far above chance (2^10 sets) after a few tiny epochs


def test_native_predict_returns_label_sets_and_takes_a_threshold(server, multilabel_bundle: Path, images: list[Path]) -> None:
    expected = Predictor.load(multilabel_bundle).predict(images[:4])
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images[:4]]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        answer = http.post("/predict", files=files)
        assert answer.status_code == 200, answer.text
        body = answer.json()["predictions"]
        assert [b["labels"] for b in body] == [p.labels for p in expected]
        assert [b["file"] for b in body] == [p.name for p in images[:4]]
        assert body[0]["probabilities"]["3"] == pytest.approx(expected[0].probabilities["3"], abs=1e-6)
        assert body[0]["thresholds"] == read_bundle(multilabel_bundle).info.thresholds
        low = http.post("/predict", params={"threshold": 0.0}, files=files).json()["predictions"]
        assert all(len(b["labels"]) == 10 for b in low)  # every label reaches a threshold of 0
        assert http.post("/predict", params={"threshold": 1.5}, files=files).status_code == 422
        model = http.get("/model").json()
        assert model["kind"] == "multilabel" and model["thresholds"] == body[0]["thresholds"]


def test_v2_round_trip_through_tritonclient(server, multilabel_bundle: Path, images: list[Path]) -> None:
    predictor = Predictor.load(multilabel_bundle)
    batch = np.stack([predictor.classifier.prepare(str(p)) for p in images[:5]])
    client = tritonclient_http.InferenceServerClient(url=server.url.removeprefix("http://"), connection_timeout=30, network_timeout=30)
    try:
        name = read_bundle(multilabel_bundle).name
        tensor = tritonclient_http.InferInput("image", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch, binary_data=True)
        result = client.infer(name, [tensor], outputs=[tritonclient_http.InferRequestedOutput("probabilities", binary_data=True)])
        probs = result.as_numpy("probabilities")
        metadata = client.get_model_metadata(name)
    finally:
        client.close()
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs, predictor.classifier.run(batch), atol=1e-6)
    assert metadata["outputs"][0]["shape"] == [-1, 10]


def test_registry_resolves_a_multilabel_model(multilabel_run: Path, images: list[Path], tmp_path: Path) -> None:
    run = shutil.copytree(multilabel_run, tmp_path / "run", ignore=shutil.ignore_patterns("bundle*"))
    store = f"sqlite:///{tmp_path}/mlruns.db"
    assert "version 1" in _cli("registry", "register", str(run), "--name", "findings", "--tracking-uri", store)
    predicted = Predictor.load("models:/findings/1", tracking_uri=store).predict(images[:3])
    direct = Predictor.load(run).predict(images[:3])
    assert [p.labels for p in predicted] == [p.labels for p in direct]


def test_int8_export_is_judged_by_its_label_decisions(multilabel_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle-int8"
    text = _cli("export", str(multilabel_run), "--quantize", "int8", "--out", str(out), "--min-int8-agreement", "0.9")
    check = json.loads((out / "bundle.json").read_text())["export"]
    assert "label agreement" in text and check["quantize"] == "int8"
    assert 0.9 <= check["label_agreement"] <= 1.0 and check["min_top1_agreement"] == 0.9
    refused = CliRunner().invoke(app, ["export", str(multilabel_run), "--quantize", "int8", "--out", str(tmp_path / "strict"), "--min-int8-agreement", "1.0"])
    if check["label_agreement"] < 1.0:  # the gate reads label decisions: a stricter bar refuses and writes nothing
        assert refused.exit_code != 0 and "label decisions match PyTorch" in str(refused.exception)
        assert not (tmp_path / "strict").exists()


def test_each_predicted_label_is_explained_by_the_bundle_and_the_run(multilabel_bundle: Path, multilabel_run: Path, images: list[Path]) -> None:
    from pixelmill.explain.images import explain_images

    bundle = read_bundle(multilabel_bundle)
    assert bundle.meta["explain"]["available"] and bundle.meta["explain"]["max_abs_diff"] <= 1e-3
    onnx = explain_images(Predictor.load(multilabel_bundle).classifier, [str(p) for p in images])
    eager = explain_images(Predictor.load(multilabel_run).classifier, [str(p) for p in images])
    for a, b in zip(onnx, eager):
        decided = a.prediction.labels or [a.prediction.label]  # no label reached its threshold: the most probable one
        assert [e.label for e in a.explanations] == decided == [e.label for e in b.explanations]
        for x, y in zip(a.explanations, b.explanations):
            assert x.heatmap.shape == (32, 32) and float(np.abs(x.heatmap - y.heatmap).max()) <= 1e-3


def test_served_explain_answers_a_heatmap_per_predicted_label(server, multilabel_bundle: Path, images: list[Path]) -> None:
    """The real server: label sets and thresholds as /predict answers them, one heatmap per decided label, per-file errors."""
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images[:4]]
    files.insert(1, ("files", ("broken.png", b"\x89PNG not really", "image/png")))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        predicted = http.post("/predict", files=[f for f in files if f[1][0] != "broken.png"]).json()["predictions"]
        answer = http.post("/explain", params={"output": "grid", "cells": 8}, files=files)
    assert answer.status_code == 200, answer.text
    explained = answer.json()["predictions"]
    assert explained[1]["file"] == "broken.png" and "error" in explained[1]
    for want, got in zip(predicted, [e for e in explained if "error" not in e]):
        assert got["labels"] == want["labels"] and got["thresholds"] == want["thresholds"]
        assert [e["label"] for e in got["explanations"]] == (want["labels"] or [want["label"]])
        assert all(np.array(e["grid"]).shape == (8, 8) for e in got["explanations"])
