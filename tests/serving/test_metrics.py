"""``GET /metrics``: Prometheus text with requests, latencies, batch sizes, in-flight and model info."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_metrics_count_requests_latencies_batches_and_model(client: httpx.Client, digit_files: list[Path], bundle_name: str) -> None:
    files = [("files", (f.name, f.read_bytes(), "image/png")) for f in digit_files[:4]]
    assert client.post("/predict", files=files).status_code == 200
    assert client.post("/predict", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)

    requests = {(s.labels["route"], s.labels["status"]): s.value for s in samples["pixelmill_http_requests_total"]}
    assert requests[("/predict", "200")] >= 1 and requests[("/predict", "415")] >= 1
    routes = {s.labels["route"] for s in samples["pixelmill_http_request_duration_seconds_count"]}
    assert "/predict" in routes and all("{" in r or "/" in r or r == "unmatched" for r in routes)
    predict = {name: next(s.value for s in found if s.labels.get("batcher") == "predict") for name, found in samples.items()
               if any(s.labels.get("batcher") == "predict" for s in found)}  # the /predict and v2 batcher's series
    for name in ("pixelmill_queue_duration_seconds_count", "pixelmill_inference_duration_seconds_count", "pixelmill_batch_size_count"):
        assert predict[name] >= 1, name
    assert predict["pixelmill_batch_size_sum"] >= 4  # the four images above went through the batcher
    assert predict["pixelmill_images_total"] >= 4
    assert samples["pixelmill_http_requests_in_flight"][0].value >= 1  # this very request
    info = samples["pixelmill_model_info"][0].labels
    assert info["name"] == bundle_name and info["input_shape"] == "32x32x1" and info["classes"] == "10"


def test_unknown_paths_do_not_explode_label_cardinality(client: httpx.Client) -> None:
    for i in range(5):
        client.get(f"/random/{i}")
    samples = _samples(client.get("/metrics").text)
    routes = {s.labels["route"] for s in samples["pixelmill_http_requests_total"]}
    assert not any(r.startswith("/random") for r in routes) and "unmatched" in routes
