"""Torch-free image classification runtime: a bundle's ``model.onnx`` on ONNX Runtime, pixels prepared as evaluation prepared them."""

from __future__ import annotations

from typing import Any

import numpy as np

from pixelmill.errors import BundleError
from pixelmill.export.bundle import Bundle
from pixelmill.inference.session import ImageLike, Prediction, open_session, prepare_image, to_predictions


class OnnxClassifier:
    """An ONNX Runtime session over a bundle's ``model.onnx`` (CPU, full graph optimisation)."""

    def __init__(self, bundle: Bundle, intra_op_threads: int | None = None, inter_op_threads: int | None = None) -> None:
        if not bundle.info.model_file.endswith(".onnx"):
            raise BundleError(f"bundle {bundle.path} holds {bundle.info.model_file}, not an ONNX model")
        self.bundle = bundle
        self.classes = bundle.classes
        self.preprocessing = bundle.preprocessing
        self.session = open_session(bundle, intra_op_threads, inter_op_threads)
        self.threads = intra_op_threads
        self.input_name = bundle.input_name
        self.output_name = bundle.output_name
        self._single: OnnxClassifier | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(H, W, C) of one image."""
        prep = self.preprocessing
        return (prep.size, prep.size, prep.channels)

    def warmup_batch(self) -> np.ndarray:
        """One black image: valid input that makes the session allocate before the first request."""
        return np.zeros((1, *self.input_shape), np.uint8)

    def single_threaded(self) -> OnnxClassifier:
        """This model on one thread, for callers that run one batch per core side by side.

        Itself when opened with one intra-op thread, else a second session (opened once).
        Concurrent runs of one multi-threaded session would fight over its thread pool.
        """
        if self.threads == 1:
            return self
        if self._single is None:
            self._single = OnnxClassifier(self.bundle, intra_op_threads=1, inter_op_threads=1)
        return self._single

    def prepare(self, image: ImageLike) -> np.ndarray:
        """A path, PIL image or NumPy array -> (H, W, C) uint8, exactly as evaluation prepared it."""
        return prepare_image(image, self.preprocessing)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, num_classes) float32 probabilities."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if batch.ndim == 3:
            batch = batch[None]
        (probs,) = self.session.run([self.output_name], {self.input_name: batch})
        return np.asarray(probs, dtype=np.float32)

    def predict(self, images: list[Any], top_k: int = 5) -> list[Prediction]:
        """Prepare, run as one batch and decode ``images``."""
        if not images:
            return []
        batch = np.stack([self.prepare(img) for img in images])
        return to_predictions(self.run(batch), self.classes, top_k)
