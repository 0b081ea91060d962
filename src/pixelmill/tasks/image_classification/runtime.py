"""Torch-free image classification runtime: a bundle's ``model.onnx`` on ONNX Runtime, pixels prepared as evaluation prepared them."""

from __future__ import annotations

from typing import Any

import numpy as np

from pixelmill.errors import BundleError
from pixelmill.explain import CAM_OUTPUT
from pixelmill.export.bundle import Bundle
from pixelmill.inference.session import Decision, Decisions, ImageLike, Prediction, open_session, prepare_image


class OnnxClassifier(Decisions):
    """An ONNX Runtime session over a bundle's ``model.onnx`` (full graph optimisation).

    ``providers``: the execution providers wanted, in order (None: CPU only); the attribute
    ``providers`` holds those the session actually uses.
    """

    def __init__(self, bundle: Bundle, intra_op_threads: int | None = None, inter_op_threads: int | None = None, *, providers: list[str] | None = None) -> None:
        if not bundle.info.model_file.endswith(".onnx"):
            raise BundleError(f"bundle {bundle.path} holds {bundle.info.model_file}, not an ONNX model")
        self.bundle = bundle
        self.classes = bundle.classes
        self.decision = Decision.of_bundle(bundle)  # binary: the operating point chosen in training
        self.preprocessing = bundle.preprocessing
        self.session = open_session(bundle, intra_op_threads, inter_op_threads, providers)
        self.wanted_providers = providers
        self.providers: list[str] = list(self.session.get_providers())
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
            self._single = OnnxClassifier(self.bundle, intra_op_threads=1, inter_op_threads=1, providers=self.wanted_providers)
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

    @property
    def explainable(self) -> bool:
        """Whether the bundle's graph has the class activation map output (``explain`` in bundle.json)."""
        return bool((self.bundle.meta.get("explain") or {}).get("available"))

    def check_explainable(self) -> None:
        """BundleError with the reason bundle.json gives when the graph has no class activation maps."""
        if not self.explainable:
            reason = (self.bundle.meta.get("explain") or {}).get("reason", "it was exported before explanations existed")
            raise BundleError(f"bundle {self.bundle.path} has no explain output ({reason}); explain the run directory instead (Grad-CAM in PyTorch)")

    def run_with_cams(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, C) uint8 -> ((N, classes) probabilities, (N, classes, h, w) raw class activation maps), one ORT call.

        What the server batches for ``/explain``: the classes to explain depend on each image's
        prediction, so every class's map comes back and the route picks. BundleError when the
        bundle has no explain output.
        """
        self.check_explainable()
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        probs, cams = self.session.run([self.output_name, CAM_OUTPUT], {self.input_name: batch})
        return np.asarray(probs, np.float32), np.asarray(cams, np.float32)

    def explain(self, batch: np.ndarray, targets: list[list[int]]) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """(N, H, W, C) uint8 and class indices per image -> (probabilities, per image the (H, W) heatmap of each target).

        BundleError when the bundle has no explain output (its reason is in bundle.json).
        """
        probs, cams = self.run_with_cams(batch)
        return probs, self.heatmaps(cams, targets)

    def heatmaps(self, cams: np.ndarray, targets: list[list[int]]) -> list[list[np.ndarray]]:
        """Raw (N, classes, h, w) class activation maps and class indices per image -> per image the (H, W) heatmap of each target."""
        from pixelmill.explain.heatmaps import heatmaps_from_cams

        size = self.input_shape[:2]
        return [list(heatmaps_from_cams(cams[i, list(t)], size)) for i, t in enumerate(targets)]

    def predict(self, images: list[Any], top_k: int = 5) -> list[Prediction]:
        """Prepare, run as one batch and decode ``images``."""
        if not images:
            return []
        batch = np.stack([self.prepare(img) for img in images])
        return self.decode(self.run(batch), top_k)
