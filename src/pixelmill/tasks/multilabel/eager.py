"""A multi-label run's checkpoint in eager PyTorch, behind the interface of the ONNX runtime."""

from __future__ import annotations

from pathlib import Path

from pixelmill.export.onnx import UInt8Classifier
from pixelmill.runs import resolve_run_dir
from pixelmill.tasks.image_classification.eager import TorchClassifier
from pixelmill.tasks.multilabel.runtime import LabelSets
from pixelmill.tasks.multilabel.training import calibrated_sigmoid, read_label_calibration, read_thresholds


class TorchMultiLabel(LabelSets, TorchClassifier):
    """``pixelmill predict RUN_DIR`` for a multi-label run: sigmoid outputs, the run's thresholds."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best") -> None:
        super().__init__(run_dir, checkpoint)
        run_dir = resolve_run_dir(run_dir)
        self._model = UInt8Classifier(self._model.net, self.preprocessing, calibrated_sigmoid(read_label_calibration(run_dir, self.classes))).eval()
        self.thresholds = read_thresholds(run_dir, self.classes)
