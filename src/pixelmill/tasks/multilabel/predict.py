"""``pixelmill predict`` for multi-label models: one row per image with its label set and every label's probability."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

from pixelmill.errors import ConfigError
from pixelmill.inference.predictor import PredictionRow, expand_inputs
from pixelmill.tasks.base import PredictionTable


def predict_inputs(
    predictor: Any, inputs: list[str], top_k: int, batch_size: int, out: Path | None, on_progress: Callable[[int, int], None] | None
) -> PredictionTable:
    """Predict every image ``inputs`` names; write ``out`` (.csv or .json) when given. Unreadable files get a row with the error."""
    if out is not None and Path(out).suffix.lower() not in (".csv", ".json"):
        raise ConfigError(f"cannot write predictions to '{out}'; use a .csv or .json file")
    rows = predictor.predict_files(expand_inputs(inputs), top_k, batch_size, on_progress=on_progress)
    if out is not None:
        write_label_sets(rows, Path(out), predictor.classes)
    table = []
    for row in rows:
        p = row.prediction
        if p is None:
            table.append([row.source, "[red]error[/]", row.error or ""])
        else:
            table.append([row.source, "|".join(p.labels) or "-", ", ".join(f"{k} {v:.3f}" for k, v in p.top_k)])
    return PredictionTable(["input", "labels", f"top-{top_k}"], table, failed=sum(r.error is not None for r in rows))


def write_label_sets(rows: list[PredictionRow], out: Path, classes: list[str]) -> Path:
    """CSV: source, labels (``|``-joined), error, one ``p_<label>`` column per label; JSON: every prediction's dict."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps({"classes": list(classes), "predictions": [r.to_dict() for r in rows]}, indent=2) + "\n")
        return out
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "labels", "error", *(f"p_{c}" for c in classes)])
        for row in rows:
            p = row.prediction
            probs = [f"{p.probabilities[c]:.6f}" for c in classes] if p else [""] * len(classes)
            writer.writerow([row.source, "|".join(p.labels) if p else "", row.error or "", *probs])
    return out
