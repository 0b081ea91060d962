"""A tabular run's fitted preprocessing: a scikit-learn ColumnTransformer plus ``schema.json``.

Only standard, skl2onnx-convertible steps, one block per column type:

- numeric     -> SimpleImputer(strategy="median") -> StandardScaler()
- boolean     -> SimpleImputer(strategy="most_frequent")  (values already 0.0/1.0/NaN)
- categorical -> OneHotEncoder(handle_unknown="ignore")   (missing is the "" category)

Categoricals have no SimpleImputer on purpose: skl2onnx's string imputer cannot fill with
a constant, and an explicit "" category keeps "missing" informative. ``schema.json``
records the column order and types, the fitted statistics of every step, the output
feature names and the sha256 of ``preprocessor.joblib``, which is checked before loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pixelmill.data.tabular import FALSE_VALUES, MISSING_CATEGORY, MISSING_VALUES, TRUE_VALUES, TabularData, TabularSchema
from pixelmill.errors import RunError

SCHEMA_FILE = "schema.json"
PREPROCESSOR_FILE = "preprocessor.joblib"
SCHEMA_FORMAT = "pixelmill.tabular.schema/1"


def build_transformer(schema: TabularSchema):
    """An unfitted ColumnTransformer of standard, skl2onnx-convertible steps (one block per column type)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    blocks = {
        "numeric": lambda: Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]),
        "boolean": lambda: SimpleImputer(strategy="most_frequent"),
        "categorical": lambda: OneHotEncoder(handle_unknown="ignore", sparse_output=False),
    }
    parts = [(kind, make(), schema.of_type(kind)) for kind, make in blocks.items() if schema.of_type(kind)]
    return ColumnTransformer(parts, remainder="drop", sparse_threshold=0.0)


def _fitted_stats(transformer) -> dict[str, dict[str, Any]]:
    """Per column, what the fitted transformer learned: imputed value, mean/scale, or categories."""
    stats: dict[str, dict[str, Any]] = {}
    for kind, step, columns in transformer.transformers_:
        if kind == "numeric":
            impute, scale = step.named_steps["impute"], step.named_steps["scale"]
            for i, name in enumerate(columns):
                stats[name] = {"impute": float(impute.statistics_[i]), "mean": float(scale.mean_[i]), "scale": float(scale.scale_[i])}
        elif kind == "boolean":
            stats.update({name: {"impute": float(step.statistics_[i])} for i, name in enumerate(columns)})
        elif kind == "categorical":
            stats.update({name: {"categories": [str(c) for c in step.categories_[i]]} for i, name in enumerate(columns)})
    return stats


class TabularPreprocessor:
    """A run's fitted ColumnTransformer with its schema: raw typed rows -> (N, F) float32 model input."""

    def __init__(self, schema: TabularSchema, transformer: Any):
        self.schema = schema
        self.transformer = transformer
        self.feature_names = [str(n) for n in transformer.get_feature_names_out()]

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @classmethod
    def fit(cls, data: TabularData) -> TabularPreprocessor:
        """Fit on the training split only."""
        return cls(data.schema, build_transformer(data.schema).fit(data.frames["train"]))

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """(N, columns) typed frame -> (N, n_features) float32."""
        return np.ascontiguousarray(self.transformer.transform(frame), dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """What summary.json records under ``preprocessing`` (the files hold the rest)."""
        return {"kind": "tabular", "schema": SCHEMA_FILE, "preprocessor": PREPROCESSOR_FILE, "n_features": self.n_features}

    def save(self, run_dir: str | Path) -> None:
        """Write preprocessor.joblib and schema.json (column order, types, fitted statistics, sha256)."""
        import joblib

        from pixelmill.runs import write_atomic

        run_dir = Path(run_dir)
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{PREPROCESSOR_FILE}.")
        os.close(fd)
        try:
            joblib.dump(self.transformer, tmp)
            os.replace(tmp, run_dir / PREPROCESSOR_FILE)
        finally:
            Path(tmp).unlink(missing_ok=True)
        sha256 = hashlib.sha256((run_dir / PREPROCESSOR_FILE).read_bytes()).hexdigest()
        write_atomic(run_dir / SCHEMA_FILE, json.dumps(self.schema_document(sha256), indent=2) + "\n")

    def schema_document(self, sha256: str) -> dict[str, Any]:
        """schema.json: everything an exporter needs to rebuild the transformer, column by column."""
        import sklearn

        stats = _fitted_stats(self.transformer)
        s = self.schema
        return {
            "format": SCHEMA_FORMAT,
            "target": s.target,
            "classes": s.classes,
            "columns": [{"name": n, "type": t, "source": s.sources.get(n, "inferred"), **stats.get(n, {})} for n, t in s.columns.items()],
            "ignored": s.ignored,
            "missing_values": sorted(MISSING_VALUES),
            "boolean_values": {"true": [*TRUE_VALUES, "1"], "false": [*FALSE_VALUES, "0"]},
            "missing_category": MISSING_CATEGORY,
            "features_out": self.feature_names,
            "preprocessor": {
                "file": PREPROCESSOR_FILE,
                "sha256": sha256,
                "sklearn": sklearn.__version__,
                "steps": {
                    "numeric": ["SimpleImputer(strategy=median)", "StandardScaler()"],
                    "boolean": ["SimpleImputer(strategy=most_frequent)"],
                    "categorical": ["OneHotEncoder(handle_unknown=ignore)"],
                },
            },
        }

    @classmethod
    def load(cls, run_dir: str | Path) -> TabularPreprocessor:
        """Load a run's preprocessor after checking its sha256 against schema.json."""
        import joblib

        run_dir = Path(run_dir)
        doc = read_schema_file(run_dir)
        path = run_dir / PREPROCESSOR_FILE
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != doc["preprocessor"]["sha256"]:
            raise RunError(f"'{path}' is missing or does not match {SCHEMA_FILE} (sha256); the run directory was modified, retrain")
        return cls(read_schema(run_dir), joblib.load(path))


def read_schema_file(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SCHEMA_FILE
    if not path.is_file():
        raise RunError(f"'{path}' does not exist; this run never finished preparing its tabular data")
    return json.loads(path.read_text(encoding="utf-8"))


def read_schema(run_dir: str | Path) -> TabularSchema:
    """The schema a tabular run was trained with."""
    doc = read_schema_file(run_dir)
    columns = {c["name"]: c["type"] for c in doc["columns"]}
    sources = {c["name"]: c.get("source", "inferred") for c in doc["columns"]}
    return TabularSchema(doc["target"], list(doc["classes"]), columns, list(doc.get("ignored", [])), sources)
