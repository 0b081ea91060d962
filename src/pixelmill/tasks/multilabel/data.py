"""Multi-label data: a CSV manifest ``path,labels[,split]``, verified, split and counted per label.

``labels`` holds an image's labels joined by ``data.label_separator`` (``|``, the ChestX-ray14
convention); an empty cell or ``data.no_label`` (``No Finding``) means the image has none.
Files are verified, hashed and fingerprinted by the same code as single-label scans
(``data/scan.py``); without a ``split`` column the split is seeded iterative stratification
(``iterstrat``, Sechidis et al. 2011), which keeps every label's share alike in each split.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pixelmill.data.scan import (
    SPLITS,
    BadFile,
    ScanResult,
    check_group_column,
    check_group_splits,
    check_leakage,
    check_ratios,
    check_usable,
    find_leaks,
    fingerprint,
    group_holdout,
    group_of,
    group_split_indices,
    held_count,
    split_of,
    verify_files,
)
from pixelmill.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class MultiLabelScan(ScanResult):
    """A verified manifest; ``splits[split]`` holds (absolute path, (L,) float32 0/1 targets) sorted by path.

    ``classes`` are the label names (sorted); ``class_counts(split)`` counts the images carrying
    each label, so the summary and the report show label frequencies per split.
    """

    def targets(self, split: str) -> np.ndarray:
        """(N, L) 0/1 float32 matrix of one split, in file order."""
        items = self.splits[split]
        return np.stack([y for _, y in items]) if items else np.zeros((0, len(self.classes)), np.float32)

    def class_counts(self, split: str) -> dict[str, int]:
        if split not in self.splits:
            raise ValueError(f"unknown split '{split}'; choose one of: {', '.join(self.splits)}")
        per_label = self.targets(split).sum(axis=0)
        return {name: int(n) for name, n in zip(self.classes, per_label)}

    def no_label_counts(self) -> dict[str, int]:
        """Images without any label, per split."""
        return {split: int((self.targets(split).sum(axis=1) == 0).sum()) for split in self.splits}

    def to_summary(self) -> dict:
        return super().to_summary() | {"no_label_counts": self.no_label_counts()}

    def label_text(self, label: np.ndarray) -> str:  # type: ignore[override]
        return "|".join(name for name, on in zip(self.classes, label) if on)

    def split_table(self) -> tuple[list[str], list[list[str]]]:
        header, rows = super().split_table()
        return ["path", "split", "labels", *header[3:]], rows


class _Row(NamedTuple):
    path: str
    labels: tuple[str, ...]
    split: str | None
    line: int
    group: str | None = None


def load_scan(cfg: Any) -> MultiLabelScan:
    """The run's manifest, verified and split (``data.val_ratio``, ``data.test_ratio``, ``seed``)."""
    data = cfg.data
    if not data.path:
        raise ConfigError("data.path is not set; pass data.path=FILE.csv, a manifest with columns path,labels (optionally split)")
    scan = scan_manifest(
        data.path,
        separator=data.label_separator,
        no_label=data.no_label,
        layout=data.layout,
        val_ratio=data.val_ratio,
        test_ratio=data.test_ratio,
        seed=cfg.seed,
        group_column=data.group_column,
        cache=data.scan_cache,
    )
    if not scan.splits.get("val"):
        raise DataError("no validation images: add rows with split=val to the manifest or set data.val_ratio above 0")
    check_leakage(scan, data.leakage)
    return scan


