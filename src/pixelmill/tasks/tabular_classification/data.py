"""Tabular classification data: typed CSV rows, split, checked against the run's saved schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixelmill.data.tabular import TabularData, load_csv_for_eval, load_tabular
from pixelmill.data.tabular_preprocess import read_schema
from pixelmill.errors import ConfigError, DataError


def load_rows(cfg: Any, run_dir: Path | None = None) -> TabularData:
    """The run's CSV rows, typed by ``run_dir``'s saved schema when given (else inferred)."""
    if cfg.data.get("group_column"):
        raise ConfigError("data.group_column applies to image manifests; for tabular data split the CSV by group into train.csv/val.csv/test.csv")
    return load_tabular(cfg.data, cfg.seed, schema=read_schema(run_dir) if run_dir else None)


def evaluation_rows(cfg: Any, run_dir: Path, split: str, other: Path | None) -> tuple[TabularData, str]:
    """(rows, name) to evaluate: a split of the run's data, or any CSV with its columns and target."""
    if other is not None:
        rows = load_csv_for_eval(other, read_schema(run_dir))
        return rows, next(iter(rows.splits))
    rows = load_rows(cfg, run_dir)
    if not rows.splits.get(split):
        raise DataError(f"the run's data has no '{split}' rows; pick --split val or pass --data FILE.csv")
    return rows, split
