"""Prometheus collectors of one app, in the app's own ``CollectorRegistry``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServingMetrics:
    """Requests by route and status, latencies (queue, inference, total), batch sizes by batcher, in-flight, model info."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pixelmill_http_requests", "HTTP requests by route template, method and status.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "pixelmill_http_request_duration_seconds", "Total request latency.", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("pixelmill_http_requests_in_flight", "Requests being handled now.", registry=r)
        # The batcher metrics carry the model and version, and which batcher ran: "predict" (/predict and v2) or
        # "explain" (/explain, whose ONNX Runtime calls also compute class activation maps and so take longer).
        per_batcher = ["model", "version", "batcher"]
        self.queue_latency = Histogram(
            "pixelmill_queue_duration_seconds", "Time a request waited for its batch to start.", per_batcher, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inference_latency = Histogram(
            "pixelmill_inference_duration_seconds", "ONNX Runtime time of one batch.", per_batcher, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("pixelmill_batch_size", "Images per ONNX Runtime call.", per_batcher, buckets=_BATCH_BUCKETS, registry=r)
        self.images = Counter("pixelmill_images", "Images classified (and explained, for the explain batcher).", per_batcher, registry=r)
        self.queue_depth = Gauge("pixelmill_queue_images", "Images waiting for inference.", per_batcher, registry=r)
        self.model_info = Info("pixelmill_model", "Every served model version.", ["model", "version"], registry=r)
        self.model_requests = Counter(
            "pixelmill_model_requests", "Requests answered per model and version; role: served, or shadow (a copy, compared only).",
            ["model", "version", "role"], registry=r,
        )
        self.shadow = Counter(
            "pixelmill_shadow_answers", "Shadow answers per model and shadow version: agree or disagree with the served top-1, or error.",
            ["model", "version", "outcome"], registry=r,
        )
        self._per_version = (self.queue_latency, self.inference_latency, self.batch_size, self.images, self.queue_depth)

    def forget(self, model: str, version: str) -> None:
        """Drop the batcher series and info of a version that left the server (its request counters stay)."""
        for collector in self._per_version:
            for batcher in ("predict", "explain"):
                try:
                    collector.remove(model, version, batcher)
                except KeyError:
                    pass
        try:
            self.model_info.remove(model, version)
        except KeyError:
            pass
