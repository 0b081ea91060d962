"""``Predictor``: one object that predicts from a run, a bundle or a registered model.

The model's task (``pixelmill.tasks``) supplies the runtime: a run directory runs its
checkpoint in eager PyTorch (imported only then); a bundle runs ``model.onnx`` in ONNX
Runtime (or ``model.pt`` in TorchScript). Image pixels come from
``pixelmill.data.preprocess.to_model_input`` either way, so every route gives the same answer.
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

from pixelmill import runs
from pixelmill.data.files import IMAGE_EXTENSIONS
from pixelmill.data.preprocess import Preprocessing
from pixelmill.errors import ConfigError, ModelError, PixelmillError
from pixelmill.export.bundle import is_bundle_dir, read_bundle
from pixelmill.inference.session import Prediction, to_predictions
from pixelmill.tasks import TASKS, Task, task_for_config

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


def _load_runtime(model: str | Path, tracking_uri: str | None, checkpoint: str, threads: int | None) -> tuple[Any, Task]:
    """(the task's runtime over ``model``, the task): a bundle on ONNX Runtime, a run directory in eager PyTorch."""
    from pixelmill.config import load_saved

    text = str(model)
    if text.startswith("models:/"):
        from pixelmill.model_registry import resolve_model

        model = resolve_model(text, tracking_uri=tracking_uri)
    path = Path(model).expanduser()
    if is_bundle_dir(path):
        bundle = read_bundle(path)
        if bundle.kind not in TASKS:
            raise ModelError(f"bundle {path} is a {bundle.kind} model; this pixelmill reads {', '.join(TASKS)} bundles")
        task = TASKS[bundle.kind]
        return task.runtime(bundle, intra_op_threads=threads), task
    if (path / runs.CONFIG).is_file():
        task = task_for_config(load_saved(path / runs.CONFIG))
        return task.eager_runtime(path, checkpoint), task
    raise ModelError(f"'{model}' is not a run directory, a bundle directory or a models:/NAME@ALIAS URI")


class Predictor:
    """Predict labels for images with any pixelmill model.

    >>> Predictor.load("runs/default/my-run/bundle").predict(["a.png", pil_image, array])
    """

    def __init__(self, classifier: Any, source: str, task: Task) -> None:
        self.classifier = classifier  # the task's runtime
        self.source = source
        self.task = task

    @classmethod
    def load(
        cls, model: str | Path, tracking_uri: str | None = None, checkpoint: str = "best", threads: int | None = None
    ) -> Predictor:
        """A run directory (PyTorch checkpoint), a bundle directory, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``."""
        classifier, task = _load_runtime(model, tracking_uri, checkpoint, threads)
        return cls(classifier, str(model), task)

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.classifier.preprocessing

    @property
    def kind(self) -> str:
        """The model's task name (``data.kind``): ``"image"``, ``"tabular"``, ..."""
        return self.task.name

    def predict_records(self, records: Sequence[dict[str, Any]], top_k: int = 5) -> list[Prediction]:
        """Models of table rows: JSON-like records (column -> value) -> one Prediction each; DataError names a bad column."""
        return self._runtime_with("predict_records", "predict_records").predict_records(list(records), top_k)

    def predict_csv(self, path: str | Path, top_k: int = 5, batch_size: int = 1024) -> list[Any]:
        """Models of table rows: every row of a CSV (read as strictly as training read it; the target column is optional)."""
        return self._runtime_with("predict_csv", "predict_csv").predict_csv(path, top_k, batch_size)

    def _runtime_with(self, attribute: str, what: str) -> Any:
        """The runtime, if it has ``attribute``; ModelError naming the model's task otherwise."""
        if not hasattr(self.classifier, attribute):
            raise ModelError(f"{what} does not apply to '{self.source}', a {self.task.title} model")
        return self.classifier

    def predict(self, images: Sequence[Any], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Paths, PIL images or NumPy arrays -> one Prediction each; an unreadable image raises DataError."""
        if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getpixel"):
            images = [images]
        runtime = self._runtime_with("prepare", "predict")
        out: list[Prediction] = []
        for start in range(0, len(images), max(1, batch_size)):
            chunk = images[start : start + max(1, batch_size)]
            batch = np.stack([runtime.prepare(img) for img in chunk])
            out += self.decode(runtime.run(batch), top_k)
        return out

    def decode(self, outputs: np.ndarray, top_k: int = 5) -> list[Prediction]:
        """The model's outputs -> predictions: its runtime's own decisions (multi-label: label sets at its thresholds), else top-k."""
        decode = getattr(self.classifier, "decode", None)
        return decode(outputs, top_k) if decode is not None else to_predictions(outputs, self.classes, top_k)

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
            for (row, _), pred in zip(ready, self.decode(probs, top_k)):
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


__all__ = ["PredictionRow", "Predictor", "expand_inputs", "write_predictions"]
