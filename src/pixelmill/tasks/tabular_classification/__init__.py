"""Tabular classification: CSV rows -> a fitted ColumnTransformer -> an MLP -> one softmax over classes.

Data: typed CSV rows, the schema saved as ``schema.json``. Bundle: one named (N, 1) input
per raw column (preprocessing inside the graph), ``probabilities`` out. Serving: JSON
``{"records": [...]}`` on ``/predict``; one tensor per column on the v2 protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pixelmill.errors import ConfigError
from pixelmill.tasks.base import register_task
from pixelmill.tasks.single_label import SingleLabelTask


@register_task
class TabularClassification(SingleLabelTask):
    name: ClassVar[str] = "tabular"
    title: ClassVar[str] = "tabular classification"
    sample_noun: ClassVar[str] = "rows"

    def load_data(self, cfg: Any, run_dir: Path | None = None) -> Any:
        from pixelmill.tasks.tabular_classification.data import load_rows

        return load_rows(cfg, run_dir)

    def evaluation_data(self, cfg: Any, run_dir: Path, classes: list[str], split: str, other: Path | None) -> tuple[Any, str]:
        from pixelmill.tasks.tabular_classification.data import evaluation_rows

        return evaluation_rows(cfg, run_dir, split, other)

    def check_model(self, cfg: Any) -> None:
        from pixelmill.models.nets import tabular_nets

        if cfg.model.name.removeprefix("pixelmill:") not in tabular_nets():
            raise ConfigError(f"data.kind=tabular needs a model for table rows; set model.name to one of: {', '.join(tabular_nets())}")

    def _net(self, cfg: Any, num_classes: int, prep: Any, fresh: bool) -> Any:
        from pixelmill.tasks.classification import build_net

        rows = {"in_features": prep.n_features, "hidden_sizes": list(cfg.model.hidden_sizes), "activation": cfg.model.activation}
        return build_net(cfg, num_classes, fresh=fresh, **rows)

    def new_model(self, cfg: Any, data: Any) -> tuple[Any, Any]:
        from pixelmill.data.tabular_preprocess import TabularPreprocessor

        prep = TabularPreprocessor.fit(data)  # on the training split only
        return self._net(cfg, len(data.classes), prep, fresh=False), prep

    def save_preprocessing(self, run_dir: Path, prep: Any) -> None:
        prep.save(run_dir)  # schema.json + preprocessor.joblib, read back by resume, evaluate and export

    def saved_model(self, cfg: Any, summary: Any, run_dir: Path) -> tuple[Any, Any]:
        from pixelmill.data.tabular_preprocess import TabularPreprocessor

        prep = TabularPreprocessor.load(run_dir)  # checks preprocessor.joblib against schema.json
        return self._net(cfg, len(prep.schema.classes), prep, fresh=True), prep

    def datamodule(self, cfg: Any, data: Any, prep: Any) -> Any:
        from pixelmill.data.datamodule import TabularDataModule

        return TabularDataModule(data, prep, cfg.data, cfg.seed)

    def export(self, run: Any, out: Path, fmt: str, quantize: str | None, options: dict[str, Any]) -> Any:
        from pixelmill.tasks.tabular_classification.export import export

        return export(run, out, fmt, quantize, options)

    def runtime(self, bundle: Any, intra_op_threads: int | None = None, inter_op_threads: int | None = None, *, providers: list[str] | None = None) -> Any:
        from pixelmill.tasks.tabular_classification.runtime import OnnxTabularClassifier

        return OnnxTabularClassifier(bundle, intra_op_threads, inter_op_threads, providers=providers)

    def eager_runtime(self, run_dir: Path, checkpoint: str) -> Any:
        from pixelmill.tasks.tabular_classification.eager import TorchTabularClassifier

        return TorchTabularClassifier(run_dir, checkpoint)

    def serving(self) -> Any:
        from pixelmill.tasks.tabular_classification import serving

        return serving

    def predict_inputs(self, predictor: Any, inputs: list[str], top_k: int, batch_size: int, out: Path | None, on_progress: Any) -> Any:
        from pixelmill.tasks.tabular_classification.predict import predict_inputs

        return predict_inputs(predictor, inputs, top_k, out, on_progress)
