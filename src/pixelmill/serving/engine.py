"""The model behind the routes: one ONNX Runtime session fed by a dynamic batcher.

Requests call :meth:`Engine.infer` with their own (n, H, W, C) uint8 images and await an
asyncio future. One coroutine gathers whatever arrived within ``max_delay_ms`` (up to
``max_batch_size`` images), runs it as one batch on a single worker thread, and hands each
request its rows back. The event loop never runs ONNX Runtime itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pixelmill.errors import BundleError
from pixelmill.export.bundle import Bundle, read_bundle
from pixelmill.serving.settings import ServeSettings
from pixelmill.serving.telemetry import ServingMetrics
from pixelmill.tasks import TASKS
from pixelmill.tasks.base import join_along_batch, split_along_batch

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue holds ``max_queue`` images already; the caller should answer 503."""


class EngineStopped(Exception):
    """The engine is shutting down or has not started; the caller should answer 503."""


@dataclass
class _Job:
    images: np.ndarray  # one request's inputs: (n, H, W, C) uint8 images, (n,) table rows, ...
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Coalesces concurrent ``submit`` calls into batches for a blocking ``run`` function."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
        max_queue: int = 2048,
        metrics: ServingMetrics | None = None,
        join: Callable[[Sequence[np.ndarray]], np.ndarray] | None = None,
        split: Callable[[Any, Sequence[int]], list[Any]] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._run = run
        # How requests' inputs become one batch and its outputs go back: the task's (default: along axis 0).
        self._join = join or join_along_batch
        self._split = split or split_along_batch
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: deque[_Job] = deque()
        self._pending_images = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One thread: ORT parallelises inside a batch with its own intra-op threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixelmill-ort")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the batching coroutine on the running loop."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="pixelmill-batcher")

    async def stop(self) -> None:
        """Stop batching, fail whatever still waits, release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(EngineStopped("the server is shutting down"))
        self._pending_images = 0
        self._executor.shutdown(wait=True)

    async def run_now(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch on the worker thread, bypassing the queue (used to warm the session up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, batch)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W, C) uint8 -> (n, num_classes) float32, batched with other concurrent calls."""
        if not self.running:
            raise EngineStopped("the model is not ready")
        n = len(images)
        if self._pending_images + n > self.max_queue:
            raise Overloaded(f"{self._pending_images} images are waiting for inference; try again shortly")
        loop = asyncio.get_running_loop()
        # Requests larger than a batch are split so no ORT call exceeds max_batch_size.
        jobs = [_Job(images[i : i + self.max_batch_size], loop.create_future()) for i in range(0, n, self.max_batch_size)]
        for job in jobs:
            self._pending.append(job)
            self._pending_images += len(job.images)
        self._set_queue_gauge()
        self._wakeup.set()
        try:
            parts = [await job.future for job in jobs]
        except asyncio.CancelledError:  # the client went away: do not run its images
            for job in jobs:
                job.future.cancel()
            raise
        return self._join(parts)

    def _set_queue_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._pending_images)

    async def _next_batch(self) -> list[_Job]:
        """Wait for a job, then for more until the oldest has waited ``max_delay``; pop at most ``max_batch_size`` images.

        The delay counts from the oldest job's arrival, so requests that queued up while the
        previous batch ran start at once instead of waiting again.
        """
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._pending[0].enqueued + self.max_delay
        while self._pending_images < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        jobs: list[_Job] = []
        rows = 0
        while self._pending and (not jobs or rows + len(self._pending[0].images) <= self.max_batch_size):
            job = self._pending.popleft()
            self._pending_images -= len(job.images)
            if job.future.done():  # cancelled while waiting
                continue
            jobs.append(job)
            rows += len(job.images)
        self._set_queue_gauge()
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_batch()
            if not jobs:
                continue
            start = time.perf_counter()
            batch = self._join([job.images for job in jobs])  # (B, ...)
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, batch)  # (B, ...)
            except Exception as exc:  # a model failure is the server's fault: every waiter gets it
                log.exception("inference failed on a batch of %d images", len(batch))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self._observe(jobs, start, time.perf_counter(), len(batch))
            for job, part in zip(jobs, self._split(outputs, [len(job.images) for job in jobs])):
                if not job.future.done():
                    job.future.set_result(part)

    def _observe(self, jobs: list[_Job], start: float, end: float, size: int) -> None:
        if self.metrics is None:
            return
        for job in jobs:
            self.metrics.queue_latency.observe(start - job.enqueued)
        self.metrics.inference_latency.observe(end - start)
        self.metrics.batch_size.observe(size)
        self.metrics.images.inc(size)


def resolve_bundle_path(model: str, tracking_uri: str | None = None) -> Path:
    """A bundle directory, a run directory (its bundle/) or a ``models:/`` URI -> a local bundle directory."""
    from pixelmill.model_registry import resolve_model  # mlflow itself is imported only for models:/ URIs

    return Path(resolve_model(model, tracking_uri=tracking_uri))


def load_bundle(model: str, tracking_uri: str | None = None) -> Bundle:
    """Resolve, read and verify a bundle; refuse one this server cannot run (BundleError)."""
    bundle = read_bundle(resolve_bundle_path(model, tracking_uri), verify=True)
    if bundle.kind not in TASKS:
        raise BundleError(f"bundle {bundle.path} is a {bundle.kind} model; `pixelmill serve` serves bundles of kind {', '.join(TASKS)}")
    if bundle.model_format != "onnx":
        raise BundleError(f"bundle {bundle.path} holds a {bundle.model_format} model; serve an ONNX export (`pixelmill export RUN_DIR`)")
    return bundle


class Engine:
    """A verified bundle, its task's ONNX Runtime model and the batcher in front of it."""

    def __init__(self, bundle: Bundle, classifier: Any, batcher: DynamicBatcher, version: str = "1") -> None:
        self.bundle = bundle
        self.task = TASKS[bundle.kind]
        self.codec = self.task.serving()  # how the routes read requests and write answers for this task
        self.classifier = classifier
        self.batcher = batcher
        self.version = version
        self.input_shape: tuple[int, ...] = classifier.input_shape  # one input: (H, W, C) of an image, columns of a row

    @classmethod
    def from_settings(cls, settings: ServeSettings, metrics: ServingMetrics | None = None) -> Engine:
        """Read and verify the bundle, open the ORT session. Raises BundleError on a bad bundle."""
        bundle = load_bundle(settings.model, settings.tracking_uri)
        task = TASKS[bundle.kind]
        classifier = task.runtime(bundle, intra_op_threads=settings.ort_intra_threads, inter_op_threads=settings.inter_op_threads)
        batcher = DynamicBatcher(
            classifier.run, settings.max_batch_size, settings.max_delay_ms, settings.max_queue, metrics,
            join=task.join_inputs, split=task.split_outputs,
        )
        return cls(bundle, classifier, batcher, settings.model_version)

    @property
    def ready(self) -> bool:
        return self.batcher.running

    @property
    def classes(self) -> list[str]:
        return self.classifier.classes

    async def start(self) -> None:
        """Warm the session up (first-call allocations) and start batching."""
        await self.batcher.run_now(self.classifier.warmup_batch())
        await self.batcher.start()
        log.info("serving %s (%d classes, input %s) from %s", self.bundle.name, len(self.classes), self.input_shape, self.bundle.path)

    async def stop(self) -> None:
        await self.batcher.stop()

    async def infer(self, inputs: np.ndarray) -> np.ndarray:
        """One request's inputs ((n, H, W, C) uint8 images, (n,) table rows) -> its (n, ...) outputs, batched with others."""
        return await self.batcher.submit(inputs)
