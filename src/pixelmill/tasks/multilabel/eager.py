"""A multi-label run's checkpoint in eager PyTorch, behind the interface of the ONNX runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pixelmill.export.onnx import UInt8Classifier
from pixelmill.runs import resolve_run_dir
from pixelmill.tasks.image_classification.eager import TorchClassifier
from pixelmill.tasks.multilabel.runtime import LabelSetPrediction, Thresholds, resolve_thresholds, to_label_sets
from pixelmill.tasks.multilabel.training import read_thresholds, sigmoid


class TorchMultiLabel(TorchClassifier):
    """``pixelmill predict RUN_DIR`` for a multi-label run: sigmoid outputs, the run's thresholds."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best") -> None:
        super().__init__(run_dir, checkpoint)
        self._model = UInt8Classifier(self._model.net, self.preprocessing, sigmoid).eval()
        self.thresholds = read_thresholds(resolve_run_dir(run_dir), self.classes)

    def decode(self, probs: np.ndarray, top_k: int = 5, thresholds: Thresholds = None) -> list[LabelSetPrediction]:
        return to_label_sets(probs, self.classes, resolve_thresholds(self.classes, self.thresholds, thresholds), top_k)

    def predict(self, images: list, top_k: int = 5, thresholds: Thresholds = None) -> list[Any]:
        return self.decode(self.run(np.stack([self.prepare(i) for i in images])), top_k, thresholds) if images else []
