"""Built-in real data, shipped with scikit-learn (no network).

- ``digits``: the 1,797 8x8 handwritten digits as PNG class folders (split layout).
- ``breast_cancer`` and ``wine``: tabular CSVs whose ``target`` column holds class names.
- ``multidigits``: multi-label 64x64 RGB canvases of 0 to 3 of those digits, with a CSV manifest.
- ``patches``: 64x64 noise with one small striped patch at a random, recorded position; the
  stripes' direction is the class. Where a model looks can be checked against ``patches.csv``.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from pixelmill.data.scan import SPLITS, split_indices
from pixelmill.errors import DataError

logger = logging.getLogger(__name__)

VAL_RATIO = 0.15
TEST_RATIO = 0.15
_TABULAR_LOADERS = {"breast_cancer": "load_breast_cancer", "wine": "load_wine"}
_DIGIT_FILE = re.compile(r"^\d{4}\.png$")


def write_digits(out: str | Path, *, seed: int = 0, size: int = 32) -> dict[str, int]:
    """Write sklearn's digits as ``out/{train,val,test}/<digit>/<index:04d>.png`` (grayscale).

    Values 0..16 become uint8 0..255, upscaled to ``size`` x ``size`` (bilinear). The split is
    stratified 70/15/15 and seeded. Re-running overwrites, and removes digit files a
    previous run (another seed) put in another split. Returns the number of images per split.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if size < 1:
        raise DataError(f"digits size={size} must be a positive number of pixels")
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    labels = digits.target.tolist()
    parts = split_indices(labels, val_ratio=VAL_RATIO, test_ratio=TEST_RATIO, seed=seed)
    out = Path(out)
    written = set()
    for split in SPLITS:
        for i in parts[split]:
            folder = out / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{i:04d}.png"
            Image.fromarray(pixels[i]).resize((size, size), Image.Resampling.BILINEAR).save(target)
            written.add(target)
    _remove_stale_digits(out, written)
    counts = {split: len(parts[split]) for split in SPLITS}
    logger.info("wrote %d digit images to '%s': %s", len(labels), out, counts)
    return counts


def _remove_stale_digits(out: Path, written: set[Path]) -> None:
    """Delete ``NNNN.png`` files under out/<split>/<digit>/ that this run did not write."""
    for split in SPLITS:
        for digit in range(10):
            folder = out / split / str(digit)
            if folder.is_dir():
                for path in folder.iterdir():
                    if _DIGIT_FILE.match(path.name) and path not in written:
                        path.unlink()