def scan_manifest(
    path: str | Path,
    *,
    separator: str = "|",
    no_label: str = "No Finding",
    layout: str = "auto",
    val_ratio: float = 0.15,
    test_ratio: float = 0.15,
    seed: int = 42,
    classes: list[str] | None = None,
    group_column: str | None = None,
    cache: bool = True,
) -> MultiLabelScan:
    """Read, verify and split a multi-label manifest. ``classes`` fixes the label set (a trained run's);
    ``cache``: reuse the scan cache's verdicts of unchanged files."""
    check_ratios(val_ratio, test_ratio)
    manifest = os.path.abspath(os.fspath(path))
    if layout not in ("auto", "csv"):
        raise DataError(f"multi-label data is a CSV manifest (path,labels); layout={layout} does not apply, use layout=auto")
    if not os.path.exists(manifest):
        raise DataError(f"data path '{path}' does not exist; set data.path to a CSV manifest with columns path,labels")
    if os.path.isdir(manifest) or not manifest.lower().endswith(".csv"):
        raise DataError(
            f"data path '{path}' is not a CSV manifest; multi-label data needs a manifest path,labels[,split] "
            "(one sub-folder per class is single-label: data.kind=image)"
        )
    if not separator:
        raise ConfigError("data.label_separator is empty; set it to the character between labels, e.g. '|'")
    started = time.perf_counter()
    root = os.path.dirname(manifest)
    rows = _read_rows(manifest, root, separator, no_label, group_column)
    has_split = any(row.split for row in rows)
    known = sorted({label for row in rows if not has_split or row.split == "train" for label in row.labels})
    fixed = classes is not None
    if classes is None:
        _check_unknown(manifest, rows, known)
        classes = known
    else:
        unknown = sorted({label for row in rows for label in row.labels} - set(classes))
        if unknown:
            raise DataError(f"'{manifest}' has labels the model was not trained on: {', '.join(unknown)} (known: {', '.join(classes)})")
    if len(classes) < 1:
        raise DataError(
            f"no row of '{manifest}' has a label (every labels cell is empty or '{no_label}'); "
            f"fill the labels column, joining several with '{separator}'"
        )

    checks = verify_files([row.path for row in rows], cache=cache)
    good = [(row, digest) for row, (reason, digest) in zip(rows, checks) if reason is None]
    bad = [BadFile(row.path, reason) for row, (reason, _) in zip(rows, checks) if reason is not None]
    check_usable(len(good), bad)
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for row, _ in good:
        target = np.zeros(len(classes), np.float32)
        target[[index[label] for label in row.labels]] = 1.0
        items.append((row.path, target, row.split))
    groups = {row.path: row.group for row, _ in good if row.group is not None}
    splits = _assign_splits(items, val_ratio, test_ratio, seed, groups)
    if not fixed:
        _check_train_labels(manifest, classes, splits["train"], len(bad))
    print_fp = fingerprint([(row.path, separator.join(row.labels), sha) for row, sha in good], root)
    scan = MultiLabelScan(root, "csv", list(classes), splits, bad, print_fp, find_leaks(splits, {row.path: sha for row, sha in good}), groups)
    if bad:
        reasons = ", ".join(f"{n} {reason}" for reason, n in scan.bad_counts().items())
        log.warning("skipped %d bad image file(s) in '%s': %s", len(bad), root, reasons)
    log.info(
        "scanned %d images (%d labels, multi-label manifest) in %.2fs: %s",
        len(good), len(classes), time.perf_counter() - started, ", ".join(f"{k}={v}" for k, v in scan.counts().items()),
    )
    return scan


