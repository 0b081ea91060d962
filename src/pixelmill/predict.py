"""``Predictor``: one object that predicts from a run, a bundle or a registered model.

A run directory runs its checkpoint in PyTorch; a bundle runs ``model.onnx`` in ONNX
Runtime (or ``model.pt`` in TorchScript). Either way the pixels come from
``pixelmill.data.preprocess.to_model_input``, so every route gives the same answer.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from pixelmill.data.preprocess import Preprocessing
from pixelmill.errors import ConfigError, ModelError, PixelmillError
from pixelmill.inference import OnnxClassifier, Prediction, prepare_image, to_predictions
from pixelmill.tabular_inference import OnnxTabularClassifier, TabularSchemaView, rows_from_frame, rows_from_records

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
_GLOB_CHARS = set("*?[")


@dataclass
class PredictionRow:
    """One input of ``predict_files``: its prediction, or the reason it could not be read."""

    source: str
    prediction: Prediction | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        base: dict[str, Any] = {"source": self.source, "error": self.error}
        if self.prediction is None:
            return base | {"label": None, "confidence": None, "top_k": [], "probabilities": {}}
        return base | self.prediction.to_dict()


class TorchClassifier:
    """A run's checkpoint in eager PyTorch, behind the same interface as ``OnnxClassifier``."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best") -> None:
        import torch

        from pixelmill import runs
        from pixelmill.config import load_saved
        from pixelmill.export.onnx import UInt8Classifier
        from pixelmill.models import create_model
        from pixelmill.training.checkpoint import load_net

        run_dir = runs.resolve_run_dir(run_dir)
        summary = runs.read_summary(run_dir)
        if not summary.get("classes") or "preprocessing" not in summary:
            raise ModelError(f"'{run_dir}' has no classes/preprocessing in summary.json; it never started training")
        cfg = load_saved(run_dir / runs.CONFIG)
        self.classes: list[str] = list(summary["classes"])
        self.preprocessing = Preprocessing.from_dict(summary["preprocessing"])
        net = create_model(cfg.model.name, len(self.classes), in_chans=self.preprocessing.channels)
        net = load_net(net, runs.checkpoint_path(run_dir, checkpoint))
        self._model = UInt8Classifier(net, self.preprocessing).eval()
        self._torch = torch

    def prepare(self, image: Any) -> np.ndarray:
        return prepare_image(image, self.preprocessing)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, num_classes) float32."""
        with self._torch.inference_mode():
            return self._model(self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))).numpy()

    def predict(self, images: list, top_k: int = 5) -> list[Prediction]:
        return to_predictions(self.run(np.stack([self.prepare(i) for i in images])), self.classes, top_k) if images else []


class TorchTabularClassifier:
    """A tabular run's checkpoint: the fitted ColumnTransformer + eager MLP, behind ``OnnxTabularClassifier``'s interface."""

    def __init__(self, run_dir: str | Path, checkpoint: str = "best") -> None:
        import torch

        from pixelmill.export.tabular import _load

        _, self._prep, self._net, schema_doc = _load(Path(run_dir), checkpoint)
        self.schema = TabularSchemaView(schema_doc)
        self.classes = list(self.schema.classes)
        self.preprocessing = {"kind": "tabular"}
        self._torch = torch

    def run(self, rows: np.ndarray) -> np.ndarray:
        """(N,) structured rows -> (N, num_classes) float32, through scikit-learn then PyTorch."""
        import pandas as pd

        frame = pd.DataFrame({
            name: rows[name].astype(object) if kind == "categorical" else rows[name].astype(np.float64)
            for name, kind in self.schema.columns.items()
        })
        with self._torch.inference_mode():
            logits = self._net(self._torch.from_numpy(self._prep.transform(frame)))
            return self._torch.softmax(logits.float(), dim=1).numpy()

    def predict_records(self, records: Sequence[Any], top_k: int = 5) -> list[Prediction]:
        return to_predictions(self.run(rows_from_records(records, self.schema)), self.classes, top_k) if records else []


def expand_inputs(inputs: Iterable[str | Path]) -> list[str]:
    """Files, folders (searched recursively for images) and globs -> a list of file paths.

    A path that neither exists nor matches is kept, so that its row reports the problem.
    """
    out: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists() or not (_GLOB_CHARS & set(str(item))):
            out.append(str(path))
        else:
            matches = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            out += matches or [str(item)]
    return out


def _load_classifier(model: str | Path, tracking_uri: str | None, checkpoint: str, threads: int | None):
    from pixelmill import runs
    from pixelmill.export.bundle import is_bundle_dir, read_bundle

    text = str(model)
    if text.startswith("models:/"):
        from pixelmill.registry import resolve_model

        model = resolve_model(text, tracking_uri=tracking_uri)
    path = Path(model).expanduser()
    if is_bundle_dir(path):
        bundle = read_bundle(path)
        if bundle.kind == "tabular":
            return OnnxTabularClassifier(bundle, intra_op_threads=threads)
        if bundle.model_format == "torchscript":
            from pixelmill.export.torchscript import TorchScriptClassifier

            return TorchScriptClassifier(bundle)
        return OnnxClassifier(bundle, intra_op_threads=threads)
    if (path / runs.CONFIG).is_file():
        if runs.read_summary(path).get("preprocessing", {}).get("kind") == "tabular":
            return TorchTabularClassifier(path, checkpoint)
        return TorchClassifier(path, checkpoint)
    raise ModelError(f"'{model}' is not a run directory, a bundle directory or a models:/NAME@ALIAS URI")


class Predictor:
    """Predict labels for images with any pixelmill model.

    >>> Predictor.load("runs/default/my-run/bundle").predict(["a.png", pil_image, array])
    """

    def __init__(self, classifier: Any, source: str) -> None:
        self.classifier = classifier
        self.source = source

    @classmethod
    def load(
        cls, model: str | Path, tracking_uri: str | None = None, checkpoint: str = "best", threads: int | None = None
    ) -> Predictor:
        """A run directory (PyTorch checkpoint), a bundle directory, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``."""
        return cls(_load_classifier(model, tracking_uri, checkpoint, threads), str(model))

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.classifier.preprocessing

    @property
    def kind(self) -> str:
        """``"tabular"`` for a model trained on a CSV, else ``"image"``."""
        return "tabular" if hasattr(self.classifier, "schema") else "image"

    def predict_records(self, records: Sequence[dict[str, Any]], top_k: int = 5) -> list[Prediction]:
        """Tabular models: JSON-like records (column -> value) -> one Prediction each; DataError names a bad column."""
        self._need("tabular", "predict_records")
        return self.classifier.predict_records(list(records), top_k)

    def predict_csv(self, path: str | Path, top_k: int = 5, batch_size: int = 1024) -> list[TableRow]:
        """Tabular models: every row of a CSV (read as strictly as training read it; the target column is optional)."""
        from pixelmill.data.tabular import TabularSchema, read_csv, typed_features

        self._need("tabular", "predict_csv")
        view = self.classifier.schema
        table = read_csv(path)
        schema = TabularSchema(view.target, view.classes, view.columns, list(view.doc.get("ignored", [])))
        rows = rows_from_frame(typed_features(table, schema), view)
        sources = [f"{table.path.name}:{line}" for line in table.lines]
        out: list[TableRow] = []
        for start in range(0, len(rows), max(1, batch_size)):
            probs = self.classifier.run(rows[start : start + max(1, batch_size)])
            out += [TableRow(start + i + 1, sources[start + i], p) for i, p in enumerate(to_predictions(probs, self.classes, top_k))]
        return out

    def _need(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise ModelError(f"{what} needs a {kind} model; '{self.source}' is a {self.kind} model")

    def predict(self, images: Sequence[Any], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Paths, PIL images or NumPy arrays -> one Prediction each; an unreadable image raises DataError."""
        if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getpixel"):
            images = [images]
        out: list[Prediction] = []
        for start in range(0, len(images), max(1, batch_size)):
            chunk = images[start : start + max(1, batch_size)]
            batch = np.stack([self.classifier.prepare(img) for img in chunk])
            out += to_predictions(self.classifier.run(batch), self.classes, top_k)
        return out

    def predict_files(
        self,
        inputs: Iterable[str | Path],
        top_k: int = 5,
        batch_size: int = 32,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[PredictionRow]:
        """Expand files/folders/globs and predict each; unreadable files get a row with the error.

        An ONNX bundle runs one batch per core side by side, each on one thread (a second,
        one-thread session unless the predictor was loaded with ``threads=1``); other models
        decode in threads one batch ahead of the model. ``on_progress(done, total)`` is
        called after every batch.
        """
        files = expand_inputs(inputs)
        rows = [PredictionRow(source=f) for f in files]
        workers = _cores()
        single = getattr(self.classifier, "single_threaded", None)
        if single is not None and workers > 1 and len(rows) > 1:
            self._predict_per_core(single(), rows, top_k, batch_size, workers, on_progress)
            return rows
        size = max(1, batch_size)
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        # Decoding runs in threads (Pillow releases the GIL), one batch ahead of inference, so
        # JPEG decoding overlaps the model instead of adding to it.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pixelmill-decode") as pool:
            pending = [pool.submit(self._prepare_row, row) for row in chunks[0]] if chunks else []
            for k, chunk in enumerate(chunks):
                prepared = [f.result() for f in pending]
                pending = [pool.submit(self._prepare_row, row) for row in chunks[k + 1]] if k + 1 < len(chunks) else []
                self._run_rows(self.classifier, chunk, prepared, top_k)
                if on_progress:
                    on_progress(min((k + 1) * size, len(rows)), len(rows))
        return rows

    def _predict_per_core(
        self, classifier: Any, rows: list[PredictionRow], top_k: int, batch_size: int, workers: int,
        on_progress: Callable[[int, int], None] | None,
    ) -> None:
        """One thread per core, each decoding a batch and running it on a one-thread session.

        Nothing waits on anything else: no intra-op barriers, no hand-over between decoding
        and inference (measured in benchmarks/CHANGES.md: fewer CPU seconds per image than
        decoding ahead of one multi-threaded session).
        """
        size = max(1, min(batch_size, -(-len(rows) // workers)))  # every core gets work on small inputs
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]

        def run(chunk: list[PredictionRow]) -> int:
            self._run_rows(classifier, chunk, [self._prepare_row(row) for row in chunk], top_k)
            return len(chunk)

        done = 0
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pixelmill-predict") as pool:
            for future in as_completed([pool.submit(run, chunk) for chunk in chunks]):
                done += future.result()
                if on_progress:
                    on_progress(done, len(rows))

    def _run_rows(self, classifier: Any, chunk: list[PredictionRow], prepared: list[np.ndarray | None], top_k: int) -> None:
        """Run the readable rows of ``chunk`` as one batch and attach their predictions."""
        ready = [(row, arr) for row, arr in zip(chunk, prepared) if arr is not None]
        if ready:
            probs = classifier.run(np.stack([arr for _, arr in ready]))
            for (row, _), pred in zip(ready, to_predictions(probs, self.classes, top_k)):
                row.prediction = pred

    def _prepare_row(self, row: PredictionRow) -> np.ndarray | None:
        """The row's model input, or None with ``row.error`` set."""
        try:
            return self.classifier.prepare(row.source)
        except PixelmillError as exc:
            row.error = str(exc)
            return None


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class TableRow:
    """One CSV row's prediction: its 1-based row number and 'file.csv:LINE' (the id evaluation uses)."""

    row: int
    source: str
    prediction: Prediction


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


def write_predictions(rows: list[PredictionRow], out: str | Path, classes: Sequence[str]) -> Path:
    """Write rows as CSV (one probability column per class) or JSON, chosen by the file suffix."""
    out = Path(out)
    writers = {".csv": _write_csv, ".json": _write_json}
    if out.suffix.lower() not in writers:
        raise ConfigError(f"cannot write predictions to '{out}'; use a .csv or .json file")
    out.parent.mkdir(parents=True, exist_ok=True)
    writers[out.suffix.lower()](rows, out, classes)
    return out


def _write_csv(rows: list[PredictionRow], out: Path, classes: Sequence[str]) -> None:
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "label", "confidence", "error", *(f"p_{c}" for c in classes)])
        for row in rows:
            p = row.prediction
            probs = [f"{p.probabilities[c]:.6f}" for c in classes] if p else [""] * len(classes)
            writer.writerow([row.source, p.label if p else "", f"{p.confidence:.6f}" if p else "", row.error or "", *probs])


def _write_json(rows: list[PredictionRow], out: Path, classes: Sequence[str]) -> None:
    out.write_text(json.dumps({"classes": list(classes), "predictions": [r.to_dict() for r in rows]}, indent=2) + "\n")


__all__ = [
    "Predictor", "PredictionRow", "TableRow", "TorchClassifier", "TorchTabularClassifier", "expand_inputs",
    "write_predictions", "write_table_predictions",
]
