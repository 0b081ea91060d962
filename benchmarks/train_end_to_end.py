"""Claim: ``pixelmill train`` as a user runs it trains as many images per second as a timm-style script.

pixelmill: the ``pixelmill train`` command with its defaults - the CSV, TensorBoard and MLflow
trackers, validation every epoch, best/last checkpoints, evaluation settings as shipped - on a
folder of real-sized JPEGs (``_photos.py``: about 500x375, ``train/`` and ``val/``).
Reference: ``_timm_reference.py``, a script built the way timm's ``train.py`` is built
(torchvision ImageFolder with ``create_transform``, ``create_optimizer_v2``, a plain loop, a
validation pass and a ``CheckpointSaver`` save per epoch, ``update_summary``'s CSV), same
model (resnet18 from scratch), 128 px, epochs, batch 64, 2 loader workers, AdamW 1e-3.

Each side is its own process, timed from start to exit (imports, data scan, every epoch,
validation, checkpoints, trackers: the user's wall time). The sides take turns, the order
reversed each round, so load from other users of this shared machine falls on all of them.
Rates are per trained image: timm's loader drops the last partial batch, pixelmill's does not.
Claims: pixelmill's default settings (target >= 1.0) and ``data.cache=memory`` (>= 1.3; decoded
images kept after epoch 1) against the reference, the median round. Also measured, no target,
in the first round: ``model.channels_last=false`` (the default ``auto`` is NHWC for resnet18) and
``trainer.compile=true`` against pixelmill's default run (a key pixelmill does not know, or a compiler it cannot find, turns the
row into a note). With no test split, pixelmill's defaults evaluate the val split after training
and write the report; that is part of a user's run and is counted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, header, interleave, median, parse_args, pixelmill_bin  # noqa: E402
from _photos import bench_dir, locked, photo_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
# The rows without a target: a config key each, given by name (a missing key makes the row a note).
VARIANTS = {"channels_first": "model.channels_last=false", "compile": "trainer.compile=true"}


def split_photos(n: int, val_every: int = 5) -> Path:
    """``n`` benchmark photos as ``train/<class>/`` and ``val/<class>/`` (every ``val_every``-th to val), hard links, kept across runs."""
    src = photo_dir(n)
    root = bench_dir() / f"e2e-{src.name}-val{val_every}"
    with locked(root):
        done = root / ".complete"
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            for folder in sorted(p for p in src.iterdir() if p.is_dir()):
                for i, photo in enumerate(sorted(folder.glob("*.jpg"))):
                    target = root / ("val" if i % val_every == 0 else "train") / folder.name / photo.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(photo, target)
                    except OSError:  # another file system: copy
                        shutil.copy2(photo, target)
            done.touch()
    return root


def trained_per_epoch(n: int, batch: int) -> int:
    """Images pixelmill trains per epoch: all of them (a last batch of one is dropped: BatchNorm cannot train on it)."""
    return n - 1 if n % batch == 1 else n


Phases = dict[str, float]  # seconds before the training loop, in it (epochs, validation, checkpoints), after it


class Side:
    """One way of training, run as a subprocess per measurement; it records images/s, the
    validation accuracy it reached and where its wall time went."""

    def __init__(self, name: str, command: Callable[[Path], list[str]], work: Path, read: Callable[[Path, str, float, float], tuple[int, float | None, Phases]]):
        self.name, self.command, self.work, self.read = name, command, work, read
        self.rates: list[float] = []
        self.accuracy: list[float] = []
        self.phases: list[Phases] = []
        self.failed: str | None = None
        self.runs = 0

    def __call__(self) -> list[float]:
        if self.failed:
            return []
        self.runs += 1
        out = self.work / f"{self.name}-{self.runs}"
        out.mkdir(parents=True)
        started = time.time()
        proc = subprocess.run(self.command(out), cwd=out, capture_output=True, text=True)
        ended = time.time()
        if proc.returncode != 0:
            lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
            self.failed = (lines[-1] if lines else f"exit code {proc.returncode}")[:300]
            return []
        images, accuracy, phases = self.read(out, proc.stdout, started, ended)
        self.rates.append(images / (ended - started))
        self.phases.append(phases)
        if accuracy is not None:
            self.accuracy.append(accuracy)
        shutil.rmtree(out, ignore_errors=True)  # checkpoints of resnet18: 90 MB per run
        return [images / (ended - started)]


def phases(started: float, loop_start: float | None, loop_end: float | None, ended: float) -> Phases:
    if loop_start is None or loop_end is None:
        return {}
    return {"before the loop": loop_start - started, "training loop": loop_end - loop_start, "after the loop": ended - loop_end}


def log_time(line: str) -> float:
    """The time of a ``train.log`` line (``2026-12-04 17:24:49,952 INFO ...``)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def pixelmill_side(name: str, data: Path, work: Path, size: int, batch: int, epochs: int, workers: int, extra: list[str]) -> Side:
    n_train = sum(1 for _ in (data / "train").rglob("*.jpg"))

    def command(out: Path) -> list[str]:
        return [
            pixelmill_bin(), "train", f"data.path={data}", "model.name=resnet18", f"data.image_size={size}", f"data.batch_size={batch}",
            f"data.num_workers={workers}", f"trainer.max_epochs={epochs}", f"output_dir={out / 'runs'}", "run_name=e2e", *extra,
        ]

    def read(out: Path, stdout: str, started: float, ended: float) -> tuple[int, float | None, Phases]:
        run = next((out / "runs").glob("*/e2e"))
        best = (json.loads((run / "summary.json").read_text()).get("best") or {}).get("metrics", {})
        # The loop runs from Lightning's banner (the Trainer is built right before fit) to its "fit stopped" line.
        lines = (run / "train.log").read_text(errors="replace").splitlines()
        start = next((log_time(line) for line in lines if "GPU available" in line), None)
        end = next((log_time(line) for line in lines if "`Trainer.fit` stopped" in line), None)
        return trained_per_epoch(n_train, batch) * epochs, best.get("val/acc"), phases(started, start, end, ended)

    return Side(name, command, work, read)