def write_tabular(name: str, out: str | Path, *, seed: int = 0, single_file: bool = False) -> dict[str, int]:
    """Write a sklearn tabular dataset as CSV: snake_case feature columns plus ``target`` (class names).

    Writes ``train.csv``, ``val.csv`` and ``test.csv`` (stratified 70/15/15, seeded), or one
    ``data.csv`` when ``single_file``. Returns the number of rows per file stem.
    """
    if name not in _TABULAR_LOADERS:
        raise DataError(f"unknown tabular demo dataset '{name}'; choose one of: {', '.join(_TABULAR_LOADERS)}")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, _TABULAR_LOADERS[name])(as_frame=True)
    frame = bunch.data.copy()
    frame.columns = [snake_case(str(c)) for c in frame.columns]
    frame["target"] = np.asarray(bunch.target_names)[bunch.target.to_numpy()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if single_file:
        frame.to_csv(out / "data.csv", index=False)
        counts = {"data": len(frame)}
    else:
        parts = split_indices(frame["target"].tolist(), val_ratio=VAL_RATIO, test_ratio=TEST_RATIO, seed=seed)
        for split in SPLITS:
            frame.iloc[parts[split]].to_csv(out / f"{split}.csv", index=False)
        counts = {split: len(parts[split]) for split in SPLITS}
    logger.info("wrote %s (%d rows) to '%s': %s", name, len(frame), out, counts)
    return counts


def snake_case(name: str) -> str:
    """'mean radius' -> 'mean_radius', 'od280/od315_of_diluted_wines' -> 'od280_od315_of_diluted_wines'."""
    cleaned = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
    return f"f_{cleaned}" if not cleaned or cleaned[0].isdigit() else cleaned


# --------------------------------------------------------------------------- multidigits

MULTIDIGITS_SIZES: dict[str, int] = {"train": 1800, "val": 450, "test": 450}  # canvases per split
MULTIDIGITS_RATIOS = {"val": 0.2, "test": 0.2}  # source digits held out per split (train keeps 60%)
MULTIDIGITS_EMPTY_SHARE = 0.05  # canvases with no digit: an empty label set
MULTIDIGITS_CANVAS = 64  # square RGB canvas, a 2x2 grid of 32 px cells
MULTIDIGITS_DIGIT_SIZES = (28, 32)  # inclusive range of the upsampled digit's side, in pixels
MULTIDIGITS_MAX_DIGITS = 3
MULTIDIGITS_BACKGROUND = 48  # background noise is uniform in [0, MULTIDIGITS_BACKGROUND)
_CANVAS_FILE = re.compile(r"^\d{5}\.png$")


@dataclass(frozen=True)
class DigitCanvas:
    """One multidigits canvas before it is drawn: where each source digit goes.

    ``sources`` are indices into sklearn's ``load_digits()``; ``boxes`` holds one
    ``(x, y, side)`` per source (top-left corner and side of its square on the canvas).
    """

    split: str
    index: int
    sources: tuple[int, ...]
    boxes: tuple[tuple[int, int, int], ...]
    labels: tuple[str, ...]  # distinct digit classes drawn, sorted; () for a background-only canvas

    @property
    def path(self) -> str:
        """The image path relative to the manifest's folder."""
        return f"images/{self.split}/{self.index:05d}.png"


def multidigits_source_split(seed: int = 0) -> dict[str, list[int]]:
    """The ``load_digits()`` indices each split draws its canvases from (stratified 60/20/20, seeded, disjoint)."""
    from sklearn.datasets import load_digits

    return split_indices(load_digits().target.tolist(), val_ratio=MULTIDIGITS_RATIOS["val"], test_ratio=MULTIDIGITS_RATIOS["test"], seed=seed)


def plan_multidigits(*, seed: int = 0, per_split: Mapping[str, int] | None = None) -> list[DigitCanvas]:
    """Lay out every multidigits canvas (train, then val, then test) without drawing it.

    Each split only uses source digits from its own pool (``multidigits_source_split``), so
    no digit image of one split appears in another. A canvas holds 1 to 3 digits in distinct
    cells of a 2x2 grid, or (about 5% of canvases) none.
    """
    from sklearn.datasets import load_digits

    sizes = _multidigits_sizes(per_split)
    targets = load_digits().target
    pools = multidigits_source_split(seed)
    cell = MULTIDIGITS_CANVAS // 2
    low, high = MULTIDIGITS_DIGIT_SIZES
    canvases = []
    for split_no, split in enumerate(SPLITS):
        n = sizes[split]
        pool = np.asarray(pools[split])
        rng = np.random.default_rng([seed, split_no])
        empty = set(rng.choice(n, size=round(MULTIDIGITS_EMPTY_SHARE * n), replace=False).tolist()) if n else set()
        for i in range(n):
            count = 0 if i in empty else int(rng.integers(1, MULTIDIGITS_MAX_DIGITS + 1))
            sources = tuple(int(s) for s in rng.choice(pool, size=count, replace=False))
            cells = rng.permutation(4)[:count]
            boxes = []
            for c in cells.tolist():
                side = int(rng.integers(low, high + 1))
                x, y = (c % 2) * cell, (c // 2) * cell
                # the jitter keeps the digit inside its own cell, so digits never overlap
                boxes.append((x + int(rng.integers(0, cell - side + 1)), y + int(rng.integers(0, cell - side + 1)), side))
            labels = tuple(sorted({str(targets[s]) for s in sources}))
            canvases.append(DigitCanvas(split, i, sources, tuple(boxes), labels))
    return canvases


def write_multidigits(out: str | Path, *, seed: int = 0, per_split: Mapping[str, int] | None = None) -> dict[str, int]:
    """Write multi-label digit canvases as ``out/images/<split>/<index:05d>.png`` plus ``out/manifest.csv``.

    Each image is a 64x64 RGB canvas (dark noise) holding 1 to 3 of sklearn's digits, upsampled
    to 28-32 px and tinted, in distinct cells of a 2x2 grid; about 5% hold none. The manifest's
    header is ``path,labels,split``: paths relative to ``out``, labels the distinct digits drawn,
    sorted and ``|``-joined (empty for a background-only canvas). Source digits are split
    60/20/20 before drawing, so no test digit image appears in a train or val canvas.
    ``per_split`` overrides the canvas counts (default train 1800, val 450, test 450).
    Re-running replaces a previous run's manifest and images and is byte-identical for the
    same seed. Returns the number of canvases per split.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    canvases = plan_multidigits(seed=seed, per_split=per_split)
    train_labels = {label for c in canvases if c.split == "train" for label in c.labels}
    missing = sorted({str(d) for d in range(10)} - train_labels)
    if missing:
        raise DataError(f"multidigits train split has no canvas with digit(s) {', '.join(missing)}; use more train canvases")
    pixels = np.rint(load_digits().images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    out = Path(out)
    manifest = out / "manifest.csv"
    # no manifest while images change: an interrupted run never pairs old labels with new images
    manifest.unlink(missing_ok=True)
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    written = set()
    for canvas in canvases:
        target = out / canvas.path
        Image.fromarray(_draw_canvas(canvas, pixels, seed)).save(target)
        written.add(target)
    _remove_stale_canvases(out, written)
    tmp = manifest.with_name(manifest.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "labels", "split"])
        writer.writerows([c.path, "|".join(c.labels), c.split] for c in canvases)
    os.replace(tmp, manifest)
    counts = {split: sum(c.split == split for c in canvases) for split in SPLITS}
    logger.info("wrote %d multidigits canvases to '%s': %s", len(canvases), out, counts)
    return counts


def _multidigits_sizes(per_split: Mapping[str, int] | None) -> dict[str, int]:
    sizes = dict(MULTIDIGITS_SIZES)
    for split, n in (per_split or {}).items():
        if split not in sizes:
            raise DataError(f"multidigits per_split has unknown split '{split}'; choose from: {', '.join(SPLITS)}")
        if int(n) < 0:
            raise DataError(f"multidigits per_split[{split}]={n} must be a non-negative number of canvases")
        sizes[split] = int(n)
    return sizes


def _draw_canvas(canvas: DigitCanvas, pixels: np.ndarray, seed: int) -> np.ndarray:
    """The (64, 64, 3) uint8 image of ``canvas``: dark noise with each digit, tinted, on top."""
    from PIL import Image

    rng = np.random.default_rng([seed, SPLITS.index(canvas.split), canvas.index, 1])
    image = rng.integers(0, MULTIDIGITS_BACKGROUND, size=(MULTIDIGITS_CANVAS, MULTIDIGITS_CANVAS, 3)).astype(np.float64)
    for source, (x, y, side) in zip(canvas.sources, canvas.boxes):
        digit = np.asarray(Image.fromarray(pixels[source]).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
        tint = rng.integers(160, 256, size=3)
        patch = image[y : y + side, x : x + side]
        np.maximum(patch, digit[:, :, None] * tint, out=patch)
    return np.rint(image).astype(np.uint8)


def _remove_stale_canvases(out: Path, written: set[Path]) -> None:
    """Delete ``NNNNN.png`` files under out/images/<split>/ that this run did not write."""
    for split in SPLITS:
        folder = out / "images" / split
        if folder.is_dir():
            for path in folder.iterdir():
                if _CANVAS_FILE.match(path.name) and path not in written:
                    path.unlink()


PATCH_CLASSES = ("horizontal", "vertical")  # the direction of the stripes in the patch
PATCH_FILE = "patches.csv"  # path, label, split, top, left, size: where each image's evidence is


def write_patches(out: str | Path, *, seed: int = 0, per_split: Mapping[str, int] | None = None, size: int = 64, patch: int = 12) -> dict[str, int]:
    """Write the ``patches`` localisation set: ``OUT/<split>/<class>/NNNN.png`` and ``OUT/patches.csv``.

    Each image is grey noise with one ``patch`` x ``patch`` square of stripes two pixels wide,
    horizontal or vertical (the class), at a random position; nothing else tells the classes apart.
    """
    from PIL import Image

    counts = dict(per_split or {"train": 400, "val": 100, "test": 100})
    rng = np.random.default_rng(seed)
    out = Path(out)
    rows = []
    stripes = (np.arange(patch) // 2 % 2 * 200 + 28).astype(np.uint8)  # 28, 28, 228, 228, ...
    for split, n in counts.items():
        for i in range(n):
            label = PATCH_CLASSES[i % len(PATCH_CLASSES)]
            pixels = np.clip(rng.normal(128, 35, size=(size, size)), 0, 255).astype(np.uint8)
            top, left = (int(v) for v in rng.integers(0, size - patch + 1, size=2))
            block = np.repeat(stripes[:, None], patch, axis=1) if label == "horizontal" else np.repeat(stripes[None, :], patch, axis=0)
            pixels[top : top + patch, left : left + patch] = block
            path = out / split / label / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).convert("RGB").save(path)
            rows.append([path.relative_to(out).as_posix(), label, split, top, left, patch])
    with open(out / PATCH_FILE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "top", "left", "size"])
        writer.writerows(rows)
    logger.info("wrote patches to '%s': %s", out, counts)
    return counts


# name -> writer(out, *, seed) -> rows/images per split; a CLI dispatches on the name.
DEMO_DATASETS: dict[str, Callable[..., dict[str, int]]] = {
    "digits": write_digits,
    "breast_cancer": functools.partial(write_tabular, "breast_cancer"),
    "wine": functools.partial(write_tabular, "wine"),
    "multidigits": write_multidigits,
    "patches": write_patches,
}

# name -> the command to run next on a written dataset; ``{out}`` is its output folder.
DEMO_NEXT_STEPS: dict[str, str] = {
    "multidigits": "pixelmill train data.kind=multilabel data.path={out}/manifest.csv",
    "patches": "pixelmill train data.path={out} data.image_size=64 trainer.max_epochs=8, then pixelmill explain RUN_DIR {out}/test",
}
