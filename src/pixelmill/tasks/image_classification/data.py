"""Image classification data: a verified scan of a folder or manifest, and what evaluation and export read."""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from pixelmill.data.scan import ScanResult, check_leakage, scan_images
from pixelmill.errors import BundleError, ConfigError, DataError

log = logging.getLogger(__name__)


def load_scan(cfg: Any) -> ScanResult:
    """The run's images, verified and split (``data.layout``, ``data.val_ratio``, ``data.test_ratio``)."""
    if not cfg.data.path:
        raise ConfigError("data.path is not set; pass data.path=DIR (one sub-folder per class) or a CSV manifest")
    scan = scan_images(
        cfg.data.path, layout=cfg.data.layout, val_ratio=cfg.data.val_ratio, test_ratio=cfg.data.test_ratio, seed=cfg.seed,
        group_column=cfg.data.group_column, cache=cfg.data.scan_cache,
    )
    if not scan.splits.get("val"):
        raise DataError("no validation images: add a val/ folder or set data.val_ratio above 0")
    check_leakage(scan, cfg.data.leakage)
    return scan


def folder_scan(data: Path, split: str, classes: list[str], seed: int) -> tuple[ScanResult, str]:
    """Scan any image folder and map its class names onto the run's class indices."""
    scan = scan_images(data, val_ratio=0.0, test_ratio=0.0, seed=seed)
    unknown = sorted(set(scan.classes) - set(classes))
    if unknown:
        raise DataError(f"'{data}' has classes the model was not trained on: {', '.join(unknown)} (known: {', '.join(classes)})")
    has_split = scan.layout == "split" and scan.splits.get(split)
    items = scan.splits[split] if has_split else [item for part in scan.splits.values() for item in part]
    remap = {i: classes.index(name) for i, name in enumerate(scan.classes)}
    name = split if has_split else Path(data).resolve().name
    return dataclasses.replace(scan, classes=list(classes), splits={name: [(p, remap[y]) for p, y in items]}), name


def evaluation_scan(cfg: Any, classes: list[str], split: str, other: Path | None) -> tuple[ScanResult, str]:
    """(scan, name) to evaluate: a split of the run's data, or another image folder."""
    if other is not None:
        return folder_scan(Path(other), split, classes, cfg.seed)
    scan = load_scan(cfg)
    if scan.classes != classes:
        raise DataError(f"the classes under {cfg.data.path} changed since training ({classes} -> {scan.classes})")
    if not scan.splits.get(split):
        raise DataError(f"the run's data has no '{split}' images; pick --split val or pass --data FOLDER")
    return scan, split


def check_images(cfg: Any, run_dir: Path, limit: int = 64, load: Callable[[Any], ScanResult] = load_scan) -> list[str]:
    """Up to ``limit`` real evaluation images of the run (test split, else val), spread over the split.

    ``load(cfg)`` scans the run's data (the task's own scan; single-label by default).
    """
    items: list[str] = []
    try:
        scan = load(cfg)
        split = next((s for s in ("test", "val") if scan.splits.get(s)), None)
        items = [str(p) for p, _ in scan.splits[split]] if split else []
    except (DataError, ConfigError, OSError) as exc:
        log.warning("cannot scan the run's data (%s); checking on the images listed in eval/", exc)
    if not items:  # the data moved: fall back to the files evaluation listed, if they still exist
        for pred_csv in sorted((run_dir / "eval").glob("*/predictions.csv")):
            with open(pred_csv, newline="") as fh:
                items += [row["path"] for row in csv.DictReader(fh) if Path(row["path"]).is_file()]
    if not items:
        raise BundleError(f"no evaluation images found for '{run_dir}' to check the export against; restore its data.path")
    step = max(1, len(items) // limit)
    return items[::step][:limit]


def calibration_images(cfg: Any, limit: int, load: Callable[[Any], ScanResult] = load_scan) -> list[str]:
    """Up to ``limit`` of the run's training images, spread over the split: what static int8 calibrates on.

    DataError (one line, exit 2) when the run's data cannot be scanned now or its train split is
    empty: calibration has no fallback, because ranges measured on other images are not the model's.
    """
    fix = "restore the run's data.path or export with --quantize int8-dynamic (no calibration)"
    try:
        scan = load(cfg)
    except (DataError, ConfigError, OSError) as exc:
        raise DataError(f"int8 calibration reads the run's training images, and its data cannot be read now ({exc}); {fix}") from None
    items = [str(p) for p, _ in scan.splits.get("train", [])]
    if not items:
        raise DataError(f"int8 calibration found no readable training images under '{cfg.data.path}'; {fix}")
    step = max(1, len(items) // limit)
    return items[::step][:limit]
