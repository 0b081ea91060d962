"""A tabular run's checkpoint in eager PyTorch: the fitted ColumnTransformer + MLP, behind the ONNX runtime's interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from pixelmill.data.tabular_preprocess import read_schema_file
from pixelmill.inference.session import Decision, Decisions, Prediction
from pixelmill.runs import load_run, read_decision
from pixelmill.tasks.classification import read_temperature, tempered_softmax
from pixelmill.tasks.tabular_classification.runtime import TabularSchemaView, rows_from_records


class TorchTabularClassifier(Decisions):
    """Records or structured rows -> class probabilities through scikit-learn then eager PyTorch."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best") -> None:
        run = load_run(run_dir, checkpoint)
        self._prep, self._net = run.preprocessing, run.net
        self._head = tempered_softmax(read_temperature(run.run_dir))  # eval.calibrate, as evaluation and the bundle apply it
        self.schema = TabularSchemaView(read_schema_file(run.run_dir))
        self.classes = list(self.schema.classes)
        decision = read_decision(run.run_dir)
        self.decision = Decision(*decision) if decision else None
        self.preprocessing = run.summary.preprocessing

    def run(self, rows: np.ndarray) -> np.ndarray:
        """(N,) structured rows -> (N, num_classes) float32."""
        frame = pd.DataFrame({
            name: rows[name].astype(object) if kind == "categorical" else rows[name].astype(np.float64)
            for name, kind in self.schema.columns.items()
        })
        with torch.inference_mode():
            return self._head(self._net(torch.from_numpy(self._prep.transform(frame)))).numpy()

    def predict_records(self, records: Sequence[Any], top_k: int = 5) -> list[Prediction]:
        return self.decode(self.run(rows_from_records(records, self.schema)), top_k) if records else []

    def predict_csv(self, path: str | Path, top_k: int = 5, batch_size: int = 1024) -> list[Any]:
        """Every row of a CSV, read as strictly as training read it (the target column is optional)."""
        from pixelmill.tasks.tabular_classification.predict import predict_csv  # pandas, only when asked

        return predict_csv(self, path, top_k, batch_size)
