"""LitServe serving a pixelmill bundle, the peer of ``pixelmill serve`` in ``serving.py``.

``python benchmarks/_litserve_peer.py BUNDLE PORT`` serves ``POST /predict`` on 127.0.0.1:PORT
(``GET /health`` answers 200 once the model is loaded) and does per request what
``pixelmill serve``'s ``/predict`` does: read the multipart upload (field ``files``), decode
and prepare it with pixelmill's own ``serving.images.decode_image`` (the same header checks,
``to_model_input``, the same pixels), run the batch on an ONNX Runtime CPU session opened as
the server opens it (``OnnxClassifier``, intra-op threads = the available CPUs shared out
over the inference workers, one inter-op thread) and answer the same JSON (``model``, ``version``, per image ``file``, ``label``,
``confidence``, ``top_k``, ``probabilities``). Batching as ``pixelmill serve``'s defaults: up to
32 images, 5 ms.

LitServe's own layout is kept: one API server process, its default queues, ``decode_request``
in the inference worker, as LitServe places it. ``python benchmarks/_litserve_peer.py BUNDLE
PORT WORKERS`` runs WORKERS inference workers (``workers_per_device``, default 1), each
session with the available CPUs shared out between them, as ``pixelmill serve --workers`` does.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np

MAX_BATCH_SIZE = 32  # pixelmill serve: PIXELMILL_MAX_BATCH_SIZE default
BATCH_TIMEOUT_S = 0.005  # pixelmill serve: PIXELMILL_MAX_DELAY_MS default (5 ms)
TOP_K = 5  # pixelmill serve: PIXELMILL_TOP_K default
MAX_PIXELS = 25_000_000  # pixelmill serve: PIXELMILL_MAX_PIXELS default


class BundleAPI(ls.LitAPI):
    """A pixelmill bundle on ONNX Runtime behind LitServe's batching loop."""

    def __init__(self, bundle: str, workers: int = 1) -> None:
        super().__init__(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S)
        self.bundle_path = bundle
        self.workers = workers

    def setup(self, device: str) -> None:
        from pixelmill.export.bundle import read_bundle
        from pixelmill.serving.settings import available_cpus
        from pixelmill.tasks.image_classification.runtime import OnnxClassifier

        bundle = read_bundle(self.bundle_path)
        self.model_name = bundle.name
        self.preprocessing = bundle.preprocessing
        self.classifier = OnnxClassifier(bundle, intra_op_threads=max(1, available_cpus() // self.workers), inter_op_threads=1)
        self.classifier.run(self.classifier.warmup_batch())  # as pixelmill serve warms up before it is ready

    # No annotation on ``request`` or on ``encode_response``'s result: LitServe reads them to
    # build the route, and unannotated means "hand over the parsed form" and "answer JSON".
    def decode_request(self, request):
        """The multipart form (a starlette ``FormData``) -> (file name, (H, W, C) uint8)."""
        from pixelmill.serving.images import decode_image

        upload = request["files"]
        name = upload.filename or "files[0]"
        return name, decode_image(upload.file.read(), name, self.preprocessing, MAX_PIXELS)

    def batch(self, inputs: list[tuple[str, np.ndarray]]) -> tuple[list[str], np.ndarray]:
        return [name for name, _ in inputs], np.stack([image for _, image in inputs])

    def predict(self, x: tuple[list[str], np.ndarray]) -> tuple[list[str], np.ndarray]:
        names, batch = x
        return names, self.classifier.run(batch)

    def unbatch(self, output: tuple[list[str], np.ndarray]) -> list[tuple[str, np.ndarray]]:
        names, probs = output
        return list(zip(names, probs))

    def encode_response(self, output: tuple[str, np.ndarray]):
        name, probs = output
        (prediction,) = self.classifier.decode(probs[None], TOP_K)
        return {"model": self.model_name, "version": "1", "predictions": [{"file": name, **prediction.to_dict()}]}


_MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: Any) -> None:
    if os.getpid() != _MAIN_PID:  # a forked API server inherits the handler: it only has to end
        sys.exit(0)
    raise KeyboardInterrupt


def main() -> None:
    bundle, port = sys.argv[1], int(sys.argv[2])
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    if not Path(bundle).is_dir():
        sys.exit(f"no bundle directory at {bundle}")
    # LitServe shuts its worker and API server processes down on KeyboardInterrupt; on a bare
    # SIGTERM its main process would die alone and leave them running.
    signal.signal(signal.SIGTERM, _interrupt)
    server = ls.LitServer(BundleAPI(bundle, workers), accelerator="cpu", devices=1, workers_per_device=workers)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
