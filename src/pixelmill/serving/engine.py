"""The model behind the routes: one ONNX Runtime session fed by dynamic batchers.

Requests call :meth:`Engine.infer` with their own (n, H, W, C) uint8 images and await an
asyncio future. One coroutine gathers whatever arrived within ``max_delay_ms`` (up to
``max_batch_size`` images), runs it as one batch on a single worker thread, and hands each
request its rows back. The event loop never runs ONNX Runtime itself. An explainable model
has a second batcher for :meth:`Engine.explain` (probabilities and class activation maps in
one call), so explanations never share a batch, or its latency, with plain predictions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import anyio
import numpy as np

from pixelmill.errors import BundleError
from pixelmill.explain.heatmaps import heatmap_png
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
        join_outputs: Callable[[Sequence[Any]], Any] | None = None,
        name: str = "predict",
        executor: ThreadPoolExecutor | None = None,
        labels: tuple[str, str] = ("model", "1"),
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._run = run
        # How requests' inputs become one batch and its outputs go back: the task's (default: along axis 0).
        self._join = join or join_along_batch
        self._split = split or split_along_batch
        # How the outputs of a request larger than one batch are put back together (default: as the inputs are).
        self._join_outputs = join_outputs or self._join
        self.name = name  # the "batcher" label of its metrics
        self.labels = (*labels, name)  # model, version, batcher: the labels of its metrics
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        if metrics is not None:  # every series exists from the start, at zero
            for collector in (metrics.queue_latency, metrics.inference_latency, metrics.batch_size, metrics.images, metrics.queue_depth):
                collector.labels(*self.labels)
        self._pending: deque[_Job] = deque()
        self._pending_images = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One thread: ORT parallelises inside a batch with its own intra-op threads. A batcher given
        # another's executor shares its thread, so two batchers of one session never run at once.
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixelmill-ort")

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The thread its ONNX Runtime calls run on."""
        return self._executor

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the batching coroutine on the running loop."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=f"pixelmill-{self.name}-batcher")

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
        if self._owns_executor:
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
        return self._join_outputs(parts)

    def _set_queue_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(*self.labels).set(self._pending_images)

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
            self.metrics.queue_latency.labels(*self.labels).observe(start - job.enqueued)
        self.metrics.inference_latency.labels(*self.labels).observe(end - start)
        self.metrics.batch_size.labels(*self.labels).observe(size)
        self.metrics.images.labels(*self.labels).inc(size)


