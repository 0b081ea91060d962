"""``pixelmill predict`` and ``Predictor.predict_csv`` for tabular models: one CSV of rows in, one prediction per row out."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from pixelmill.data.tabular import TabularSchema, read_csv, typed_features
from pixelmill.errors import ConfigError
from pixelmill.inference.session import Prediction
from pixelmill.tasks.base import PredictionTable
from pixelmill.tasks.tabular_classification.runtime import rows_from_frame


@dataclass
class TableRow:
    """One CSV row's prediction: its 1-based row number and 'file.csv:LINE' (the id evaluation uses)."""

    row: int
    source: str
    prediction: Prediction


def predict_csv(runtime: Any, path: str | Path, top_k: int = 5, batch_size: int = 1024) -> list[TableRow]:
    """Every row of a CSV through ``runtime`` (ONNX or eager), typed by the model's schema, in batches."""
    view = runtime.schema
    table = read_csv(path)
    schema = TabularSchema(view.target, view.classes, view.columns, list(view.doc.get("ignored", [])))
    rows = rows_from_frame(typed_features(table, schema), view)
    sources = [f"{table.path.name}:{line}" for line in table.lines]
    size = max(1, batch_size)
    out: list[TableRow] = []
    for start in range(0, len(rows), size):
        probs = runtime.run(rows[start : start + size])
        out += [TableRow(start + i + 1, sources[start + i], p) for i, p in enumerate(runtime.decode(probs, top_k))]
    return out


def write_table_predictions(rows: list[TableRow], out: str | Path, classes: Sequence[str]) -> Path:
    """CSV rows' predictions as CSV: row, source, label, confidence and one probability column per class."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"cannot write tabular predictions to '{out}'; use a .csv file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "source", "label", "confidence", *(f"p_{c}" for c in classes)])
        for r in rows:
            p = r.prediction
            writer.writerow([r.row, r.source, p.label, f"{p.confidence:.6f}", *(f"{p.probabilities[c]:.6f}" for c in classes)])
    return out


def predict_inputs(predictor: Any, inputs: list[str], top_k: int, out: Path | None, on_progress: Callable | None = None) -> PredictionTable:
    """``pixelmill predict MODEL rows.csv``: predict every row; write ``out`` when given."""
    if len(inputs) != 1:
        raise ConfigError(f"a tabular model predicts one CSV file at a time; got {len(inputs)} inputs")
    rows = predictor.predict_csv(inputs[0], top_k)
    if out is not None:
        write_table_predictions(rows, out, predictor.classes)
    table = [
        [str(r.row), r.source, r.prediction.label, f"{r.prediction.confidence:.4f}", ", ".join(f"{k} {v:.3f}" for k, v in r.prediction.top_k)]
        for r in rows
    ]
    return PredictionTable(["row", "source", "label", "confidence", f"top-{top_k}"], table)
