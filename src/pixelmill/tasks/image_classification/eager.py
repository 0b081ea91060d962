"""A run's checkpoint in eager PyTorch, behind the interface of the ONNX runtime (``pixelmill predict RUN_DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelmill.errors import BundleError
from pixelmill.export.bundle import Bundle
from pixelmill.export.onnx import UInt8Classifier
from pixelmill.export.torchscript import torchscript_runner
from pixelmill.inference.session import Prediction, prepare_image, to_predictions
from pixelmill.runs import load_run
from pixelmill.tasks.classification import read_temperature, tempered_softmax


class TorchClassifier:
    """A run's checkpoint in eager PyTorch: uint8 NHWC in, probabilities out, like the bundle."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best") -> None:
        run = load_run(run_dir, checkpoint)
        self.classes: list[str] = run.classes
        self.preprocessing = run.preprocessing
        self._model = UInt8Classifier(run.net, self.preprocessing, tempered_softmax(read_temperature(run.run_dir))).eval()

    def prepare(self, image: Any) -> np.ndarray:
        return prepare_image(image, self.preprocessing)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, num_classes) float32."""
        with torch.inference_mode():
            return self._model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))).numpy()

    def predict(self, images: list, top_k: int = 5) -> list[Prediction]:
        return to_predictions(self.run(np.stack([self.prepare(i) for i in images])), self.classes, top_k) if images else []


class TorchScriptClassifier:
    """A bundle's ``model.pt``, with the same interface as the ONNX runtime."""

    def __init__(self, bundle: Bundle) -> None:
        if not bundle.info.model_file.endswith(".pt"):
            raise BundleError(f"bundle {bundle.path} holds {bundle.info.model_file}, not a TorchScript model")
        self.bundle = bundle
        self.classes = bundle.classes
        self.preprocessing = bundle.preprocessing
        try:
            self.run = torchscript_runner(bundle.model_file)
        except Exception as exc:
            raise BundleError(f"cannot load TorchScript model {bundle.model_file}: {str(exc).splitlines()[0][:300]}") from None

    def prepare(self, image: Any) -> np.ndarray:
        return prepare_image(image, self.preprocessing)

    def predict(self, images: list, top_k: int = 5) -> list[Prediction]:
        if not images:
            return []
        return to_predictions(self.run(np.stack([self.prepare(i) for i in images])), self.classes, top_k)
