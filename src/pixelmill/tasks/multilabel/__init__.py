"""Multi-label image classification: a set of labels per image, one sigmoid per label.

Data: a CSV manifest ``path,labels[,split]`` (``data.label_separator``, ``data.no_label``),
verified like single-label scans, split by iterative stratification. Training: BCE with
logits (``model.class_weights=auto``: per-label positive weights), multi-label torchmetrics,
``trainer.monitor=auto`` is ``val/map``. After training one threshold per label is chosen on
the validation split (``eval.threshold``) and saved as ``RUN_DIR/thresholds.json``; the bundle
carries them as ``thresholds``. Bundle: ``image`` uint8 NHWC in, ``probabilities`` (N, labels)
out, the graph ending in a sigmoid. Serving: the image requests, label sets in the answers.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, ClassVar

from pixelmill.errors import ConfigError
from pixelmill.tasks.base import register_task
from pixelmill.tasks.image_classification import ImageClassification


@register_task
class MultiLabelClassification(ImageClassification):
    """Images in, label sets out. Preprocessing, models and request decoding are image classification's."""

    name: ClassVar[str] = "multilabel"
    title: ClassVar[str] = "multi-label image classification"
    export_formats: ClassVar[tuple[str, ...]] = ("onnx",)
    quantizable: ClassVar[bool] = True
    monitors: ClassVar[tuple[str, ...]] = ("val/map", "val/auc_macro", "val/f1_micro", "val/f1_macro", "val/loss")
    default_monitor: ClassVar[str] = "val/map"

    def recognises(self, path: Path) -> bool:
        """A CSV manifest whose header has both ``path`` and ``labels``."""
        if path.suffix.lower() != ".csv" or not path.is_file():
            return False
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return False  # the scan reports an unreadable manifest
        names = {name.strip().lower() for name in header}
        return {"path", "labels"} <= names

    def check_data(self, cfg: Any, data: Any) -> None:
        """A sensitivity/specificity target the validation split cannot measure fails now, not after training."""
        from pixelmill.errors import DataError
        from pixelmill.evaluation.rules import check_feasible

        if cfg.eval.positive_class:
            raise ConfigError("eval.positive_class applies to binary models; a multi-label model has a threshold per label")
        try:
            check_feasible(str(cfg.eval.threshold), data.targets("val"), data.classes)
        except ValueError as exc:
            raise DataError(str(exc)) from None

    def load_data(self, cfg: Any, run_dir: Path | None = None) -> Any:
        from pixelmill.tasks.multilabel.data import load_scan

        return load_scan(cfg)

    def evaluation_data(self, cfg: Any, run_dir: Path, classes: list[str], split: str, other: Path | None) -> tuple[Any, str]:
        from pixelmill.tasks.multilabel.data import evaluation_scan

        return evaluation_scan(cfg, classes, split, other)

    def datamodule(self, cfg: Any, data: Any, prep: Any) -> Any:
        from pixelmill.tasks.multilabel.training import MultiLabelDataModule

        return MultiLabelDataModule(data, prep, cfg.data, cfg.seed)

    def lightning_module(self, cfg: Any, net: Any, data: Any) -> Any:
        from pixelmill.tasks.multilabel.training import lightning_module

        return lightning_module(cfg, net, data)

    def probabilities(self, logits: Any) -> Any:
        from pixelmill.tasks.multilabel.training import sigmoid

        return sigmoid(logits)

    def choose_operating_point(self, run_dir: Path, net: Any, data: Any, prep: Any, cfg: Any) -> None:
        from pixelmill.evaluation.rules import resolve
        from pixelmill.tasks.classification import CALIBRATION_FILE
        from pixelmill.tasks.multilabel.training import calibrate_labels, choose_thresholds

        loader = self.datamodule(cfg, data, prep).eval_loader("val")
        (Path(run_dir) / CALIBRATION_FILE).unlink(missing_ok=True)  # a resumed run whose config dropped calibration
        if cfg.eval.calibrate != "none":  # first: the thresholds are chosen on the calibrated probabilities
            calibrate_labels(run_dir, net, loader, list(data.classes), str(cfg.eval.calibrate))
        choose_thresholds(run_dir, loader, data, net, resolve(cfg.eval.threshold, "max_f1"))

    def evaluate(self, run_dir: Path, net: Any, data: Any, prep: Any, split: str, cfg: Any) -> dict[str, Any]:
        from pixelmill.tasks.multilabel.training import evaluate

        return evaluate(run_dir, self.datamodule(cfg, data, prep).eval_loader(split), data, net, split, cfg.eval.bootstrap, cfg.seed)

    def export(self, run: Any, out: Path, fmt: str, quantize: str | None, options: dict[str, Any]) -> Any:
        import json

        import numpy as np

        from pixelmill.tasks.classification import CALIBRATION_FILE
        from pixelmill.tasks.image_classification.data import check_images
        from pixelmill.tasks.image_classification.export import export
        from pixelmill.tasks.multilabel.data import load_scan
        from pixelmill.tasks.multilabel.training import calibrated_sigmoid, read_label_calibration, read_thresholds

        thresholds = read_thresholds(run.run_dir, run.classes)
        calibration = read_label_calibration(run.run_dir, run.classes)  # eval.calibrate: in the graph, per label
        paths = check_images(run.config, run.run_dir, options["max_images"], load=load_scan)
        extra = {"thresholds": thresholds, "output": {"name": "probabilities", "shape": [-1, len(run.classes)], "activation": "sigmoid"}}
        if calibration is not None:
            method = json.loads((run.run_dir / CALIBRATION_FILE).read_text())["method"]
            extra["calibration"] = {"method": method, **{k: dict(zip(run.classes, map(float, v))) for k, v in zip(("scale", "bias"), calibration)}}
        cut = np.array([thresholds[name] for name in run.classes])
        return export(run, out, fmt, quantize, options, head=calibrated_sigmoid(calibration), paths=paths, extra=extra, thresholds=cut, load=load_scan)

    def runtime(self, bundle: Any, intra_op_threads: int | None = None, inter_op_threads: int | None = None, *, providers: list[str] | None = None) -> Any:
        from pixelmill.tasks.multilabel.runtime import OnnxMultiLabel

        return OnnxMultiLabel(bundle, intra_op_threads, inter_op_threads, providers=providers)

    def eager_runtime(self, run_dir: Path, checkpoint: str) -> Any:
        from pixelmill.tasks.multilabel.eager import TorchMultiLabel

        return TorchMultiLabel(run_dir, checkpoint)

    def serving(self) -> Any:
        from pixelmill.tasks.multilabel import serving

        return serving

    def predict_inputs(self, predictor: Any, inputs: list[str], top_k: int, batch_size: int, out: Path | None, on_progress: Any) -> Any:
        from pixelmill.tasks.multilabel.predict import predict_inputs

        return predict_inputs(predictor, inputs, top_k, batch_size, out, on_progress)
