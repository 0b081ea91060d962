"""``pixelmill predict`` for image models: files, folders and globs in, one row per file out (errors in place)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pixelmill.inference.predictor import expand_inputs, write_predictions
from pixelmill.tasks.base import PredictionTable


def predict_inputs(
    predictor: Any, inputs: list[str], top_k: int, batch_size: int, out: Path | None, on_progress: Callable[[int, int], None] | None
) -> PredictionTable:
    """Predict every image ``inputs`` names; write ``out`` (.csv or .json) when given. Unreadable files get a row with the error."""
    rows = predictor.predict_files(expand_inputs(inputs), top_k, batch_size, on_progress=on_progress)
    if out is not None:
        write_predictions(rows, out, predictor.classes)
    table = []
    for row in rows:
        p = row.prediction
        if p is None:
            table.append([row.source, "[red]error[/]", "", row.error or ""])
        else:
            table.append([row.source, p.label, f"{p.confidence:.4f}", ", ".join(f"{k} {v:.3f}" for k, v in p.top_k)])
    return PredictionTable(["input", "label", "confidence", f"top-{top_k}"], table, failed=sum(r.error is not None for r in rows))
