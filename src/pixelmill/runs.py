"""Run directories: layout, naming, the summary file, listing and comparing.

A run directory is the source of truth for one run; trackers mirror it::

    runs/<experiment>/<run>/
        config.yaml  summary.json  metrics.csv  train.log
        checkpoints/best.ckpt  checkpoints/last.ckpt
        eval/<split>/...  plots/  report.html
        threshold.json (binary)  thresholds.json (multi-label)  calibration.json  splits.csv
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pydantic import BaseModel, ConfigDict

from pixelmill.errors import RunError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from pixelmill.tasks import Task

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
CHECKPOINTS = "checkpoints"
THRESHOLD = "threshold.json"  # a binary model's operating point (eval.threshold): positive class and threshold


def default_run_name() -> str:
    """A sortable, unique name: ``20261123-101500-3fa2``."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


SPLITS_FILE = "splits.csv"  # RUN_DIR/splits.csv: where every sample of the run went


def write_splits(run_dir: Path, data: Any) -> Path:
    """Write ``RUN_DIR/splits.csv`` from the run's data (``split_table()``: header and one row per sample)."""
    import csv
    import io

    header, rows = data.split_table()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_atomic(Path(run_dir) / SPLITS_FILE, buffer.getvalue())
    return Path(run_dir) / SPLITS_FILE