def _read_rows(manifest: str, root: str, separator: str, no_label: str, group_column: str | None = None) -> list[_Row]:
    """Every row of the manifest, checked cell by cell; the first row of a path twice is kept."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [(name or "").strip().lower() for name in (reader.fieldnames or [])]
            if "labels" not in header or "path" not in header:
                hint = " (a 'label' column is one class per image: data.kind=image)" if "label" in header else ""
                raise DataError(
                    f"manifest '{manifest}' needs columns path,labels (optionally split); its header is "
                    f"{','.join(header) or 'empty'}{hint}"
                )
            reader.fieldnames = header
            group_key = check_group_column(manifest, header, group_column)
            rows = [
                _parse_row(manifest, root, row, reader.line_num, separator, no_label)._replace(group=group_of(manifest, row, reader.line_num, group_key))
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest '{manifest}' ({exc}); save it as a UTF-8 CSV with header path,labels") from None
    if not rows:
        raise DataError(f"manifest '{manifest}' has no rows; add one row path,labels per image")
    unique: dict[str, _Row] = {}
    for row in rows:
        unique.setdefault(row.path, row)
    if len(unique) < len(rows):
        log.warning("manifest '%s' lists %d path(s) twice; kept the first", manifest, len(rows) - len(unique))
    return sorted(unique.values())


def _parse_row(manifest: str, root: str, row: dict, line: int, separator: str, no_label: str) -> _Row:
    where = f"manifest '{manifest}' line {line}"
    rel = (row.get("path") or "").strip()
    if not rel:
        raise DataError(f"{where} has an empty path; fill it or delete the row")
    cell = (row.get("labels") or "").strip()
    labels: tuple[str, ...] = ()
    if cell and cell != no_label:
        parts = [part.strip() for part in cell.split(separator)]
        if any(not part for part in parts):
            raise DataError(
                f"{where} has labels '{cell}' with an empty label between separators; "
                f"join labels with a single '{separator}' (data.label_separator), e.g. A{separator}B"
            )
        if no_label and no_label in parts:
            raise DataError(f"{where} lists '{no_label}' together with other labels ('{cell}'); keep one of them")
        labels = tuple(sorted(set(parts)))
    split = None
    if "split" in row:  # the column exists: every row names its split
        value = (row.get("split") or "").strip()
        split = split_of(value)
        if split is None:
            raise DataError(f"{where} has split '{value}'; use train, val or test")
    return _Row(os.path.abspath(os.path.join(root, rel)), labels, split, line)


def _check_unknown(manifest: str, rows: list[_Row], known: list[str]) -> None:
    """With a split column: a label of val/test that train never has is an error naming the row."""
    known_set = set(known)
    for row in rows:
        missing = [label for label in row.labels if label not in known_set]
        if missing:
            raise DataError(
                f"manifest '{manifest}' line {row.line}: label '{missing[0]}' ({row.split}) has no train row; "
                "add train images for it or remove it from the row"
            )


def _check_train_labels(manifest: str, classes: list[str], train: list[tuple[str, np.ndarray]], bad: int) -> None:
    """Every label must have a usable train image (after bad files are skipped and the split is drawn)."""
    counts = np.stack([y for _, y in train]).sum(axis=0) if train else np.zeros(len(classes))
    for name, n in zip(classes, counts):
        if n == 0:
            raise DataError(
                f"label '{name}' has no usable train image in '{manifest}' ({bad} bad file(s) skipped); "
                "add train rows for it (or more images, so the split can leave some in train) or remove it"
            )


def _assign_splits(
    items: list[tuple[str, np.ndarray, str | None]], val_ratio: float, test_ratio: float, seed: int, groups: dict[str, str] | None = None
):
    """Split items; with ``groups`` (path -> group) whole groups only, stratified by each image's rarest label."""
    pairs = [(path, y) for path, y, _ in items]
    if all(split is None for _, _, split in items):
        targets = np.stack([y for _, y in pairs])
        if groups:
            keys, names = rarest_label(targets).tolist(), [groups[p] for p, _ in pairs]
            parts = group_split_indices(keys, names, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
            return {split: [pairs[i] for i in parts[split]] for split in SPLITS}
        rest, test = _stratified_holdout(np.arange(len(pairs)), targets, held_count(test_ratio, len(pairs)), seed)
        train, val = _stratified_holdout(rest, targets, held_count(val_ratio, len(pairs)), seed)
        return {"train": [pairs[i] for i in train], "val": [pairs[i] for i in val], "test": [pairs[i] for i in test]}
    if groups:
        check_group_splits([(path, split, groups[path]) for path, _, split in items])
    splits = {split: [(path, y) for path, y, s in items if s == split] for split in SPLITS}
    if not splits["val"]:  # no val rows: carve it from train
        train = splits["train"]
        targets = np.stack([y for _, y in train])
        count = held_count(val_ratio, len(train))
        if groups:
            keep, held = group_holdout(list(range(len(train))), rarest_label(targets).tolist(), [groups[p] for p, _ in train], count, seed)
        else:
            keep, held = _stratified_holdout(np.arange(len(train)), targets, count, seed)
        splits["train"], splits["val"] = [train[i] for i in keep], [train[i] for i in held]
    return splits


def rarest_label(targets: np.ndarray) -> np.ndarray:
    """Per image the index of its least frequent label in ``targets`` (L for an image without labels).

    The key of group-aware splits and of the balanced sampler: balancing it gives rare findings
    as many draws as common ones, the usual multi-label reading of class balancing.
    """
    counts = targets.sum(axis=0)
    keyed = np.where(targets > 0, counts[None, :], np.inf)
    return np.where(np.isinf(keyed).all(axis=1), targets.shape[1], keyed.argmin(axis=1)).astype(np.int64)


def _stratified_holdout(positions: np.ndarray | list[int], targets: np.ndarray, count: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``positions`` into sorted (kept, held out), ``count`` held out by iterative stratification."""
    positions = np.asarray(positions, dtype=np.int64)
    count = min(count, len(positions) - 1)
    if count <= 0:
        return sorted(positions.tolist()), []
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=count, random_state=seed)
    kept, held = next(splitter.split(np.zeros(len(positions)), targets[positions]))
    return sorted(positions[kept].tolist()), sorted(positions[held].tolist())


def evaluation_scan(cfg: Any, classes: list[str], split: str, other: Path | None) -> tuple[MultiLabelScan, str]:
    """(scan, name) to evaluate: a split of the run's manifest, or another manifest mapped onto ``classes``."""
    data = cfg.data
    if other is not None:
        scan = scan_manifest(other, separator=data.label_separator, no_label=data.no_label, val_ratio=0.0, test_ratio=0.0, seed=cfg.seed, classes=classes)
        has_split = any(scan.splits.get(s) for s in ("val", "test"))
        if has_split and scan.splits.get(split):
            return dataclasses.replace(scan, splits={split: scan.splits[split]}), split
        items = sorted(item for part in scan.splits.values() for item in part)
        return dataclasses.replace(scan, splits={Path(other).resolve().stem: items}), Path(other).resolve().stem
    scan = load_scan(cfg)
    if scan.classes != classes:
        raise DataError(f"the labels in {data.path} changed since training ({classes} -> {scan.classes})")
    if not scan.splits.get(split):
        raise DataError(f"the run's data has no '{split}' images; pick --split val or pass --data MANIFEST.csv")
    return scan, split
