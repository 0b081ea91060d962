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
from pixelmill.inference.session import Decision, Decisions, Prediction, prepare_image
from pixelmill.runs import load_run, read_decision
from pixelmill.tasks.classification import read_temperature, tempered_softmax


class TorchClassifier(Decisions):
    """A run's checkpoint in eager PyTorch: uint8 NHWC in, probabilities out, like the bundle."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best") -> None:
        run = load_run(run_dir, checkpoint)
        self.classes: list[str] = run.classes
        decision = read_decision(run.run_dir)
        self.decision = Decision(*decision) if decision else None
        self.preprocessing = run.preprocessing
        self._model = UInt8Classifier(run.net, self.preprocessing, tempered_softmax(read_temperature(run.run_dir))).eval()

    def prepare(self, image: Any) -> np.ndarray:
        return prepare_image(image, self.preprocessing)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, num_classes) float32."""
        with torch.inference_mode():
            return self._model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))).numpy()

    def predict(self, images: list, top_k: int = 5) -> list[Prediction]:
        return self.decode(self.run(np.stack([self.prepare(i) for i in images])), top_k) if images else []

    explainable = True  # Grad-CAM works on any network with a feature map
    layer: str | None = None  # the Grad-CAM layer (``pixelmill explain --layer``); None: the last feature map

    def check_explainable(self) -> None:
        """ConfigError when ``layer`` names no feature map of the network (listing the ones it has)."""
        from pixelmill.explain.gradcam import target_layer

        size, channels = self.preprocessing.size, self.preprocessing.channels
        target_layer(self._model.net, torch.zeros(1, channels, size, size), self.layer)

    def explain(self, batch: np.ndarray, targets: list[list[int]]) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """(N, H, W, C) uint8 and class indices per image -> (probabilities, per image the (H, W) Grad-CAM heatmap of each target)."""
        from pixelmill.explain.gradcam import gradcam, normalised_input, target_layer

        net = self._model.net
        x = normalised_input(batch, self.preprocessing.mean, self.preprocessing.std)
        _, layer = target_layer(net, x[:1], self.layer)
        maps: list[list[np.ndarray]] = [[] for _ in targets]
        for rank in range(max((len(t) for t in targets), default=0)):  # one Captum call per rank of target
            rows = [i for i, t in enumerate(targets) if len(t) > rank]
            for i, heatmap in zip(rows, gradcam(net, x[rows], [targets[i][rank] for i in rows], layer)):
                maps[i].append(heatmap)
        return self.run(batch), maps


class TorchScriptClassifier(Decisions):
    """A bundle's ``model.pt``, with the same interface as the ONNX runtime."""

    def __init__(self, bundle: Bundle) -> None:
        if not bundle.info.model_file.endswith(".pt"):
            raise BundleError(f"bundle {bundle.path} holds {bundle.info.model_file}, not a TorchScript model")
        self.bundle = bundle
        self.classes = bundle.classes
        self.decision = Decision.of_bundle(bundle)
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
        return self.decode(self.run(np.stack([self.prepare(i) for i in images])), top_k)