def read_decision(run_dir: Path) -> tuple[str, float] | None:
    """(positive class, threshold) of a binary run; None for other runs (and binary runs trained before thresholds)."""
    path = Path(run_dir) / THRESHOLD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return str(record["positive"]), float(record["threshold"])


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions(*modules: str) -> dict[str, str]:
    """pixelmill's, Python's and each named module's version, for summaries and bundles."""
    import importlib
    import platform

    from pixelmill import __version__

    found = {"pixelmill": __version__, "python": platform.python_version()}
    for name in modules:
        found[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
    return found


class BestEpoch(BaseModel):
    """The epoch the monitored metric liked best, and its metrics."""

    model_config = ConfigDict(extra="allow")

    epoch: Optional[int] = None
    metrics: dict[str, Any] = {}


class RunSummary(BaseModel):
    """``summary.json``: what a run is, how far it got and how good it is.

    Written field by field as the run goes (``update_summary``); every field is optional so
    that a run killed at any moment still reads. Unknown fields are kept (newer pixelmill).
    """

    model_config = ConfigDict(extra="allow")

    run_name: Optional[str] = None
    experiment: Optional[str] = None
    model: Optional[str] = None
    task: Optional[str] = None
    status: str = "unknown"
    created_at: Optional[str] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    pid: Optional[int] = None
    error: Optional[str] = None
    classes: list[str] = []
    preprocessing: Optional[dict[str, Any]] = None  # the task's own record (image: size, mean, std, ...)
    data: dict[str, Any] = {}  # the task's data summary: counts, skipped files, fingerprint
    versions: dict[str, str] = {}
    durations: dict[str, float] = {}
    trackers: Optional[dict[str, Any]] = None
    epochs_completed: int = 0
    tracked_epochs: int = 0
    best: Optional[BestEpoch] = None
    eval: dict[str, dict[str, Any]] = {}  # split -> headline metrics
    tuned: dict[str, Any] = {}  # the values the finders chose for `auto` keys: {"optim.lr": 0.00251, "data.batch_size": 256}

    @property
    def fingerprint(self) -> Optional[str]:
        return self.data.get("fingerprint")

    @property
    def started_training(self) -> bool:
        """Whether the run got as far as knowing its classes and preprocessing."""
        return bool(self.classes) and self.preprocessing is not None


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``summary.json`` as written (an empty dict before the run wrote one); see :func:`load_summary` for the typed record."""
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}


def load_summary(run_dir: Path) -> RunSummary:
    """``summary.json`` as a typed :class:`RunSummary`."""
    return RunSummary.model_validate(read_summary(run_dir))


def update_summary(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``summary.json`` (atomically) and return the result."""
    summary = read_summary(run_dir)
    summary.update(fields)
    write_atomic(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def resolve_run_dir(path: str | Path) -> Path:
    """A run directory that exists and holds a config, or a ``RunError`` saying what is wrong."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise RunError(f"run directory '{run_dir}' does not exist; list runs with 'pixelmill runs list'")
    if not (run_dir / CONFIG).is_file():
        raise RunError(f"'{run_dir}' is not a pixelmill run directory (no {CONFIG})")
    return run_dir


def checkpoint_path(run_dir: Path, which: str = "best") -> Path:
    """``best``, ``last`` or a path -> an existing checkpoint file."""
    path = Path(run_dir) / CHECKPOINTS / f"{which}.ckpt" if which in ("best", "last") else Path(which)
    if not path.is_file():
        raise RunError(f"no checkpoint '{which}' at '{path}'; the run may not have finished an epoch yet")
    return path


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(summary: RunSummary) -> str:
    """finished / failed / interrupted / running, or killed for a running run whose process is gone."""
    if summary.status == "running" and not pid_alive(summary.pid):
        return "killed"
    return summary.status


def list_runs(output_dir: str | Path = "runs", experiment: str | None = None) -> list[Path]:
    """Run directories under ``output_dir``, oldest first."""
    root = Path(output_dir)
    pattern = f"{experiment}/*/{CONFIG}" if experiment else f"*/*/{CONFIG}"
    return sorted((p.parent for p in root.glob(pattern)), key=lambda p: (p.stat().st_mtime, str(p)))


def describe(run_dir: Path) -> dict[str, Any]:
    """One row for run tables: identity, status, best and test metrics, duration."""
    summary = load_summary(run_dir)
    best = summary.best.metrics if summary.best else {}
    test = summary.eval.get("test", {})
    return {
        "run": Path(run_dir).name,
        "experiment": summary.experiment or Path(run_dir).parent.name,
        "model": summary.model or "",
        "status": run_status(summary),
        "epochs": summary.epochs_completed,
        "best_epoch": summary.best.epoch if summary.best else None,
        "val/acc": best.get("val/acc"),
        "val/f1_macro": best.get("val/f1_macro"),
        "val/map": best.get("val/map"),  # multi-label
        "test/acc": test.get("accuracy"),
        "test/f1_macro": test.get("f1_macro"),
        "test/map": test.get("map"),
        "fit_s": summary.durations.get("fit_s"),
    }


def params(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config, flattened (``optim.lr`` -> 0.003)."""
    import yaml

    def walk(node: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.", out)
        else:
            out[prefix[:-1]] = node
        return out

    return walk(yaml.safe_load((Path(run_dir) / CONFIG).read_text()) or {}, "", {})


@dataclass
class LoadedRun:
    """A trained run, ready to evaluate, export or predict: what :func:`load_run` returns."""

    run_dir: Path
    config: DictConfig
    summary: RunSummary
    task: Task
    net: Any  # torch.nn.Module in eval mode, with the checkpoint's weights
    preprocessing: Any  # the task's preprocessing (image: Preprocessing; tabular: the fitted preprocessor)
    checkpoint: str = "best"
    epoch: Optional[int] = None

    @property
    def classes(self) -> list[str]:
        return list(self.summary.classes)

    @property
    def name(self) -> str:
        return self.summary.run_name or self.run_dir.name


def load_run(run_dir: str | Path, checkpoint: str = "best") -> LoadedRun:
    """Load a trained run: its config, typed summary, task, network (with ``checkpoint``'s weights) and preprocessing.

    The one way evaluation, export, predict and tuning rebuild a network from a run directory.
    """
    from pixelmill.config import load_saved
    from pixelmill.tasks import task_for_config
    from pixelmill.training.checkpoint import net_state_dict, read_checkpoint

    run_dir = resolve_run_dir(run_dir)
    cfg = load_saved(run_dir / CONFIG)
    summary = load_summary(run_dir)
    if not summary.started_training:
        raise RunError(f"'{run_dir}' has no classes/preprocessing in summary.json; it never started training")
    task = task_for_config(cfg)
    ckpt = read_checkpoint(checkpoint_path(run_dir, checkpoint))
    net, prep = task.saved_model(cfg, summary, run_dir)
    net.load_state_dict(net_state_dict(ckpt), strict=True)
    return LoadedRun(run_dir, cfg, summary, task, net.eval(), prep, checkpoint, ckpt.get("epoch"))
