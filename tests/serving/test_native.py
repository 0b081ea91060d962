"""The native API on a real uvicorn process: /predict agrees with `pixelmill predict`, /model, docs, logs."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from pixelmill.export.bundle import read_bundle
from pixelmill.tasks.image_classification.runtime import OnnxClassifier


def _multipart(files: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{f.parent.name}-{f.name}", f.read_bytes(), "image/png")) for f in files]


def test_predict_multipart_equals_onnx_classifier_and_pixelmill_predict(
    client: httpx.Client, bundle_dir: Path, digit_files: list[Path], tmp_path: Path
) -> None:
    served = []
    for chunk in (digit_files[:8], digit_files[8:]):  # the server takes at most 8 files per request
        response = client.post("/predict", files=_multipart(chunk), params={"top_k": 3})
        assert response.status_code == 200, response.text
        served += response.json()["predictions"]
    assert [p["file"] for p in served] == [f"{f.parent.name}-{f.name}" for f in digit_files]

    local = OnnxClassifier(read_bundle(bundle_dir)).predict([str(f) for f in digit_files], top_k=3)
    out = tmp_path / "preds.json"
    cmd = [sys.executable, "-m", "pixelmill.cli", "predict", str(bundle_dir), *map(str, digit_files), "--top-k", "3", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    cli = {Path(row["source"]).resolve(): row for row in json.loads(out.read_text())["predictions"]}

    for path, got, want in zip(digit_files, served, local):
        assert got["label"] == want.label == cli[path.resolve()]["label"]
        assert got["confidence"] == pytest.approx(want.confidence, abs=1e-5)
        assert [t["label"] for t in got["top_k"]] == [k for k, _ in want.top_k]
        assert len(got["top_k"]) == 3 and len(got["probabilities"]) == 10
        for name, p in want.probabilities.items():
            assert got["probabilities"][name] == pytest.approx(p, abs=1e-5)
            assert cli[path.resolve()]["probabilities"][name] == pytest.approx(p, abs=1e-5)


def test_predict_json_base64_equals_multipart(client: httpx.Client, digit_files: list[Path]) -> None:
    files = digit_files[:3]
    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
    instances = [encoded[0], {"b64": encoded[1]}, f"data:image/png;base64,{encoded[2]}"]
    as_json = client.post("/predict", json={"instances": instances})
    as_files = client.post("/predict", files=_multipart(files))
    assert as_json.status_code == as_files.status_code == 200, as_json.text
    got = as_json.json()["predictions"]
    assert [p["file"] for p in got] == ["instances[0]", "instances[1]", "instances[2]"]
    for a, b in zip(got, as_files.json()["predictions"]):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)


def test_model_describes_the_bundle(client: httpx.Client, bundle_dir: Path) -> None:
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    info = client.get("/model").json()
    assert info["name"] == meta["name"] and info["version"] == "1"
    assert info["classes"] == meta["classes"]
    assert info["input_size"] == [32, 32, 1]
    assert info["input"]["dtype"] == "uint8" and info["input"]["layout"] == "NHWC"
    assert info["sha256"] == meta["files"][meta["model_file"]]
    assert "eval" in info["metrics"]


def test_openapi_docs_are_served(client: httpx.Client) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/model", "/v2/models/{name}/infer", "/v2/health/ready", "/metrics"} <= set(paths)
    assert set(paths["/predict"]["post"]["requestBody"]["content"]) == {"multipart/form-data", "application/json"}


def test_request_id_is_echoed_or_generated(client: httpx.Client) -> None:
    echoed = client.get("/v2/health/ready", headers={"X-Request-ID": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"
    generated = client.get("/v2/health/ready", headers={"X-Request-ID": "bad id\twith junk"})
    assert len(generated.headers["x-request-id"]) == 32 and generated.headers["x-request-id"] != "bad id\twith junk"
    assert client.get("/nope").headers["x-request-id"]  # errors carry one too


def test_access_log_is_json_with_request_id_and_no_image_data(client: httpx.Client, server, digit_files: list[Path]) -> None:
    payload = base64.b64encode(digit_files[0].read_bytes()).decode()
    response = client.post("/predict", json={"instances": [payload]}, headers={"X-Request-ID": "log-check-1"})
    assert response.status_code == 200
    client.post("/predict", content=b"nope", headers={"Content-Type": "text/plain", "X-Request-ID": "log-check-2"})
    ids = {"log-check-1", "log-check-2"}
    logged = server.wait_for_log(lambda rs: ids <= {r.get("request_id") for r in rs if r.get("logger") == "pixelmill.serving.access"})
    records = {r.get("request_id"): r for r in logged if r.get("logger") == "pixelmill.serving.access"}
    ok, rejected = records["log-check-1"], records["log-check-2"]
    assert (ok["status"], ok["outcome"], ok["route"], ok["images"]) == (200, "ok", "/predict", 1)
    assert (rejected["status"], rejected["outcome"]) == (415, "rejected")
    assert ok["latency_ms"] > 0 and ok["method"] == "POST"
    log_text = server.log_path.read_text()
    assert payload[:40] not in log_text and payload[-40:] not in log_text


def test_uploads_of_any_mode_and_size_are_prepared_like_evaluation(
    client: httpx.Client, bundle_dir: Path, digit_files: list[Path], tmp_path: Path
) -> None:
    from PIL import Image

    rgb = tmp_path / "big-rgb.jpg"
    Image.open(digit_files[0]).convert("RGB").resize((96, 80)).save(rgb, quality=95)
    response = client.post("/predict", files=[("files", ("big-rgb.jpg", rgb.read_bytes(), "image/jpeg"))])
    assert response.status_code == 200, response.text
    want = OnnxClassifier(read_bundle(bundle_dir)).predict([str(rgb)], top_k=1)[0]
    got = response.json()["predictions"][0]
    assert got["label"] == want.label
    assert got["confidence"] == pytest.approx(want.confidence, abs=1e-5)
    assert np.isclose(sum(got["probabilities"].values()), 1.0, atol=1e-4)
