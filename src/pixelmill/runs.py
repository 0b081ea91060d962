"""Run directories: layout, naming, the summary file, listing and comparing.

A run directory is the source of truth for one run; trackers mirror it::

    runs/<experiment>/<run>/
        config.yaml  summary.json  metrics.csv  train.log
        checkpoints/best.ckpt  checkpoints/last.ckpt
        eval/<split>/...  plots/  report.html
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pixelmill.errors import RunError

CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
CHECKPOINTS = "checkpoints"


def default_run_name() -> str:
    """A sortable, unique name: ``20261123-101500-3fa2``."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else {}


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


def run_status(summary: dict[str, Any]) -> str:
    """finished / failed / interrupted / running, or killed for a running run whose process is gone."""
    status = summary.get("status", "unknown")
    if status == "running" and not pid_alive(summary.get("pid")):
        return "killed"
    return status


def list_runs(output_dir: str | Path = "runs", experiment: str | None = None) -> list[Path]:
    """Run directories under ``output_dir``, oldest first."""
    root = Path(output_dir)
    pattern = f"{experiment}/*/{CONFIG}" if experiment else f"*/*/{CONFIG}"
    return sorted((p.parent for p in root.glob(pattern)), key=lambda p: (p.stat().st_mtime, str(p)))


def describe(run_dir: Path) -> dict[str, Any]:
    """One row for run tables: identity, status, best and test metrics, duration."""
    summary = read_summary(run_dir)
    best = (summary.get("best") or {}).get("metrics", {})
    test = (summary.get("eval") or {}).get("test", {})
    durations = summary.get("durations", {})
    return {
        "run": Path(run_dir).name,
        "experiment": summary.get("experiment", Path(run_dir).parent.name),
        "model": summary.get("model", ""),
        "status": run_status(summary),
        "epochs": summary.get("epochs_completed", 0),
        "best_epoch": (summary.get("best") or {}).get("epoch"),
        "val/acc": best.get("val/acc"),
        "val/f1_macro": best.get("val/f1_macro"),
        "test/acc": test.get("accuracy"),
        "test/f1_macro": test.get("f1_macro"),
        "fit_s": durations.get("fit_s"),
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
