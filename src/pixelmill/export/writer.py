"""Writing a run's bundle: where it goes, the staging folder that becomes it, and the metadata every task shares."""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pixelmill import runs
from pixelmill.errors import BundleError
from pixelmill.export.bundle import BUNDLE_FILE

if TYPE_CHECKING:
    from pixelmill.runs import LoadedRun


def default_out(run_dir: Path, fmt: str, quantize: str | None) -> Path:
    """RUN_DIR/bundle for float ONNX; RUN_DIR/bundle-int8, bundle-int8-dynamic and bundle-torchscript otherwise."""
    suffix = f"-{quantize}" if quantize else ("" if fmt == "onnx" else f"-{fmt}")
    return Path(run_dir) / f"bundle{suffix}"


def _move_into_place(work: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty or an older bundle) with ``work``."""
    old = None
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / BUNDLE_FILE).is_file()):
            raise BundleError(f"'{out}' exists and is not a bundle; pass another --out")
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(3)}")
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write the bundle into; it replaces ``out`` only if the block succeeds.

    A refused or failed export leaves ``out`` as it was and nothing else behind.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    work.mkdir()
    try:
        yield work
        _move_into_place(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_meta(run: LoadedRun, name: str | None, model_file: str, versions: dict[str, str]) -> dict[str, Any]:
    """The part of bundle.json every task writes: identity, provenance, metrics and versions."""
    summary = run.summary
    decision = runs.read_decision(run.run_dir)  # binary: the operating point predict and serve apply
    return {
        "kind": run.task.name,
        "name": name or f"{summary.experiment or run.config.experiment}-{run.name}",
        "model_name": run.config.model.name,
        "model_file": model_file,
        "classes": run.classes,
        "metrics": {"eval": summary.eval, "best": summary.best.model_dump() if summary.best else None},
        "data_fingerprint": summary.fingerprint,
        "run": {"run_dir": str(run.run_dir.resolve()), "run_name": run.name, "checkpoint": run.checkpoint, "epoch": run.epoch},
        "versions": versions,
        "created_at": runs.now_iso(),
    } | ({"positive_class": decision[0], "threshold": decision[1]} if decision else {})
