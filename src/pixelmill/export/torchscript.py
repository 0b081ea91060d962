"""TorchScript export of the uint8 NHWC wrapper, and a classifier that runs it."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pixelmill.export.bundle import Bundle
from pixelmill.export.onnx import UInt8Classifier
from pixelmill.errors import BundleError


def export_torchscript(wrapper: UInt8Classifier, path: Path, sample: torch.Tensor) -> None:
    """Trace ``wrapper`` (uint8 NHWC in, probabilities out) and save it as ``model.pt``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper.eval(), (sample,), check_trace=False)
        traced = torch.jit.freeze(traced)
        torch.jit.save(traced, str(path))


def torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, C) uint8 -> (N, num_classes) float32 through the saved TorchScript module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in favour of torch.export; it still loads
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))).numpy().astype(np.float32)

    return run


class TorchScriptClassifier:
    """A bundle's ``model.pt``, with the same interface as :class:`pixelmill.inference.OnnxClassifier`."""

    def __init__(self, bundle: Bundle) -> None:
        if not str(bundle.meta.get("model_file", "")).endswith(".pt"):
            raise BundleError(f"bundle {bundle.path} holds {bundle.meta.get('model_file')}, not a TorchScript model")
        self.bundle = bundle
        self.classes = bundle.classes
        self.preprocessing = bundle.preprocessing
        try:
            self.run = torchscript_runner(bundle.model_file)
        except Exception as exc:
            raise BundleError(f"cannot load TorchScript model {bundle.model_file}: {str(exc).splitlines()[0][:300]}") from None

    def prepare(self, image) -> np.ndarray:
        from pixelmill.inference import prepare_image

        return prepare_image(image, self.preprocessing)

    def predict(self, images: list, top_k: int = 5):
        from pixelmill.inference import to_predictions

        if not images:
            return []
        return to_predictions(self.run(np.stack([self.prepare(i) for i in images])), self.classes, top_k)
