"""``POST /explain`` on a real uvicorn process: heatmaps agree with the runtime, bad files are named, limits, auth and metrics hold."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pixelmill.explain.heatmaps import grid, overlay
from pixelmill.explain.images import targets_of
from pixelmill.export.bundle import read_bundle
from pixelmill.serving.engine import DynamicBatcher, join_pairs, split_pairs
from pixelmill.tasks.image_classification.runtime import OnnxClassifier

TOKEN = "explain-token-for-tests"


def _multipart(files: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{f.parent.name}-{f.name}", f.read_bytes(), "image/png")) for f in files]


def _runtime_heatmaps(bundle_dir: Path, files: list[Path], class_name: str | None = None) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """What `pixelmill explain BUNDLE` computes: (the model inputs, per image the explained class and its (H, W) heatmap)."""
    runtime = OnnxClassifier(read_bundle(bundle_dir))
    batch = np.stack([runtime.prepare(str(f)) for f in files])
    predictions = runtime.decode(runtime.run(batch), 5)
    wanted = [runtime.classes.index(class_name)] if class_name is not None else None
    targets = [wanted or targets_of(p, runtime.classes) for p in predictions]
    _, maps = runtime.explain(batch, targets)
    return batch, [(runtime.classes[t[0]], m[0]) for t, m in zip(targets, maps)]


def _png(entry: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(entry["heatmap_png"])))


def _samples(url: str, headers: dict[str, str] | None = None) -> list:
    text = httpx.get(f"{url}/metrics", headers=headers or {}).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def test_the_shared_bundle_has_the_explain_output(bundle_dir: Path, client: httpx.Client) -> None:
    explain = json.loads((bundle_dir / "bundle.json").read_text())["explain"]
    assert explain["available"] is True and explain["output"] == "cam"
    assert client.get("/model").json()["explain"]["available"] is True


def test_multipart_answers_predictions_and_pngs_over_the_input(client: httpx.Client, bundle_dir: Path, digit_files: list[Path]) -> None:
    files = digit_files[:4]
    response = client.post("/explain", files=_multipart(files), params={"top_k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    predicted = client.post("/predict", files=_multipart(files), params={"top_k": 3}).json()["predictions"]
    batch, expected = _runtime_heatmaps(bundle_dir, files)
    assert body["model"] and [p["file"] for p in body["predictions"]] == [p["file"] for p in predicted]
    for got, want, pixels, (label, heatmap) in zip(body["predictions"], predicted, batch, expected):
        assert got["label"] == want["label"] and len(got["top_k"]) == 3 and len(got["probabilities"]) == 10
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
        [explanation] = got["explanations"]  # single-label: the predicted class
        assert explanation["label"] == got["label"] == label and explanation["probability"] == pytest.approx(got["confidence"], abs=1e-6)
        assert set(explanation) == {"label", "probability", "heatmap_png"}
        picture = _png(explanation)
        assert picture.format == "PNG" and picture.size == (32, 32) and picture.mode == "RGB"
        # The same pixels `pixelmill explain` writes: the runtime's heatmap in colour over the model's input.
        want_picture = overlay(Image.fromarray(pixels[:, :, 0]), heatmap)
        assert np.abs(np.asarray(picture, np.int16) - np.asarray(want_picture, np.int16)).max() <= 2


def test_base64_json_equals_multipart(client: httpx.Client, digit_files: list[Path]) -> None:
    files = digit_files[4:7]
    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
    as_json = client.post("/explain", json={"instances": [encoded[0], {"b64": encoded[1]}, f"data:image/png;base64,{encoded[2]}"]})
    as_files = client.post("/explain", files=_multipart(files))
    assert as_json.status_code == as_files.status_code == 200, as_json.text
    got = as_json.json()["predictions"]
    assert [p["file"] for p in got] == ["instances[0]", "instances[1]", "instances[2]"]
    for a, b in zip(got, as_files.json()["predictions"]):
        assert a["label"] == b["label"] and a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
        assert np.array_equal(np.asarray(_png(a["explanations"][0])), np.asarray(_png(b["explanations"][0])))


@pytest.mark.parametrize("cells", [16, 7])
def test_grid_equals_the_runtime_heatmap_gridded(client: httpx.Client, bundle_dir: Path, digit_files: list[Path], cells: int) -> None:
    files = digit_files[:6]
    response = client.post("/explain", files=_multipart(files), params={"output": "grid", "cells": cells})
    assert response.status_code == 200, response.text
    _, expected = _runtime_heatmaps(bundle_dir, files)
    for got, (label, heatmap) in zip(response.json()["predictions"], expected):
        [explanation] = got["explanations"]
        assert set(explanation) == {"label", "probability", "grid"} and explanation["label"] == label
        served = np.array(explanation["grid"])
        assert served.shape == (cells, cells) and served.min() >= 0.0 and served.max() <= 1.0
        want = np.array(grid(heatmap, cells))
        assert np.abs(served - want).max() <= 1e-4
        # The hottest cell is where the runtime's heatmap is hottest.
        peak_row, peak_col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        edges = np.cumsum([0, *(len(part) for part in np.array_split(np.arange(32), cells))])
        peak_cell = (np.searchsorted(edges, peak_row, side="right") - 1, np.searchsorted(edges, peak_col, side="right") - 1)
        assert np.unravel_index(int(np.argmax(served)), served.shape) == np.unravel_index(int(np.argmax(want)), want.shape)
        assert served[peak_cell] >= served.max() - 0.15


def test_class_explains_that_class_for_every_image(client: httpx.Client, bundle_dir: Path, digit_files: list[Path]) -> None:
    files = digit_files[:3]
    response = client.post("/explain", files=_multipart(files), params={"class": "7", "output": "grid", "cells": 8})
    assert response.status_code == 200, response.text
    _, expected = _runtime_heatmaps(bundle_dir, files, class_name="7")
    for got, (_, heatmap) in zip(response.json()["predictions"], expected):
        [explanation] = got["explanations"]
        assert explanation["label"] == "7" and explanation["probability"] == pytest.approx(got["probabilities"]["7"], abs=1e-6)
        assert np.abs(np.array(explanation["grid"]) - np.array(grid(heatmap, 8))).max() <= 1e-4

    unknown = client.post("/explain", files=_multipart(files), params={"class": "giraffe"})
    assert unknown.status_code == 422
    assert "unknown class 'giraffe'" in unknown.json()["error"] and "the model's classes are" in unknown.json()["error"]


@pytest.mark.reliability("server: corrupt image among good ones on /explain named, the others answered")
def test_a_corrupt_image_gets_its_own_error_and_the_others_are_answered(client: httpx.Client, digit_files: list[Path]) -> None:
    good = digit_files[0].read_bytes()
    files = [
        ("files", ("good-1.png", good, "image/png")),
        ("files", ("truncated.png", good[: len(good) // 2], "image/png")),
        ("files", ("notes.txt", b"not an image", "text/plain")),
        ("files", ("good-2.png", digit_files[1].read_bytes(), "image/png")),
    ]
    response = client.post("/explain", files=files)
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    assert [a["file"] for a in answers] == ["good-1.png", "truncated.png", "notes.txt", "good-2.png"]
    assert set(answers[1]) == set(answers[2]) == {"file", "error"}
    assert "'truncated.png'" in answers[1]["error"] and "'notes.txt'" in answers[2]["error"]
    assert answers[0]["explanations"] and answers[3]["explanations"]
    single = client.post("/explain", files=files[:1]).json()["predictions"][0]
    assert answers[0]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)

    all_bad = client.post("/explain", files=files[1:3])
    assert all_bad.status_code == 422
    assert set(all_bad.json()) == {"error"} and "'truncated.png'" in all_bad.json()["error"] and "'notes.txt'" in all_bad.json()["error"]


def test_limits_and_bad_parameters_are_4xx(client: httpx.Client, digit_files: list[Path]) -> None:
    files = _multipart(digit_files[:1])
    for params in ({"cells": 0}, {"cells": 65}, {"output": "svg"}, {"top_k": 0}, {"threshold": 2}):
        response = client.post("/explain", files=files, params=params)
        assert response.status_code == 422 and "error" in response.json(), params
    too_fine = client.post("/explain", files=files, params={"output": "grid", "cells": 33})  # finer than the 32-pixel input
    assert too_fine.status_code == 422 and "at most 32" in too_fine.json()["error"]
    threshold = client.post("/explain", files=files, params={"threshold": 0.5})  # a 10-class model has no threshold
    assert threshold.status_code == 422 and "binary" in threshold.json()["error"]
    many = [("files", (f"{i}.png", digit_files[0].read_bytes(), "image/png")) for i in range(9)]
    assert client.post("/explain", files=many).status_code == 413  # PIXELMILL_MAX_FILES=8, as for /predict
    assert client.post("/explain", content=b"raw", headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.post("/explain", json={"instances": ["not base64!!"]}).status_code == 422


def _explain_series(samples: list) -> dict[str, float]:
    series = {}
    for s in samples:
        if s.name == "pixelmill_http_requests_total" and s.labels["route"] == "/explain" and s.labels["status"] == "200":
            series["requests"] = s.value
        elif s.name in ("pixelmill_batch_size_sum", "pixelmill_images_total") and s.labels.get("batcher") == "explain":
            series[s.name] = s.value
    return series


def test_metrics_count_explain_requests_and_its_batcher(server, client: httpx.Client, digit_files: list[Path]) -> None:
    before = _explain_series(_samples(server.url))
    assert client.post("/explain", files=_multipart(digit_files[:3])).status_code == 200
    deadline = time.monotonic() + 10  # the request is recorded once answered: wait for it, not for a fixed time
    while (after := _explain_series(_samples(server.url))).get("requests", 0) < before.get("requests", 0) + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after["requests"] >= before.get("requests", 0) + 1
    assert after["pixelmill_images_total"] >= before["pixelmill_images_total"] + 3
    assert after["pixelmill_batch_size_sum"] >= before["pixelmill_batch_size_sum"] + 3
    batchers = {s.labels["batcher"] for s in _samples(server.url) if s.name == "pixelmill_batch_size_count"}
    assert batchers == {"predict", "explain"}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_no_libtorch_in_the_server_after_explaining(server, client: httpx.Client, digit_files: list[Path]) -> None:
    for output in ("png", "grid"):
        assert client.post("/explain", files=_multipart(digit_files[:2]), params={"output": output}).status_code == 200
    mapped = Path(f"/proc/{server.proc.pid}/maps").read_text().splitlines()
    assert any("onnxruntime" in line for line in mapped)
    assert sorted({line.split()[-1] for line in mapped if "torch" in line.split()[-1]}) == []


def test_explain_needs_the_token_when_one_is_set(start_server, digit_files: list[Path]) -> None:
    with start_server(env={"PIXELMILL_API_TOKEN": TOKEN}) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        files = _multipart(digit_files[:1])
        refused = http.post("/explain", files=files)
        assert refused.status_code == 401 and refused.json() == {"error": "missing or invalid bearer token"}
        assert http.post("/explain", files=files, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/explain", files=files, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_a_bundle_without_the_explain_output_answers_409_with_its_reason(
    start_server, trained_run: Path, digit_files: list[Path], tmp_path: Path
) -> None:
    from pixelmill.export import export_run

    int8 = export_run(trained_run, quantize="int8", out=tmp_path / "int8", min_int8_agreement=0.5).path  # agreement is not what this tests
    reason = json.loads((int8 / "bundle.json").read_text())["explain"]
    assert reason["available"] is False and "int8" in reason["reason"]
    with start_server(model=str(int8)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        files = _multipart(digit_files[:2])
        response = http.post("/explain", files=files)
        assert response.status_code == 409 and set(response.json()) == {"error"}
        assert reason["reason"] in response.json()["error"]
        assert http.post("/explain", json={"instances": ["aGk="]}).status_code == 409  # before the body is even read
        assert http.post("/predict", files=files).status_code == 200  # predictions are unaffected
        assert http.get("/model").json()["explain"]["available"] is False
        batchers = {s.labels["batcher"] for s in _samples(srv.url) if s.name == "pixelmill_batch_size_count"}
        assert batchers == {"predict"}  # no explain batcher for this model


def test_the_explain_batcher_shares_batches_and_hands_back_each_request_its_pairs() -> None:
    """In-process: concurrent requests run as one ORT call; a request larger than a batch is split and its pairs re-joined."""
    sizes: list[int] = []

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (B, 2, 2, 1) -> ((B, 1) pixel value, (B, 1, 2, 2) maps of it)
        sizes.append(len(batch))
        values = batch[:, 0, 0, 0].astype(np.float32)
        return values[:, None], np.broadcast_to(values[:, None, None, None], (len(batch), 1, 2, 2)).copy()

    async def main() -> tuple[list, tuple[np.ndarray, np.ndarray]]:
        batcher = DynamicBatcher(run, max_batch_size=32, max_delay_ms=200, split=split_pairs, join_outputs=join_pairs, name="explain")
        await batcher.start()
        try:
            small = await asyncio.gather(*(batcher.submit(np.full((1, 2, 2, 1), v, np.uint8)) for v in range(10)))
            large = await batcher.submit(np.arange(70, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2))
            return small, large
        finally:
            await batcher.stop()

    small, (probs, cams) = asyncio.run(main())
    assert sizes[0] == 10 and sizes[1:] == [32, 32, 6]
    assert [(float(p[0, 0]), float(c[0, 0, 1, 1])) for p, c in small] == [(v, v) for v in range(10)]
    assert probs[:, 0].tolist() == list(range(70)) and cams.shape == (70, 1, 2, 2) and cams[:, 0, 0, 0].tolist() == list(range(70))
