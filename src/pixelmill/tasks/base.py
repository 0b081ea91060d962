"""The task seam: what differs between kinds of prediction, behind one protocol and one registry.

A task is registered by name (``@register_task``, a plain dict like timm's model registry).
The name is the value of ``data.kind`` that selects it and the ``kind`` written into
``bundle.json``, so a run directory and a bundle both say which task reads them.

Everything shared (the run directory, trackers, checkpoints, resume, bundle hashing,
the registry, the dynamic batcher, limits) knows no task by name: it asks the task.

The protocol has a training side (PyTorch, imported lazily inside the methods) and a
runtime side (ONNX Runtime + NumPy, torch-free) that ``predict`` and ``serve`` use:

training side                              runtime side (no torch)
- ``load_data(cfg, run_dir)``              - ``runtime(bundle, ...)``: the model behind predict/serve
- ``new_model(cfg, data)``                 - ``serving()``: request/response codecs of the routes
- ``saved_model(cfg, summary, run_dir)``   - ``split_outputs(outputs, sizes)``: one request's rows
- ``datamodule(cfg, data, prep)``            of a dynamically batched result
- ``lightning_module(cfg, net, data)``
- ``probabilities(logits)``: head activation
- ``evaluation_data(...)``, ``evaluate(...)``
- ``export(run, ...)``: ONNX + parity check + the bundle's output contract
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

from pixelmill.errors import ConfigError

if TYPE_CHECKING:  # annotations only: this module must stay importable without torch
    from pixelmill.export.bundle import Bundle
    from pixelmill.runs import LoadedRun, RunSummary


class Task:
    """One kind of prediction. Subclass, set ``name``, implement the methods, decorate with ``@register_task``."""

    name: ClassVar[str]  # data.kind value and bundle.json "kind"
    title: ClassVar[str]  # for people: "image classification"
    sample_noun: ClassVar[str] = "images"  # what one input is called in logs, reports and errors
    monitors: ClassVar[tuple[str, ...]] = ("val/acc", "val/loss", "val/f1_macro", "val/auc_macro")  # what trainer.monitor may name
    default_monitor: ClassVar[str] = "val/acc"  # trainer.monitor=auto

    # ---- data -------------------------------------------------------------------------
    def recognises(self, path: Path) -> bool:
        """Whether the data at ``path`` is unmistakably this task's, so ``data.kind`` may be left out (cheap, torch-free)."""
        return False

    def load_data(self, cfg: Any, run_dir: Path | None = None) -> Any:
        """The run's data, split: an object with ``classes``, ``splits``, ``fingerprint``, ``to_summary()``.

        ``run_dir`` is given when a trained run reads its data again (resume, evaluate, export).
        """
        raise NotImplementedError

    def check_data(self, cfg: Any, data: Any) -> None:
        """Before training: raise ConfigError/DataError when the evaluation settings cannot work on ``data``
        (a threshold rule the val split cannot meet, calibration on one class). Nothing by default."""

    def evaluation_data(self, cfg: Any, run_dir: Path, classes: list[str], split: str, other: Path | None) -> tuple[Any, str]:
        """(data, name) to evaluate: a split of the run's data, or ``other`` (a folder or file) mapped onto ``classes``."""
        raise NotImplementedError

    # ---- model ------------------------------------------------------------------------
    def check_model(self, cfg: Any) -> None:
        """Raise ConfigError when ``cfg.model.name`` cannot take this task's inputs."""

    def new_model(self, cfg: Any, data: Any) -> tuple[Any, Any]:
        """(network, preprocessing) for a new run; the preprocessing is fitted or read off the network."""
        raise NotImplementedError

    def save_preprocessing(self, run_dir: Path, prep: Any) -> None:
        """Write what the preprocessing needs beside ``summary.json`` (nothing, for most tasks)."""

    def saved_model(self, cfg: Any, summary: RunSummary, run_dir: Path) -> tuple[Any, Any]:
        """(network without trained weights, preprocessing) of a run that exists."""
        raise NotImplementedError

    # ---- training ---------------------------------------------------------------------
    def datamodule(self, cfg: Any, data: Any, prep: Any) -> Any:
        """The LightningDataModule over ``data``."""
        raise NotImplementedError

    def lightning_module(self, cfg: Any, net: Any, data: Any) -> Any:
        """The LightningModule around ``net``: loss, metrics, optimizer."""
        raise NotImplementedError

    def probabilities(self, logits: Any) -> Any:
        """The head activation: (N, outputs) logits -> what the bundle returns."""
        raise NotImplementedError

    # ---- evaluation ---------------------------------------------------------------------
    def choose_operating_point(self, run_dir: Path, net: Any, data: Any, prep: Any, cfg: Any) -> None:
        """After training, before evaluation: fit what turns probabilities into decisions on the
        validation split and save it with the run (multi-label: one threshold per label). Nothing by default."""

    def evaluate(self, run_dir: Path, net: Any, data: Any, prep: Any, split: str, cfg: Any) -> dict[str, Any]:
        """Run ``net`` over one split, write ``RUN_DIR/eval/<split>/``; return the metrics."""
        raise NotImplementedError

    # ---- export -------------------------------------------------------------------------
    export_formats: ClassVar[tuple[str, ...]] = ("onnx",)  # what ``pixelmill export --format`` may ask for
    quantizable: ClassVar[bool] = False  # whether ``--quantize int8`` applies

    def check_export(self, fmt: str, quantize: str | None) -> None:
        """ConfigError when this task cannot export as ``fmt`` (quantised or not)."""
        if fmt not in self.export_formats or (quantize and not self.quantizable):
            allowed = " or ".join(self.export_formats) + (" (int8 too)" if self.quantizable else ", float only")
            raise ConfigError(f"a {self.title} run exports to {allowed}; drop --format/--quantize")

    def export(self, run: LoadedRun, out: Path, fmt: str, quantize: str | None, options: dict[str, Any]) -> Bundle:
        """Write a bundle of ``run`` to ``out`` after checking it against PyTorch; BundleError when it disagrees."""
        raise NotImplementedError

    # ---- runtime (torch-free) ---------------------------------------------------------------
    def runtime(self, bundle: Bundle, intra_op_threads: int | None = None, inter_op_threads: int | None = None, *, providers: list[str] | None = None) -> Any:
        """The object ``predict`` and ``serve`` run: ``run(batch) -> outputs``, ``classes``, ``warmup_batch()``, ``input_shape``.

        ``providers``: the ONNX Runtime execution providers wanted, in order (None: CPU only);
        an ONNX runtime exposes those its session uses as ``providers``.
        """
        raise NotImplementedError

    def eager_runtime(self, run_dir: Path, checkpoint: str) -> Any:
        """A run's checkpoint in eager PyTorch behind the interface of ``runtime``."""
        raise NotImplementedError

    def serving(self) -> Any:
        """The request/response codecs of ``pixelmill serve`` for this task (a module or object)."""
        raise NotImplementedError

    def split_outputs(self, outputs: Any, sizes: Sequence[int]) -> list[Any]:
        """One batched result -> one part per request, ``sizes[i]`` rows each (the dynamic batcher's split)."""
        return split_along_batch(outputs, sizes)

    def join_inputs(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Several requests' inputs -> one batch (the dynamic batcher's concatenation)."""
        return join_along_batch(parts)

    def predict_inputs(self, predictor: Any, inputs: list[str], top_k: int, batch_size: int, out: Path | None, on_progress: Any) -> Any:
        """``pixelmill predict``: the inputs named on the command line -> a :class:`PredictionTable` (and ``out`` written)."""
        raise NotImplementedError


def split_along_batch(outputs: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """(B, ...) -> parts of ``sizes`` rows: the split of a task whose output is one array with a row per input."""
    bounds = np.cumsum([0, *sizes])
    return [outputs[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


def join_along_batch(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Inputs of several requests -> one (B, ...) batch (images and structured table rows alike)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class PredictionTable:
    """What ``pixelmill predict`` shows: column names, one row of text per input, and how many failed."""

    columns: list[str]
    rows: list[list[str]]
    failed: int = 0


TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``data.kind=<cls.name>`` and to bundles of that kind."""
    if cls.name in TASKS:
        raise ValueError(f"task '{cls.name}' is registered twice")
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    """The registered task called ``name``; ConfigError listing the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task '{name}' (data.kind); choose one of: {', '.join(TASKS)}") from None


def task_for_config(cfg: Any) -> Task:
    """The task a run config selects (``data.kind``)."""
    return get_task(str(cfg.data.kind))


