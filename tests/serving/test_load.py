"""A bounded concurrent load on a real uvicorn process: zero errors, and requests are batched together."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

CLIENTS = 32
SECONDS = 10.0


def _batch_histogram(url: str) -> tuple[float, float]:
    """(batches in total, batches of exactly one image) from /metrics."""
    total = single = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.labels.get("batcher") != "predict":  # /predict and v2 (not /explain's batcher)
                continue
            if s.name == "pixelmill_batch_size_count":
                total = s.value
            elif s.name == "pixelmill_batch_size_bucket" and s.labels["le"] == "1.0":
                single = s.value
    return total, single


@pytest.mark.slow
def test_concurrent_clients_get_no_errors_and_share_batches(server, digit_files: list[Path], bundle_name: str) -> None:
    png = digit_files[0].read_bytes()
    pixels = bytes(32 * 32)
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 32, 32, 1], "datatype": "UINT8", "parameters": {"binary_data_size": 1024}}]}).encode()
    statuses: Counter = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS
    batches_before, singles_before = _batch_histogram(server.url)

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while time.monotonic() < deadline:
                try:
                    if i % 4 == 3:  # a quarter of the clients speak v2 binary
                        r = http.post(f"/v2/models/{bundle_name}/infer", content=header + pixels, headers={"Inference-Header-Content-Length": str(len(header))})
                    else:
                        r = http.post("/predict", files=[("files", ("d.png", png, "image/png"))])
                    with lock:
                        statuses[r.status_code] += 1
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=SECONDS + 60)

    assert failures == []
    assert set(statuses) == {200}, statuses
    assert statuses[200] >= CLIENTS * 5
    batches, singles = _batch_histogram(server.url)
    assert batches - batches_before > 0
    assert (batches - batches_before) - (singles - singles_before) > 0, "no batch ever held more than one image"
    assert (batches - batches_before) < statuses[200]  # fewer ORT calls than requests
