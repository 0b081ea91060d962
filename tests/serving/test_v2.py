"""Open Inference Protocol v2 on a real uvicorn process, driven by Triton's own HTTP client."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from pixelmill.export.bundle import read_bundle
from pixelmill.tasks.image_classification.runtime import OnnxClassifier

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def triton(server):
    client = tritonclient_http.InferenceServerClient(url=server.url.removeprefix("http://"), connection_timeout=30, network_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def onnx(bundle_dir: Path) -> OnnxClassifier:
    return OnnxClassifier(read_bundle(bundle_dir))


@pytest.fixture(scope="module")
def batch(onnx: OnnxClassifier, digit_files: list[Path]) -> np.ndarray:
    return np.stack([onnx.prepare(str(f)) for f in digit_files[:6]])  # (6, 32, 32, 1) uint8


def _infer(triton, name: str, batch: np.ndarray, binary_in: bool, binary_out: bool | None, **kwargs):
    tensor = tritonclient_http.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary_in)
    outputs = None if binary_out is None else [tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary_out)]
    return triton.infer(name, [tensor], outputs=outputs, **kwargs)


def test_health_and_metadata_through_tritonclient(triton, bundle_name: str) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(bundle_name)
    assert triton.get_server_metadata()["name"] == "pixelmill"
    meta = triton.get_model_metadata(bundle_name)
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 32, 32, 1]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert triton.get_model_config(bundle_name)["input"][0]["dims"] == [32, 32, 1]
    assert not triton.is_model_ready("no-such-model")


@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, True), (True, False), (False, True), (True, None)])
def test_infer_round_trip_equals_onnx_runtime(triton, onnx, batch, bundle_name: str, binary_in: bool, binary_out) -> None:
    result = _infer(triton, bundle_name, batch, binary_in, binary_out, request_id="req-7")
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (6, 10)
    np.testing.assert_allclose(probs, onnx.run(batch), atol=1e-5)
    response = result.get_response()
    assert response["model_name"] == bundle_name and response["id"] == "req-7"


def test_infer_with_explicit_version_and_classification(triton, onnx, batch, bundle_name: str) -> None:
    tensor = tritonclient_http.InferInput("image", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    top3 = tritonclient_http.InferRequestedOutput("probabilities", class_count=3)
    result = triton.infer(bundle_name, [tensor], model_version="1", outputs=[top3])
    labels = result.as_numpy("probabilities")  # (6, 3) of b"score:index:label"
    assert labels.shape == (6, 3)
    expected = onnx.run(batch).argmax(1)
    assert [int(row[0].decode().split(":")[1]) for row in labels] == expected.tolist()
    with pytest.raises(InferenceServerException, match="no version"):
        _infer(triton, bundle_name, batch, True, True, model_version="7")


def test_tritonclient_sees_server_errors(triton, batch, bundle_name: str) -> None:
    with pytest.raises(InferenceServerException, match="unknown model"):
        _infer(triton, "no-such-model", batch, True, True)
    wrong = tritonclient_http.InferInput("image", [1, 8, 8, 1], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 8, 8, 1), np.uint8))
    with pytest.raises(InferenceServerException, match="shape"):
        triton.infer(bundle_name, [wrong])
    floats = tritonclient_http.InferInput("image", [1, 32, 32, 1], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 32, 32, 1), np.float32))
    with pytest.raises(InferenceServerException, match="UINT8"):
        triton.infer(bundle_name, [floats])


def _tensor(shape=(1, 32, 32, 1), **extra) -> dict:
    return {"name": "image", "shape": list(shape), "datatype": "UINT8", "data": [0] * int(np.prod(shape)), **extra}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b'{"inputs": [', 400, "malformed JSON"),
        (b"[1, 2, 3]", 400, "invalid inference request"),
        (b'{"inputs": "image"}', 400, "invalid inference request"),
        (json.dumps({"inputs": []}).encode(), 400, "exactly one input"),
        (json.dumps({"inputs": [_tensor(name="pixels")]}).encode(), 400, "unknown input"),
        (json.dumps({"inputs": [_tensor(), _tensor()]}).encode(), 400, "exactly one input"),
        (json.dumps({"inputs": [{**_tensor(), "data": [300] * 1024}]}).encode(), 400, "[0, 255]"),
        (json.dumps({"inputs": [{**_tensor(), "data": [0.5] * 1024}]}).encode(), 400, "integers"),
        (json.dumps({"inputs": [{**_tensor(), "data": [[0, 1], [2]]}]}).encode(), 400, "rectangular"),
        (json.dumps({"inputs": [{**_tensor(), "data": [0] * 10}]}).encode(), 400, "values"),
        (json.dumps({"inputs": [{**_tensor(), "data": None}]}).encode(), 400, "neither"),
        (json.dumps({"inputs": [_tensor((0, 32, 32, 1))]}).encode(), 400, "at least 1"),
        (json.dumps({"inputs": [_tensor((65, 32, 32, 1))]}).encode(), 413, "limit is 64"),
        (json.dumps({"inputs": [{**_tensor(), "shape": [1, 32, 32]}]}).encode(), 400, "shape"),
        (json.dumps({"inputs": [_tensor()], "outputs": [{"name": "logits"}]}).encode(), 400, "unknown output"),
        (json.dumps({"inputs": [_tensor()], "outputs": [{"name": "probabilities", "parameters": {"classification": -1}}]}).encode(), 400, "classification"),
        (json.dumps({"inputs": [_tensor()], "parameters": {"binary_data_output": "yes"}}).encode(), 400, "true or false"),
    ],
)
def test_malformed_v2_requests_are_4xx_with_an_error(client: httpx.Client, bundle_name: str, body: bytes, status: int, needle: str) -> None:
    response = client.post(f"/v2/models/{bundle_name}/infer", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]


def test_binary_extension_errors(client: httpx.Client, bundle_name: str) -> None:
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 32, 32, 1], "datatype": "UINT8", "parameters": {"binary_data_size": 1024}}]}).encode()
    url = f"/v2/models/{bundle_name}/infer"

    def post(body: bytes, length: str, **headers: str) -> httpx.Response:
        return client.post(url, content=body, headers={"Inference-Header-Content-Length": length, **headers})

    ok = post(header + bytes(1024), str(len(header)))
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    short = post(header + bytes(1000), str(len(header)))
    assert short.status_code == 400 and "1000 binary bytes" in short.json()["error"]
    assert post(header + bytes(1024), "nope").status_code == 400
    assert post(header + bytes(1024), str(10**9)).status_code == 400
    assert post(header + bytes(1024), "5").status_code == 400  # the header is cut: malformed JSON
    gz = post(gzip.compress(header + bytes(1024)), str(len(header)), **{"Content-Encoding": "gzip"})
    assert gz.status_code == 415 and "Content-Encoding" in gz.json()["error"]


def test_binary_output_layout_is_triton_compatible(client: httpx.Client, bundle_name: str, onnx, batch) -> None:
    header = json.dumps(
        {
            "inputs": [{"name": "image", "shape": list(batch.shape), "datatype": "UINT8", "parameters": {"binary_data_size": batch.nbytes}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    response = client.post(f"/v2/models/{bundle_name}/infer", content=header + batch.tobytes(), headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200
    n = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:n])
    out = meta["outputs"][0]
    assert out["parameters"]["binary_data_size"] == batch.shape[0] * 10 * 4 and "data" not in out
    probs = np.frombuffer(response.content[n:], dtype="<f4").reshape(out["shape"])
    np.testing.assert_allclose(probs, onnx.run(batch), atol=1e-5)


def test_health_routes(client: httpx.Client, bundle_name: str) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json()["ready"] is True
    assert client.get(f"/v2/models/{bundle_name}/ready").status_code == 200
    assert client.get("/v2/models/other/ready").status_code == 404
    assert client.get(f"/v2/models/{bundle_name}/versions/2").status_code == 404
    assert client.get("/v2").json()["extensions"][0] == "binary_tensor_data"
