"""The dynamic batcher, the token buckets and the settings, in-process (no server, no model)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from pixelmill.errors import ConfigError
from pixelmill.serving.engine import DynamicBatcher, Overloaded
from pixelmill.serving.middleware import TokenBuckets
from pixelmill.serving.settings import ServeSettings, available_cpus, load_settings, settings_env


def _recording_run(sizes: list[int], delay: float = 0.0):
    """A fake model: row i's output is [mean pixel of image i]; records each batch size."""

    def run(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        time.sleep(delay)
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)

    return run


def _images(values: list[int]) -> np.ndarray:
    return np.stack([np.full((4, 4, 1), v, np.uint8) for v in values])  # (n, 4, 4, 1)


def test_concurrent_requests_share_one_batch_and_get_their_own_rows() -> None:
    sizes: list[int] = []

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(_recording_run(sizes), max_batch_size=32, max_delay_ms=200)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(_images([v])) for v in range(10)))
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert sizes == [10]
    assert [float(r[0, 0]) for r in results] == [float(v) for v in range(10)]


def test_a_request_larger_than_a_batch_is_split_and_reassembled_in_order() -> None:
    sizes: list[int] = []

    async def main() -> np.ndarray:
        batcher = DynamicBatcher(_recording_run(sizes), max_batch_size=32, max_delay_ms=1)
        await batcher.start()
        try:
            return await batcher.submit(_images(list(range(70))))
        finally:
            await batcher.stop()

    out = asyncio.run(main())
    assert max(sizes) <= 32 and sum(sizes) == 70
    assert out[:, 0].tolist() == [float(v) for v in range(70)]


def test_a_full_queue_is_refused_instead_of_growing() -> None:
    running, release = threading.Event(), threading.Event()

    def slow_run(batch: np.ndarray) -> np.ndarray:
        running.set()
        release.wait(5)
        return np.zeros((len(batch), 1), np.float32)

    async def main() -> None:
        batcher = DynamicBatcher(slow_run, max_batch_size=2, max_delay_ms=0, max_queue=4)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(_images([1, 2])))
            while not running.is_set():  # wait until the first batch runs and blocks the worker
                await asyncio.sleep(0.005)
            waiting = asyncio.ensure_future(batcher.submit(_images([3, 4, 5, 6])))
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded):
                await batcher.submit(_images([7]))
            release.set()
            await asyncio.gather(first, waiting)
        finally:
            release.set()
            await batcher.stop()

    asyncio.run(main())


def test_token_bucket_allows_a_burst_then_paces_each_client() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.take("a", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", now=100.0) == pytest.approx(0.5)
    assert buckets.take("b", now=100.0) == 0.0  # another client has its own bucket
    assert buckets.take("a", now=101.0) == 0.0  # refilled at 2 tokens/s


def test_settings_come_from_pixelmill_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXELMILL_MODEL", "some/bundle")
    monkeypatch.setenv("PIXELMILL_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("PIXELMILL_API_TOKEN", "tok")
    settings = ServeSettings()
    assert (settings.model, settings.max_batch_size, settings.api_token.get_secret_value()) == ("some/bundle", 8, "tok")
    assert load_settings(max_batch_size=4).max_batch_size == 4  # flags win over variables
    env = settings_env(settings)
    assert env["PIXELMILL_API_TOKEN"] == "tok" and env["PIXELMILL_MAX_BATCH_SIZE"] == "8"


def test_ort_threads_default_to_cpus_per_worker() -> None:
    assert ServeSettings(model="m").ort_intra_threads == available_cpus()
    assert ServeSettings(model="m", workers=available_cpus() * 2).ort_intra_threads == 1
    assert ServeSettings(model="m", intra_op_threads=3).ort_intra_threads == 3


def test_a_bad_setting_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXELMILL_MAX_BATCH_SIZE", "lots")
    with pytest.raises(ConfigError, match="PIXELMILL_MAX_BATCH_SIZE"):
        load_settings(model="m")
