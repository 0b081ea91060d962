"""Shared plumbing of the benchmark scripts: arguments, timing, figures, the closing ratio lines.

Every script measures pixelmill and its comparison in the same run, interleaved, and ends
with ``ratio ...`` lines; the last one is the script's headline claim. ``--json PATH``
writes every figure for ``run_all.py``, which renders ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="A seconds-long smoke run (the test suite runs this).")
    parser.add_argument("--json", type=Path, default=None, help="Also write every figure to this JSON file.")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Extra pixelmill config override (to measure a before/after, e.g. data.cache=none).",
    )
    return parser.parse_args()


def load_average() -> float:
    """1-minute load average (the machine is shared: figures taken under load are noisier)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleave(sides: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[float]]:
    """Run each side's measurement ``rounds`` times, alternating A B A B (then B A ...) so that
    load from other processes on this shared machine falls on both sides alike."""
    out: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name] += sides[name]()
    return out


@dataclass
class Ratio:
    name: str
    value: float
    target: float
    higher_is_better: bool = True
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        verdict = "ok" if self.ok else "MISSED"
        note = f"; {self.note}" if self.note else ""
        return f"ratio {self.name} = {self.value:.3f} (target {op} {self.target:g}: {verdict}{note})"


@dataclass
class Report:
    """The figures of one script: a table of measurements, then the ratio lines."""

    script: str
    quick: bool
    figures: list[dict[str, Any]] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    load_start: float = field(default_factory=load_average)

    def figure(self, name: str, value: float, unit: str, **extra: Any) -> float:
        self.figures.append({"name": name, "value": value, "unit": unit, **extra})
        shown = f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
        extras = "".join(f"  {k}={v}" for k, v in extra.items())
        print(f"  {name:<58} {shown:>12} {unit}{extras}", flush=True)
        return value

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def ratio(self, name: str, value: float, target: float, higher_is_better: bool = True, note: str = "") -> Ratio:
        r = Ratio(name, value, target, higher_is_better, note)
        self.ratios.append(r)
        return r

    def finish(self, json_path: Path | None) -> None:
        """Print the ratio lines (headline last) and write the JSON figures."""
        load_end = load_average()
        seconds = time.time() - self.started
        print(f"  (load average {self.load_start} -> {load_end}, {seconds:.1f} s)")
        for r in self.ratios:
            print(r.line(), flush=True)
        if json_path:
            data = {
                "script": self.script,
                "quick": self.quick,
                "seconds": round(seconds, 1),
                "load_average": [self.load_start, load_end],
                "figures": self.figures,
                "ratios": [asdict(r) | {"ok": r.ok} for r in self.ratios],
                "notes": self.notes,
            }
            json_path.write_text(json.dumps(data, indent=2) + "\n")


def header(title: str, quick: bool) -> None:
    print(f"{title}{' (quick)' if quick else ''} - python {platform.python_version()}, {os.cpu_count()} CPUs", flush=True)


def quiet() -> None:
    """Keep library chatter (Lightning tips, MLflow, warnings) out of the benchmark output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pixelmill", "torch", "onnxruntime", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)


def pixelmill_bin(name: str = "pixelmill") -> str:
    """The console script next to this interpreter (the project's venv)."""
    return str(Path(sys.executable).with_name(name))