def timm_side(data: Path, work: Path, size: int, batch: int, epochs: int, workers: int) -> Side:
    def command(out: Path) -> list[str]:
        return [
            sys.executable, str(HERE / "_timm_reference.py"), "--data", str(data), "--out", str(out), "--img-size", str(size),
            "--batch-size", str(batch), "--epochs", str(epochs), "--workers", str(workers),
        ]

    def read(out: Path, stdout: str, started: float, ended: float) -> tuple[int, float | None, Phases]:
        result = json.loads(stdout.strip().splitlines()[-1])
        return result["trained_images"], result["val_top1"] / 100, phases(started, result["loop_start"], result["loop_end"], ended)

    return Side("timm-style script", command, work, read)


def round_ratios(side: Side, reference: Side) -> list[float]:
    """``side`` / ``reference`` images per second, round by round (both halves of a round see the same load)."""
    return [a / b for a, b in zip(side.rates, reference.rates)]


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    header("train_end_to_end", args.quick)
    report = Report("train_end_to_end", args.quick)
    # Full: 400 photos (320 train = 5 batches of 64, 80 val), 4 epochs, 2 rounds (8 runs, about 40-60 s
    # each on this machine, compiling more); quick: a smoke run of one small epoch.
    photos, size, batch, epochs, rounds = (40, 32, 16, 1, 1) if args.quick else (400, 128, 64, 4, 2)
    workers = 2
    data = split_photos(photos)
    n_train, n_val = (sum(1 for _ in (data / s).rglob("*.jpg")) for s in ("train", "val"))
    report.figure("photos (about 500x375 JPEG)", n_train, "train images", val=n_val, epochs=epochs, batch=batch, workers=workers, size=size)
    with tempfile.TemporaryDirectory(prefix="pixelmill-bench-e2e-") as tmp:
        work = Path(tmp)
        sides = {
            "timm": timm_side(data, work, size, batch, epochs, workers),
            "default": pixelmill_side("pixelmill train", data, work, size, batch, epochs, workers, args.overrides),
            "cache": pixelmill_side("pixelmill train data.cache=memory", data, work, size, batch, epochs, workers, ["data.cache=memory", *args.overrides]),
        }
        variants = {key: pixelmill_side(f"pixelmill train {override}", data, work, size, batch, epochs, workers, [override, *args.overrides])
                    for key, override in VARIANTS.items()}
        if args.quick:  # each pixelmill process costs ~15 s here before its first step; compiling resnet18, minutes
            report.note(f"quick mode: {', '.join(VARIANTS.values())} not measured")
            variants.clear()
        # The rows without a target run in the first round only, beside the others (a few minutes in all).
        interleave({**sides, **variants}, 1)
        if rounds > 1:
            interleave(sides, rounds - 1)

        reference = sides["timm"]
        if reference.failed:
            raise SystemExit(f"the timm-style reference failed: {reference.failed}")
        for side in (*sides.values(), *variants.values()):
            if side.failed:
                report.note(f"{side.name}: not measured ({side.failed})")
                continue
            extra = {"val_acc": round(median(side.accuracy), 3)} if side.accuracy else {}
            report.figure(f"{side.name}: trained images per wall second", median(side.rates), "images/s", runs=len(side.rates), **extra)
            if all(side.phases):  # where the wall time went, median over runs
                report.figure(f"{side.name}: wall time", sum(median([p[k] for p in side.phases]) for k in side.phases[0]), "s",
                              **{k.replace(" ", "_"): round(median([p[k] for p in side.phases]), 1) for k in side.phases[0]})
        for side in variants.values():
            if not side.failed and sides["default"].rates:
                report.figure(f"{side.name} / pixelmill train (first round, no target)", side.rates[0] / sides["default"].rates[0], "ratio")
        for key, target in (("default", 1.0), ("cache", 1.3)):
            side = sides[key]
            if side.failed:
                raise SystemExit(f"{side.name} failed: {side.failed}")
            ratios = round_ratios(side, reference)
            report.ratio(
                f"train_end_to_end {side.name} / timm-style script (images per wall second, median round)", median(ratios), target,
                note=f"per round {min(ratios):.3f}-{max(ratios):.3f}; resnet18 {size}px, {epochs} epochs, batch {batch}, {workers} workers, "
                f"{n_train} train JPEGs",
            )
    report.finish(args.json)


if __name__ == "__main__":
    main()
