"""Find image files, detect the folder layout, verify every image and split train/val/test.

Three layouts (``layout="auto"`` picks one):

- ``split``: ``root/{train,val,test}/<class>/*`` - val and test are optional; a missing val
  is carved from train (stratified, seeded), a missing test stays empty.
- ``flat``:  ``root/<class>/*`` - split train/val/test with a seeded stratified split.
- ``csv``:   a manifest with header ``path,label`` (optional ``split``); paths are relative
  to the manifest's folder or absolute.

Every image is opened and decoded once (thread pool), unless the scan cache
(``data.scan_cache``, ``scan_cache.py``) knows the answer for the file as it is now: a re-run
over an unchanged folder verifies only new or changed files. Bad files never raise: they are
skipped, counted by reason (``BadFile.reason``) and logged in one warning line.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import logging
import os
import stat
import struct
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import PIL
from PIL import Image, UnidentifiedImageError

from pixelmill.data.choices import LAYOUTS
from pixelmill.data.files import IMAGE_EXTENSIONS
from pixelmill.data.scan_cache import cached_checks
from pixelmill.errors import DataError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Every reason a file can be skipped for; reports can rely on this set.
BAD_REASONS: tuple[str, ...] = (
    "empty file", "not an image", "truncated", "corrupt", "too many pixels",
    "unreadable", "broken link", "too small", "missing file",
)

# Folder names (split layout) and manifest values (csv layout) accepted for each split.
_SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
_SPLIT_OF = {name: split for split, names in _SPLIT_NAMES.items() for name in names}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signatures of formats we accept: a file that starts like an image but fails to open is "corrupt".
_IMAGE_MAGIC = (_PNG_SIGNATURE, b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
# Bump when _verify decides differently: the scan cache's answers from before then count as unknown.
_CHECKS_VERSION = 1
_LAYOUT_HINT = {
    "flat": "one sub-folder per class holding image files",
    "split": "train/<class>/ sub-folders holding image files",
    "csv": "rows 'path,label' pointing at image files",
}


@dataclass
class BadFile:
    """A skipped file and why (one of ``BAD_REASONS``)."""

    path: str
    reason: str


@dataclass
class ScanResult:
    """Verified files per split; ``splits[split]`` holds (absolute path, class index) sorted by path.

    ``root`` is the data folder (for a CSV manifest: the manifest's folder); ``layout`` is the
    detected one, never "auto"; ``classes[i]`` is the name of class index ``i``.
    """

    root: str
    layout: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    bad: list[BadFile]
    fingerprint: str
    leaks: list[dict] = field(default_factory=list)  # byte-identical files in more than one split (find_leaks)
    groups: dict[str, str] = field(default_factory=dict)  # path -> group (data.group_column), when the data has groups

    def counts(self) -> dict[str, int]:
        """Number of images per split."""
        return {split: len(items) for split, items in self.splits.items()}

    def class_counts(self, split: str) -> dict[str, int]:
        """Number of images per class (every class, zeros included) in one split."""
        if split not in self.splits:
            raise ValueError(f"unknown split '{split}'; choose one of: {', '.join(self.splits)}")
        per_index = Counter(label for _, label in self.splits[split])
        return {name: per_index.get(i, 0) for i, name in enumerate(self.classes)}

    def bad_counts(self) -> dict[str, int]:
        """Number of skipped files per reason."""
        return dict(sorted(Counter(b.reason for b in self.bad).items()))

    def to_summary(self) -> dict:
        """JSON-ready summary; skipped file paths are relative to ``root``."""
        return {
            "layout": self.layout,
            "classes": [_printable(c) for c in self.classes],
            "counts": self.counts(),
            "class_counts": {
                split: {_printable(k): v for k, v in self.class_counts(split).items()} for split in self.splits
            },
            "skipped": self.bad_counts(),
            "skipped_files": [{"path": _printable(_relative(b.path, self.root)), "reason": b.reason} for b in self.bad],
            "fingerprint": self.fingerprint,
            "leaks": [
                {"sha256": leak["sha256"], "files": [{"path": _printable(_relative(f["path"], self.root)), "split": f["split"]} for f in leak["files"]]}
                for leak in self.leaks
            ],
        }

    def label_text(self, label: int) -> str:
        """A split item's label as people read it (its class name)."""
        return self.classes[label]

    def split_table(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of ``splits.csv``: where every file of the run went, and its label."""
        group = [self.groups.get] if self.groups else []  # the group column, only when the data has groups
        rows = [
            [_printable(path), split, self.label_text(label), *(get(path, "") for get in group)]
            for split, items in self.splits.items()
            for path, label in items
        ]
        return ["path", "split", "label", *(["group"] if group else [])], rows

    def write_with_splits(self, folder: Path, split_of: Mapping[str, str], group_column: str | None = None) -> dict[str, str]:
        """Write these files, labels and groups re-split (``split_of[path]``: train, val or test) as ``folder/manifest.csv``.

        Returns the config values that make the same task read exactly that (cross-validation folds).
        """
        header, _ = self.split_table()  # the label column: label, or labels for several per image
        rows = [
            [path, split_of[path], self.label_text(label), *([self.groups[path]] if group_column else [])]
            for items in self.splits.values()
            for path, label in items
        ]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path", "split", header[2], *([group_column] if group_column else [])])
        writer.writerows(rows)
        manifest = Path(folder) / "manifest.csv"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(buffer.getvalue(), encoding="utf-8", errors="surrogateescape")
        # label_text joins the labels of a multi-label image with '|'.
        return {"data.path": str(manifest.resolve()), "data.layout": "csv", "data.label_separator": "|"}


class _Found(NamedTuple):
    path: str
    label: str
    split: str | None  # fixed by the layout (split folders, manifest column) or None
    group: str | None = None  # the manifest's data.group_column (patient, lesion, part, lot)


def scan_images(
    path: str | Path,
    *,
    layout: str = "auto",
    val_ratio: float = 0.15,
    test_ratio: float = 0.15,
    seed: int = 42,
    max_pixels: int = 89_478_485,
    workers: int = 4,
    group_column: str | None = None,
    cache: bool = True,
) -> ScanResult:
    """Find, verify and split the images under ``path`` (a folder or a CSV manifest).

    ``group_column`` names a manifest column (patient, lesion, part): automatic splits keep each
    group in one split, and user-given splits may not share a group. ``cache`` (``data.scan_cache``):
    reuse what earlier scans learnt about files unchanged since (``verify_files``).

    Raises ``DataError`` (one line, says what to do) when the data cannot be used at all;
    single bad files are skipped and reported in ``ScanResult.bad``.
    """
    _check_args(layout, val_ratio, test_ratio, max_pixels)
    target = os.path.abspath(os.fspath(path))
    if not os.path.exists(target):
        raise DataError(
            f"data path '{path}' does not exist; set data.path=DIR with one sub-folder per class, or a CSV manifest"
        )
    layout = _detect_layout(target) if layout == "auto" else layout
    started = time.perf_counter()
    if group_column and layout != "csv":
        raise DataError(f"data.group_column={group_column} needs a CSV manifest with that column; '{target}' is a {layout} folder")
    root, classes, found = _find_csv(target, group_column) if layout == "csv" else _FINDERS[layout](target)
    if not found:
        kinds = ", ".join(IMAGE_EXTENSIONS)
        raise DataError(f"no images found in '{target}'; expected {_LAYOUT_HINT[layout]} ({kinds})")
    if len(classes) < 2:
        raise DataError(
            f"need at least 2 classes, found {len(classes)} ({', '.join(classes)}) in '{target}'; "
            "add one sub-folder (or label) per class"
        )

    checks = verify_files([f.path for f in found], max_pixels, workers, cache=cache)
    good = [(f, digest) for f, (reason, digest) in zip(found, checks) if reason is None]
    bad = [BadFile(f.path, reason) for f, (reason, _) in zip(found, checks) if reason is not None]
    _check_classes(classes, [f for f, _ in good], bad, by_split=any(f.split for f in found))
    splits = _assign_splits([f for f, _ in good], classes, val_ratio, test_ratio, seed)
    result = ScanResult(root, layout, classes, splits, bad, fingerprint([(f.path, f.label, sha) for f, sha in good], root))
    result.leaks = find_leaks(splits, {f.path: sha for f, sha in good})
    if group_column:
        result.groups = {f.path: f.group for f, _ in good if f.group is not None}
        in_train = {y for _, y in splits["train"]}
        missing = [name for i, name in enumerate(classes) if i not in in_train]
        if missing:
            raise DataError(
                f"class '{missing[0]}' has no train images once whole groups stay together (data.group_column={group_column}); "
                "add groups with it or lower data.val_ratio / data.test_ratio"
            )

    if bad:
        reasons = ", ".join(f"{n} {reason}" for reason, n in result.bad_counts().items())
        logger.warning("skipped %d bad image file(s) in '%s': %s", len(bad), root, reasons)
    logger.info(
        "scanned %d images (%d classes, %s layout) in %.2fs: %s",
        len(good), len(classes), layout, time.perf_counter() - started,
        ", ".join(f"{k}={v}" for k, v in result.counts().items()),
    )
    return result


def split_indices(labels: Sequence, *, val_ratio: float, test_ratio: float, seed: int) -> dict[str, list[int]]:
    """Seeded, stratified split of positions ``0..len(labels)-1`` into sorted train/val/test lists.

    val and test get ``round(ratio * n)`` positions each; the rest is train.
    """
    labels = list(labels)
    n = len(labels)
    rest, test = _holdout(list(range(n)), labels, held_count(test_ratio, n), seed)
    train, val = _holdout(rest, [labels[i] for i in rest], held_count(val_ratio, n), seed)
    return {"train": train, "val": val, "test": test}


# --------------------------------------------------------------------------- arguments, layout


def check_ratios(val_ratio: float, test_ratio: float) -> None:
    """DataError unless the held-out shares are each in [0, 1) and leave something to train on."""
    if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
        raise DataError(
            f"val_ratio={val_ratio} and test_ratio={test_ratio} must each be in [0, 1) and sum to less than 1"
        )


def _check_args(layout: str, val_ratio: float, test_ratio: float, max_pixels: int) -> None:
    if layout not in LAYOUTS:
        raise DataError(f"unknown data layout '{layout}'; choose one of: {', '.join(LAYOUTS)}")
    check_ratios(val_ratio, test_ratio)
    if max_pixels < 1:
        raise DataError(f"max_pixels={max_pixels} must be a positive number of pixels")


def _detect_layout(target: str) -> str:
    if os.path.isfile(target):
        if target.lower().endswith(".csv"):
            return "csv"
        raise DataError(f"data path '{target}' is a file but not a .csv manifest; point data.path at a folder or a CSV")
    if os.path.isdir(os.path.join(target, "train")):
        return "split"
    stray = [name for name in ("val", "valid", "validation", "test") if os.path.isdir(os.path.join(target, name))]
    if stray:
        raise DataError(f"data path '{target}' has {stray[0]}/ but no train/; add train/<class>/ folders")
    return "flat"


def _require_dir(target: str, layout: str) -> None:
    if not os.path.isdir(target):
        raise DataError(f"layout={layout} needs a folder but '{target}' is a file; use layout=csv for a manifest")


def _find_flat(root: str) -> tuple[str, list[str], list[_Found]]:
    _require_dir(root, "flat")
    classes = _class_dirs(root)
    found = [_Found(p, c, None) for c in classes for p in _list_images(os.path.join(root, c))]
    if not found and any(_is_image_name(name) for name in os.listdir(root)):
        raise DataError(f"images in '{root}' must sit in one sub-folder per class, e.g. '{root}/cat/1.png'")
    return root, classes, found


def _find_split(root: str) -> tuple[str, list[str], list[_Found]]:
    _require_dir(root, "split")
    folders = {}
    for split, names in _SPLIT_NAMES.items():
        existing = [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]
        if existing:
            folders[split] = existing[0]
    if "train" not in folders:
        raise DataError(f"data path '{root}' has no train/ folder; use layout=flat for one sub-folder per class")
    classes = _class_dirs(folders["train"])
    found = []
    for split, folder in folders.items():
        for cls in _class_dirs(folder):
            if cls not in classes:
                raise DataError(
                    f"class '{cls}' in {split} is not in train; add train images for it or remove "
                    f"'{os.path.join(folder, cls)}'"
                )
            found += [_Found(p, cls, split) for p in _list_images(os.path.join(folder, cls))]
    return root, classes, found


def _find_csv(manifest: str, group_column: str | None = None) -> tuple[str, list[str], list[_Found]]:
    if not os.path.isfile(manifest):
        raise DataError(f"layout=csv needs a CSV manifest but '{manifest}' is a folder")
    root = os.path.dirname(manifest)
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            rows = _read_manifest(manifest, root, fh, group_column)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"cannot read manifest '{manifest}' ({exc}); save it as a UTF-8 CSV with header path,label"
        ) from None
    unique = {}
    for row in rows:
        unique.setdefault(row.path, row)
    if len(unique) < len(rows):
        logger.warning("manifest '%s' lists %d path(s) twice; kept the first", manifest, len(rows) - len(unique))
    found = sorted(unique.values())
    has_split = any(f.split is not None for f in found)
    classes = sorted({f.label for f in found if not has_split or f.split == "train"})
    for f in found:
        if f.label not in classes:
            raise DataError(f"class '{f.label}' in {f.split} is not in train; add train rows for it in '{manifest}'")
    return root, classes, found


def _read_manifest(manifest: str, root: str, fh: io.TextIOBase, group_column: str | None = None) -> list[_Found]:
    reader = csv.DictReader(fh)
    header = [(name or "").strip().lower() for name in (reader.fieldnames or [])]
    missing = [name for name in ("path", "label") if name not in header]
    if missing == ["label"] and "labels" in header:
        raise DataError(
            f"manifest '{manifest}' has a 'labels' column (several labels per image); set data.kind=multilabel, "
            "or name the column label for one class per image"
        )
    if missing:
        raise DataError(
            f"manifest '{manifest}' is missing column(s) {', '.join(missing)}; "
            "its header must be path,label (optionally split)"
        )
    reader.fieldnames = header
    group_key = check_group_column(manifest, header, group_column)
    rows = []
    for row in reader:
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise DataError(
                f"manifest '{manifest}' line {reader.line_num} has an empty path or label; fill it or delete the row"
            )
        split = None
        if "split" in header:
            value = (row.get("split") or "").strip().lower()
            split = _SPLIT_OF.get(value)
            if split is None:
                raise DataError(
                    f"manifest '{manifest}' line {reader.line_num} has split '{value}'; use train, val or test"
                )
        group = group_of(manifest, row, reader.line_num, group_key)
        rows.append(_Found(os.path.abspath(os.path.join(root, rel)), label, split, group))
    return rows


_FINDERS = {"flat": _find_flat, "split": _find_split, "csv": _find_csv}
assert set(_FINDERS) == set(_LAYOUT_HINT) == set(LAYOUTS) - {"auto"}, "data.layout choices and _FINDERS differ"


# --------------------------------------------------------------------------- walking folders


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; False when dangling
    except OSError:  # symlink loop
        return False


def _class_dirs(folder: str) -> list[str]:
    """Sorted names of the visible sub-folders (one per class)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))


