"""Single-label image classification: one softmax over classes per image.

Data: a verified scan of class folders or a manifest. Bundle: ``image`` uint8 NHWC in,
``probabilities`` (N, classes) out, normalisation inside the graph. Serving: multipart
files or base64 JSON on ``/predict``; a UINT8 tensor on the v2 protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pixelmill.errors import ConfigError
from pixelmill.tasks.base import register_task
from pixelmill.tasks.single_label import SingleLabelTask


@register_task
class ImageClassification(SingleLabelTask):
    name: ClassVar[str] = "image"
    title: ClassVar[str] = "image classification"
    sample_noun: ClassVar[str] = "images"
    export_formats: ClassVar[tuple[str, ...]] = ("onnx", "torchscript")
    quantizable: ClassVar[bool] = True

    def load_data(self, cfg: Any, run_dir: Path | None = None) -> Any:
        from pixelmill.tasks.image_classification.data import load_scan

        return load_scan(cfg)

    def evaluation_data(self, cfg: Any, run_dir: Path, classes: list[str], split: str, other: Path | None) -> tuple[Any, str]:
        from pixelmill.tasks.image_classification.data import evaluation_scan

        return evaluation_scan(cfg, classes, split, other)

    def check_model(self, cfg: Any) -> None:
        from pixelmill.models.nets import tabular_nets

        if cfg.model.name.removeprefix("pixelmill:") in tabular_nets():
            raise ConfigError(f"model '{cfg.model.name}' takes table rows, not images; set data.kind=tabular or pick an image model")

    def new_model(self, cfg: Any, data: Any) -> tuple[Any, Any]:
        from pixelmill.tasks.classification import build_net
        from pixelmill.tasks.image_classification.preprocessing import resolve_preprocessing

        net = build_net(cfg, len(data.classes))
        return net, resolve_preprocessing(cfg, net)  # the network dictates its input (timm's pretrained_cfg)

    def saved_model(self, cfg: Any, summary: Any, run_dir: Path) -> tuple[Any, Any]:
        from pixelmill.data.preprocess import Preprocessing
        from pixelmill.tasks.classification import build_net

        return build_net(cfg, len(summary.classes), fresh=True), Preprocessing.from_dict(summary.preprocessing)

    def datamodule(self, cfg: Any, data: Any, prep: Any) -> Any:
        from pixelmill.data.datamodule import ImageDataModule

        return ImageDataModule(data, prep, cfg.data, cfg.seed)

    def eval_images(self, prep: Any) -> Any:
        from pixelmill.data.preprocess import load_image

        return lambda path: load_image(path, prep.channels)

    def export(self, run: Any, out: Path, fmt: str, quantize: str | None, options: dict[str, Any]) -> Any:
        from pixelmill.tasks.classification import read_temperature, tempered_softmax
        from pixelmill.tasks.image_classification.export import export

        temperature = read_temperature(run.run_dir)  # eval.calibrate: the temperature lives in the graph
        extra = {"calibration": {"method": "temperature", "temperature": temperature}} if temperature != 1.0 else None
        return export(run, out, fmt, quantize, options, head=tempered_softmax(temperature), extra=extra)

    def runtime(self, bundle: Any, intra_op_threads: int | None = None, inter_op_threads: int | None = None, *, providers: list[str] | None = None) -> Any:
        if bundle.model_format == "torchscript":
            from pixelmill.tasks.image_classification.eager import TorchScriptClassifier

            return TorchScriptClassifier(bundle)  # TorchScript runs on CPU; providers are ONNX Runtime's
        from pixelmill.tasks.image_classification.runtime import OnnxClassifier

        return OnnxClassifier(bundle, intra_op_threads, inter_op_threads, providers=providers)

    def eager_runtime(self, run_dir: Path, checkpoint: str) -> Any:
        from pixelmill.tasks.image_classification.eager import TorchClassifier

        return TorchClassifier(run_dir, checkpoint)

    def serving(self) -> Any:
        from pixelmill.tasks.image_classification import serving

        return serving

    def predict_inputs(self, predictor: Any, inputs: list[str], top_k: int, batch_size: int, out: Path | None, on_progress: Any) -> Any:
        from pixelmill.tasks.image_classification.predict import predict_inputs

        return predict_inputs(predictor, inputs, top_k, batch_size, out, on_progress)
