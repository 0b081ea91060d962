"""Torch-free inference on a tabular bundle: JSON records or typed CSV rows -> named ONNX inputs.

A tabular ``model.onnx`` takes one input per raw column, shape (N, 1): numeric and boolean
columns float32 (NaN = missing, booleans 0/1), categorical columns strings ("" = missing),
exactly the types ``pixelmill.data.tabular.typed_features`` gives the fitted
ColumnTransformer at training time. Rows travel as a NumPy structured array (one field
per column), so the serving batcher can slice and concatenate them like image batches.

The value rules (missing tokens, true/false spellings) come from the bundle's ``schema``
(the run's ``schema.json``), never from a second copy here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pixelmill.errors import BundleError, DataError
from pixelmill.export.bundle import Bundle
from pixelmill.inference.session import Decision, Decisions, Prediction, open_session

# ONNX / structured-array element type per schema column type.
INPUT_DTYPES = {"numeric": "float32", "boolean": "float32", "categorical": "string"}
_NUMPY = {"float32": np.float32, "string": object}


class TabularSchemaView:
    """The parts of ``schema.json`` inference needs: columns in order, their types and the value spellings."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.doc = dict(doc)
        self.columns: dict[str, str] = {c["name"]: c["type"] for c in doc["columns"]}
        self.target = str(doc.get("target", ""))
        self.classes = [str(c) for c in doc["classes"]]
        self.missing = frozenset(str(v).lower() for v in doc.get("missing_values", ("",)))
        bools = doc.get("boolean_values", {"true": ["true", "1"], "false": ["false", "0"]})
        self.booleans = {**{str(v).lower(): 1.0 for v in bools["true"]}, **{str(v).lower(): 0.0 for v in bools["false"]}}
        self.missing_category = str(doc.get("missing_category", ""))
        self.dtype = np.dtype([(name, _NUMPY[INPUT_DTYPES[kind]]) for name, kind in self.columns.items()])

    def inputs(self) -> list[dict[str, str]]:
        """bundle.json ``inputs``: one named (N, 1) input per column."""
        return [{"name": name, "dtype": INPUT_DTYPES[kind], "type": kind, "shape": [-1, 1]} for name, kind in self.columns.items()]


def _is_missing(value: Any, schema: TabularSchemaView) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in schema.missing


def _numeric(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("must be a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except ValueError:
        raise ValueError("must be a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _boolean(value: Any, schema: TabularSchemaView) -> float:
    if isinstance(value, bool):
        return float(value)
    key = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if isinstance(value, float) and value in (0.0, 1.0):
        key = str(int(value))
    if key not in schema.booleans:
        raise ValueError("must be boolean (true/false, yes/no, 1/0)")
    return schema.booleans[key]


def _categorical(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("must be a string (a category)")
    return str(value).strip()


def _cell(value: Any, kind: str, schema: TabularSchemaView) -> Any:
    """One record value -> the typed value training saw (NaN / "" for missing)."""
    if _is_missing(value, schema):
        return schema.missing_category if kind == "categorical" else np.nan
    if kind == "numeric":
        return _numeric(value)
    if kind == "boolean":
        return _boolean(value, schema)
    return _categorical(value)


def rows_from_records(records: Sequence[Any], schema: TabularSchemaView) -> np.ndarray:
    """JSON records -> (N,) structured rows; DataError names the record index and column. Extra keys are ignored."""
    rows = np.zeros(len(records), dtype=schema.dtype)
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"record {i} is a {type(record).__name__}, not an object of column: value pairs")
        for name, kind in schema.columns.items():
            if name not in record:
                raise DataError(f"record {i} is missing column '{name}' (the model needs: {', '.join(schema.columns)})")
            try:
                rows[name][i] = _cell(record[name], kind, schema)
            except (ValueError, TypeError) as exc:
                raise DataError(f"record {i}, column '{name}' ({kind}) {exc}; got {str(record[name])[:60]!r}") from None
    return rows


def rows_from_frame(frame: Any, schema: TabularSchemaView) -> np.ndarray:
    """A typed frame from ``pixelmill.data.tabular.typed_features`` -> (N,) structured rows."""
    rows = np.zeros(len(frame), dtype=schema.dtype)
    for name, kind in schema.columns.items():
        values = frame[name].to_numpy()
        rows[name] = values.astype(object) if kind == "categorical" else values.astype(np.float32)
    return rows


def feeds(rows: np.ndarray, schema: TabularSchemaView) -> dict[str, np.ndarray]:
    """(N,) structured rows -> {column: (N, 1) float32 or str array}: the ONNX model's named inputs."""
    out = {}
    for name, kind in schema.columns.items():
        column = rows[name].reshape(-1, 1)
        out[name] = np.ascontiguousarray(column, dtype=np.float32) if kind != "categorical" else column.astype(str).astype(object)
    return out


class OnnxTabularClassifier(Decisions):
    """An ONNX Runtime session over a tabular bundle: records in, class probabilities out.

    ``providers``: the execution providers wanted, in order (None: CPU only); the attribute
    ``providers`` holds those the session actually uses.
    """

    def __init__(self, bundle: Bundle, intra_op_threads: int | None = None, inter_op_threads: int | None = None, *, providers: list[str] | None = None) -> None:
        if "schema" not in bundle.meta:
            raise BundleError(f"bundle {bundle.path} has no table schema (kind={bundle.kind!r}); export the tabular run again")
        self.bundle = bundle
        self.schema = TabularSchemaView(bundle.meta["schema"])
        self.classes = bundle.classes
        self.decision = Decision.of_bundle(bundle)  # binary: the operating point chosen in training
        self.preprocessing = bundle.info.preprocessing
        self.session = open_session(bundle, intra_op_threads, inter_op_threads, providers)
        self.providers: list[str] = list(self.session.get_providers())
        self.output_name = bundle.output_name

    def run(self, rows: np.ndarray) -> np.ndarray:
        """(N,) structured rows -> (N, num_classes) float32 probabilities."""
        (probs,) = self.session.run([self.output_name], feeds(rows, self.schema))
        return np.asarray(probs, dtype=np.float32)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Columns of one row."""
        return (len(self.schema.columns),)

    def warmup_batch(self, n: int = 1) -> np.ndarray:
        """n all-missing rows (NaN / ""): valid input that warms the session up."""
        rows = np.zeros(n, dtype=self.schema.dtype)
        for name, kind in self.schema.columns.items():
            rows[name] = self.schema.missing_category if kind == "categorical" else np.nan
        return rows

    def predict_records(self, records: Sequence[Any], top_k: int = 5) -> list[Prediction]:
        """Validate ``records`` against the schema, run them as one batch and decode."""
        if not records:
            return []
        return self.decode(self.run(rows_from_records(records, self.schema)), top_k)

    def predict_csv(self, path: str | Path, top_k: int = 5, batch_size: int = 1024) -> list[Any]:
        """Every row of a CSV, read as strictly as training read it (the target column is optional)."""
        from pixelmill.tasks.tabular_classification.predict import predict_csv  # pandas, only when asked

        return predict_csv(self, path, top_k, batch_size)