def _list_images(folder: str) -> list[str]:
    """Sorted paths with an image extension under ``folder`` (recursive; hidden entries skipped).

    Entries are returned whatever they are (file, directory, broken symlink) so that
    verification can report the unusable ones instead of silently dropping them.
    """
    found, seen, stack = [], set(), [folder]
    while stack:
        current = stack.pop()
        try:
            info = os.stat(current)
            if (info.st_dev, info.st_ino) in seen:  # a symlinked folder we already walked
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = list(os.scandir(current))
        except OSError as exc:
            logger.warning("cannot list folder '%s' (%s); its images are skipped", current, exc.strerror or exc)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(entry.path)
            elif _is_dir(entry):
                stack.append(entry.path)
    return sorted(found)


# --------------------------------------------------------------------------- verification


def verify_files(paths: list[str], max_pixels: int = 89_478_485, workers: int = 4, cache: bool = True) -> list[tuple[str | None, str | None]]:
    """(reason or None, sha256 hex or None) per path, in the order given: every file read, hashed and decoded once.

    With ``cache``, files whose size, mtime, ctime and inode match what the scan cache stored for
    them keep their stored answer and are not read (``scan_cache.py``). Logs how many were verified.
    """
    verify = partial(_verify_all, max_pixels=max_pixels, workers=workers)
    if not cache:
        logger.info("verified %d image files (scan cache off)", len(paths))
        return verify(list(paths))
    context = f"checks {_CHECKS_VERSION}, Pillow {PIL.__version__}, max_pixels {max_pixels}"
    checks, verified = cached_checks(paths, context, verify)
    logger.info("verified %d of %d image files (%d from the scan cache)", verified, len(paths), len(paths) - verified)
    return checks