def split_pairs(outputs: tuple[np.ndarray, np.ndarray], sizes: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """((B, ...), (B, ...)) -> per job the pair of its rows: how the explain batcher hands back probabilities and maps."""
    firsts, seconds = (split_along_batch(part, sizes) for part in outputs)
    return list(zip(firsts, seconds))


def join_pairs(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of a request's jobs -> one pair of (n, ...) arrays."""
    firsts, seconds = zip(*parts)
    return join_along_batch(firsts), join_along_batch(seconds)


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
    """One served version: a verified bundle, its task's ONNX Runtime model and the batchers in front of it (predict; explain when the graph can)."""

    def __init__(
        self, bundle: Bundle, classifier: Any, batcher: DynamicBatcher, version: str = "1", explainer: DynamicBatcher | None = None, name: str | None = None
    ) -> None:
        self.bundle = bundle
        self.name = name or bundle.name  # the name it is served under (the bundle's unless the server was told another)
        self.task = TASKS[bundle.kind]
        self.codec = self.task.serving()  # how the routes read requests and write answers for this task
        self.classifier = classifier
        self.batcher = batcher
        self.explainer = explainer  # the /explain batcher: None unless the bundle's graph has the class activation maps
        self.version = version
        self.digest = bundle.info.files.get(bundle.info.model_file, "")  # the model file's sha256: a reload with the same one keeps this engine
        self.input_shape: tuple[int, ...] = classifier.input_shape  # one input: (H, W, C) of an image, columns of a row
        self.providers: list[str] = list(getattr(classifier, "providers", None) or ["CPUExecutionProvider"])
        self.intra_threads = 0  # ONNX Runtime intra-op threads (0: its default)
        self._active = 0  # requests holding a lease
        self._idle: asyncio.Event | None = None

    @classmethod
    def from_bundle(cls, bundle: Bundle, name: str, version: str, settings: ServeSettings, metrics: ServingMetrics | None = None) -> Engine:
        """Open the ORT session of a verified bundle and put the batchers in front of it (not started yet)."""
        task = TASKS[bundle.kind]
        classifier = task.runtime(
            bundle, intra_op_threads=settings.ort_intra_threads, inter_op_threads=settings.inter_op_threads, providers=settings.provider_list
        )
        labels = (name, version)
        batcher = DynamicBatcher(
            classifier.run, settings.max_batch_size, settings.max_delay_ms, settings.max_queue, metrics,
            join=task.join_inputs, split=task.split_outputs, labels=labels,
        )
        explainer = None
        if getattr(classifier, "explainable", False) and hasattr(task.serving(), "explain_response"):
            explainer = DynamicBatcher(
                classifier.run_with_cams, settings.max_batch_size, settings.max_delay_ms, settings.max_queue, metrics,
                join=task.join_inputs, split=split_pairs, join_outputs=join_pairs, name="explain", executor=batcher.executor, labels=labels,
            )
        engine = cls(bundle, classifier, batcher, version, explainer, name)
        engine.intra_threads = settings.ort_intra_threads
        return engine

    @contextmanager
    def lease(self) -> Iterator[Engine]:
        """Hold the engine for one request: :meth:`drain` waits until every lease is returned."""
        self._active += 1
        try:
            yield self
        finally:
            self._active -= 1
            if self._active == 0 and self._idle is not None:
                self._idle.set()

    async def drain(self) -> None:
        """Wait until the requests that hold this engine are answered (no new ones reach it once it left the repository)."""
        while self._active:
            self._idle = asyncio.Event()
            await self._idle.wait()

    @property
    def ready(self) -> bool:
        return self.batcher.running

    @property
    def classes(self) -> list[str]:
        return self.classifier.classes

    @property
    def unexplainable(self) -> str | None:
        """Why ``/explain`` cannot answer for this model (bundle.json's reason), or None when it can."""
        if self.explainer is not None:
            return None
        if not hasattr(self.classifier, "check_explainable"):
            reason = f"a {self.task.title} model has no class activation maps"
        else:
            reason = (self.bundle.meta.get("explain") or {}).get("reason", "it was exported before explanations existed")
        return f"model '{self.name}' has no explanations: {reason}"

    async def start(self) -> None:
        """Warm the session up (first-call allocations) and start batching."""
        await self.batcher.run_now(self.classifier.warmup_batch())
        await self.batcher.start()
        if self.explainer is not None:
            await self.explainer.run_now(self.classifier.warmup_batch())
            await anyio.to_thread.run_sync(heatmap_png, np.zeros((1, 1), np.float32))  # loads the colour map before the first /explain
            await self.explainer.start()
        if self.batcher.metrics is not None:
            self.batcher.metrics.model_info.labels(self.name, self.version).info(
                {
                    "name": self.bundle.name,
                    "model_name": str(self.bundle.meta.get("model_name", "")),
                    "classes": str(len(self.classes)),
                    "input_shape": "x".join(map(str, self.input_shape)),
                    "providers": ",".join(self.providers),
                    "ort_intra_threads": str(self.intra_threads),
                }
            )
        log.info("serving %s version %s (%d classes, input %s) from %s", self.name, self.version, len(self.classes), self.input_shape, self.bundle.path)

    async def stop(self) -> None:
        if self.explainer is not None:  # first: it runs on the predict batcher's thread, which stop() releases
            await self.explainer.stop()
        await self.batcher.stop()

    async def infer(self, inputs: np.ndarray) -> np.ndarray:
        """One request's inputs ((n, H, W, C) uint8 images, (n,) table rows) -> its (n, ...) outputs, batched with others."""
        return await self.batcher.submit(inputs)

    async def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, H, W, C) uint8 -> ((n, classes) probabilities, (n, classes, h, w) raw class activation maps), batched with other /explain requests."""
        if self.explainer is None:
            raise RuntimeError(f"explain called on an engine without the explain batcher ({self.unexplainable}); routes check `unexplainable` first")
        return await self.explainer.submit(images)
