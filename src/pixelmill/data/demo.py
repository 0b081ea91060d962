"""Built-in real data, shipped with scikit-learn (no network).

- ``digits``: the 1,797 8x8 handwritten digits as PNG class folders (split layout).
- ``breast_cancer`` and ``wine``: tabular CSVs whose ``target`` column holds class names.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Callable

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


# name -> writer(out, *, seed) -> rows/images per split; a CLI dispatches on the name.
DEMO_DATASETS: dict[str, Callable[..., dict[str, int]]] = {
    "digits": write_digits,
    "breast_cancer": functools.partial(write_tabular, "breast_cancer"),
    "wine": functools.partial(write_tabular, "wine"),
}