def _verify_all(paths: list[str], max_pixels: int, workers: int) -> list[tuple[str | None, str | None]]:
    if not paths:
        return []
    Image.init()  # import every format plugin once, here, rather than racing in the threads
    with warnings.catch_warnings():
        # Our own max_pixels check reports big images; PIL's warning would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Small images are Python-bound, so each task takes a chunk of files: one GIL hand-over
        # per chunk instead of per file. Big images decode in C with the GIL released.
        size = max(1, min(64, len(paths) // (workers * 4)))
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        if workers <= 1 or len(chunks) == 1:
            return _verify_chunk(paths, max_pixels)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pixelmill-scan") as pool:
            return [check for done in pool.map(_verify_chunk, chunks, [max_pixels] * len(chunks)) for check in done]


def _verify_chunk(paths: list[str], max_pixels: int) -> list[tuple[str | None, str | None]]:
    return [_verify(p, max_pixels) for p in paths]


def _verify(path: str, max_pixels: int) -> tuple[str | None, str | None]:
    """Read, hash and decode one file; never raises."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return ("broken link" if os.path.islink(path) else "missing file"), None
    except OSError as exc:
        return ("broken link" if exc.errno == errno.ELOOP else "unreadable"), None
    if not stat.S_ISREG(info.st_mode):  # a folder or a FIFO named like an image
        return "unreadable", None
    if info.st_size == 0:
        return "empty file", None
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return "unreadable", None
    if not data:
        return "empty file", None
    return _check_image(data, max_pixels), hashlib.sha256(data).hexdigest()


def _check_image(data: bytes, max_pixels: int) -> str | None:
    """Why ``data`` is not a usable image, or None."""
    if data.startswith(_PNG_SIGNATURE):
        problem = _png_chunk_problem(data)
        if problem:
            return problem
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # from the header: nothing decoded yet
            if width <= 0 or height <= 0:
                return "too small"
            if width * height > max_pixels:
                return "too many pixels"
            img.load()
    except Image.DecompressionBombError:
        return "too many pixels"
    except UnidentifiedImageError:
        return "corrupt" if data.startswith(_IMAGE_MAGIC) or data[8:12] == b"WEBP" else "not an image"
    except EOFError:
        return "truncated"
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error...
        return "truncated" if "truncat" in str(exc).lower() else "corrupt"
    return None


def _png_chunk_problem(data: bytes) -> str | None:
    """Walk the PNG chunks: a chunk cut short -> "truncated", a CRC mismatch -> "corrupt".

    Pillow does not cover this (checked against Pillow 13, ``LOAD_TRUNCATED_IMAGES`` off).
    ``Image.open`` checks the CRCs of the chunks before the first IDAT only, and ``load()``
    reads the IDAT data without its CRCs and stops there. So a file with a bad IDAT CRC (a
    flipped bit can still inflate), a bad CRC in a chunk after the image data, or a file cut
    inside the IEND chunk decodes without an error. ``Image.verify()`` does check the IDAT
    CRCs and the chunks after them, but:

    - it stops at IEND without reading IEND's CRC, so a bad IEND CRC or a file cut inside
      IEND passes;
    - it reports a chunk length over 2**31 - 1 as "Truncated File Read" (here: "corrupt");
    - it rejects a file with no IEND, which this check leaves to the decoder (such files are
      kept today);
    - it skips the CRC of every ancillary chunk once any code sets
      ``ImageFile.LOAD_TRUNCATED_IMAGES``, a process-wide flag;
    - a verified image cannot be loaded, so each PNG would be opened and parsed twice.
    """
    view, pos, end = memoryview(data), len(_PNG_SIGNATURE), len(data)
    while pos < end:
        if pos + 8 > end:
            return "truncated"
        length, kind = struct.unpack_from(">I4s", data, pos)
        if length > 0x7FFFFFFF:
            return "corrupt"
        stop = pos + 12 + length
        if stop > end:
            return "truncated"
        if zlib.crc32(view[pos + 4 : stop - 4]) != struct.unpack_from(">I", data, stop - 4)[0]:
            return "corrupt"
        if kind == b"IEND":
            return None
        pos = stop
    return None  # no IEND but nothing cut mid-chunk: let the decoder judge


# --------------------------------------------------------------------------- classes, splits, fingerprint


def check_usable(good: int, bad: list[BadFile]) -> None:
    """DataError, counting the reasons, when not one of the files is usable."""
    if not good:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(Counter(b.reason for b in bad).items()))
        raise DataError(f"none of the {len(bad)} image files is usable ({reasons}); replace or re-export them")


def _check_classes(classes: list[str], good: list[_Found], bad: list[BadFile], by_split: bool) -> None:
    check_usable(len(good), bad)
    counted = Counter(f.label for f in good if not by_split or f.split == "train")
    for cls in classes:
        if counted[cls] == 0:
            where = " in train" if by_split else ""
            raise DataError(
                f"class '{cls}' has no valid images{where} ({len(bad)} bad file(s) skipped in total); "
                "add images for it or remove it"
            )


def _assign_splits(
    good: list[_Found], classes: list[str], val_ratio: float, test_ratio: float, seed: int
) -> dict[str, list[tuple[str, int]]]:
    index = {name: i for i, name in enumerate(classes)}
    groups = {f.path: f.group for f in good if f.group is not None}
    items = sorted((f.path, index[f.label], f.split) for f in good)
    if all(split is None for _, _, split in items):
        labels = [label for _, label, _ in items]
        if groups:
            parts = group_split_indices(labels, [groups[p] for p, _, _ in items], val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
        else:
            parts = split_indices(labels, val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
        return {split: [items[i][:2] for i in parts[split]] for split in SPLITS}
    if groups:
        check_group_splits([(p, s, groups[p]) for p, _, s in items])
    splits = {split: [(p, label) for p, label, s in items if s == split] for split in SPLITS}
    if not splits["val"]:  # no val folder / rows: carve it from train
        train = splits["train"]
        labels = [label for _, label in train]
        count = held_count(val_ratio, len(train))
        if groups:
            keep, held = group_holdout(list(range(len(train))), labels, [groups[p] for p, _ in train], count, seed)
        else:
            keep, held = _holdout(list(range(len(train))), labels, count, seed)
        splits["train"], splits["val"] = [train[i] for i in keep], [train[i] for i in held]
    return splits


def find_leaks(splits: dict[str, list[tuple[str, object]]], sha256: dict[str, str]) -> list[dict]:
    """Byte-identical files (one sha256) that sit in more than one split: a model evaluated on a copy of a
    training image scores what it memorised. ``[{"sha256": ..., "files": [{"path", "split"}, ...]}]``, sorted."""
    by_hash: dict[str, list[dict[str, str]]] = {}
    for split, items in splits.items():
        for path, _ in items:
            by_hash.setdefault(sha256[path], []).append({"path": path, "split": split})
    leaks = []
    for digest, files in sorted(by_hash.items()):
        if len({f["split"] for f in files}) > 1:
            leaks.append({"sha256": digest, "files": sorted(files, key=lambda f: (SPLITS.index(f["split"]) if f["split"] in SPLITS else 9, f["path"]))})
    return leaks


def check_leakage(scan: ScanResult, policy: str) -> None:
    """``data.leakage``: ``warn`` logs the duplicated files across splits, ``error`` refuses them (DataError)."""
    if not scan.leaks:
        return
    first = scan.leaks[0]["files"]
    example = f"'{_relative(first[0]['path'], scan.root)}' ({first[0]['split']}) = '{_relative(first[1]['path'], scan.root)}' ({first[1]['split']})"
    text = f"{len(scan.leaks)} image(s) sit byte-identical in more than one split, e.g. {example}"
    if policy == "error":
        raise DataError(f"{text}; remove the copies (summary.json 'leaks' lists them) or set data.leakage=warn")
    logger.warning("%s; test figures on them are optimistic (listed in summary.json 'leaks'; data.leakage=error refuses)", text)


def check_group_column(manifest: str, header: list[str], group_column: str | None) -> str | None:
    """The header key of ``data.group_column`` (None when unset); DataError when the manifest lacks it."""
    if not group_column:
        return None
    key = group_column.strip().lower()
    if key not in header:
        raise DataError(f"manifest '{manifest}' has no column '{group_column}' (data.group_column); its columns are {', '.join(header)}")
    return key


def group_of(manifest: str, row: dict, line: int, key: str | None) -> str | None:
    """One row's group; DataError naming the line when its cell is empty."""
    if key is None:
        return None
    value = (row.get(key) or "").strip()
    if not value:
        raise DataError(f"manifest '{manifest}' line {line} has an empty {key}; fill in its group (data.group_column) or delete the row")
    return value


def check_group_splits(entries: Sequence[tuple[str, str | None, str]]) -> None:
    """User-given splits: DataError when one group (patient, part...) has files in two splits."""
    where: dict[str, dict[str, str]] = {}
    for path, split, group in entries:
        seen = where.setdefault(group, {})
        seen.setdefault(str(split), path)
        if len(seen) > 1:
            (s1, p1), (s2, p2) = list(seen.items())[:2]
            raise DataError(
                f"group '{group}' (data.group_column) is in {s1} ('{os.path.basename(p1)}') and {s2} ('{os.path.basename(p2)}'); "
                "put each group's files in one split"
            )


def group_holdout(positions: list[int], labels: Sequence, groups: Sequence[str], count: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``positions`` into sorted (kept, held out) with about ``count`` held out, whole groups only,
    stratified by ``labels`` as far as the groups allow (scikit-learn's StratifiedGroupKFold, one fold held out).

    ``labels[i]`` and ``groups[i]`` belong to ``positions[i]``.
    """
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    count = min(count, len(positions) - 1)
    if count <= 0:
        return sorted(positions), []
    at, group_at = np.asarray(positions), np.asarray(groups)
    n_groups = len(set(group_at.tolist()))
    if n_groups < 2:
        raise DataError("data.group_column: every file is in one group; a split needs at least 2 groups")
    folds = int(min(n_groups, max(2, round(len(at) / count))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members than n_splits"
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        kept, held = next(splitter.split(np.zeros(len(at)), np.asarray(labels), group_at))
    return sorted(at[kept].tolist()), sorted(at[held].tolist())


def group_split_indices(labels: Sequence, groups: Sequence[str], *, val_ratio: float, test_ratio: float, seed: int) -> dict[str, list[int]]:
    """Like ``split_indices``, but every group lands in one split (``group_holdout`` twice)."""
    n = len(labels)
    rest, test = group_holdout(list(range(n)), labels, groups, held_count(test_ratio, n), seed)
    train, val = group_holdout(rest, [labels[i] for i in rest], [groups[i] for i in rest], held_count(val_ratio, n), seed)
    return {"train": train, "val": val, "test": test}


def split_of(value: str) -> str | None:
    """The split a manifest's ``split`` cell names (train, val/valid/validation, test; any case), or None."""
    return _SPLIT_OF.get(value.strip().lower())


def held_count(ratio: float, n: int) -> int:
    """How many of ``n`` samples a split of ``ratio`` holds out."""
    return int(ratio * n + 0.5)


def _holdout(positions: list[int], labels: list, count: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``positions`` into sorted (kept, held out), holding out ``count`` stratified by label."""
    count = min(count, len(positions) - 1)
    if count <= 0:
        return sorted(positions), []
    from sklearn.model_selection import train_test_split  # heavy import: only when splitting

    try:
        kept, held = train_test_split(positions, test_size=count, stratify=labels, random_state=seed)
    except ValueError:  # a class too small to stratify, or fewer held-out slots than classes
        kept, held = _holdout_per_class(positions, labels, count, seed)
    return sorted(kept), sorted(held)


def _holdout_per_class(positions: list[int], labels: list, count: int, seed: int) -> tuple[list[int], list[int]]:
    """Fallback: spread ``count`` held-out slots over the classes by size (largest remainder),
    always keeping at least one image of each class."""
    import numpy as np

    by_class: dict = {}
    for pos, label in zip(positions, labels):
        by_class.setdefault(label, []).append(pos)
    names = sorted(by_class, key=str)
    sizes = np.array([len(by_class[c]) for c in names])
    quota = sizes * count / sizes.sum()
    n_held = np.minimum(np.floor(quota).astype(int), sizes - 1)
    spare = count - int(n_held.sum())
    rng = np.random.default_rng(seed)
    for i in np.lexsort((rng.permutation(len(names)), n_held - quota)):  # largest remainder first, ties seeded
        if spare > 0 and n_held[i] < sizes[i] - 1:
            n_held[i] += 1
            spare -= 1
    kept, held = [], []
    for name, n in zip(names, n_held):
        members = [by_class[name][i] for i in rng.permutation(len(by_class[name]))]
        held += members[:n]
        kept += members[n:]
    logger.info("a class is too small to stratify; held out %d of %d class by class", len(held), len(positions))
    return kept, held


def fingerprint(good: Sequence[tuple[str, str, str]], root: str) -> str:
    """sha256 over sorted (path relative to ``root``, label text, file sha256) of the usable files; first 16 hex chars."""
    digest = hashlib.sha256()
    for rel, label, file_sha in sorted((_relative(path, root), label, sha) for path, label, sha in good):
        label_bytes = label.encode("utf-8", "surrogateescape")
        digest.update(os.fsencode(rel) + b"\0" + label_bytes + b"\0" + file_sha.encode() + b"\n")
    return digest.hexdigest()[:16]


def _relative(path: str, root: str) -> str:
    inside = root if root.endswith(os.sep) else root + os.sep
    if path.startswith(inside) and os.path.normpath(path) == path and os.path.isabs(root):
        # What relpath answers for a normalised path under root (the scan's own paths), 10x faster:
        # relpath took half the time of a scan whose files all came from the scan cache.
        return path[len(inside) :].replace(os.sep, "/")
    try:
        return os.path.relpath(path, root).replace(os.sep, "/")
    except ValueError:  # another drive on Windows
        return path


def _printable(name: str) -> str:
    """File names that are not valid UTF-8 come back with surrogates; make them JSON/UTF-8 safe."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
