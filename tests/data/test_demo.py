"""Built-in demo data: sklearn digits as PNG folders, sklearn tabular sets as CSV."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pixelmill.data.demo import DEMO_DATASETS, snake_case, write_digits, write_tabular
from pixelmill.errors import DataError

SPLITS = ("train", "val", "test")
SHARES = {"train": 0.70, "val": 0.15, "test": 0.15}


def _files(root: Path) -> dict[str, set[str]]:
    """split -> {"<digit>/<name>"} of the written PNGs."""
    return {s: {f"{p.parent.name}/{p.name}" for p in (root / s).glob("*/*.png")} for s in SPLITS}


def test_digits_counts_and_classes(digits_root: Path) -> None:
    files = _files(digits_root)
    assert sum(len(v) for v in files.values()) == 1797
    for split in SPLITS:
        assert sorted(p.name for p in (digits_root / split).iterdir()) == [str(d) for d in range(10)]
    names = [f.split("/")[1] for v in files.values() for f in v]
    assert len(set(names)) == 1797  # every sample written exactly once


def test_digits_split_is_stratified_70_15_15(digits_root: Path) -> None:
    from sklearn.datasets import load_digits

    per_class = Counter(load_digits().target.tolist())
    for split, share in SHARES.items():
        counts = Counter(int(f.split("/")[0]) for f in _files(digits_root)[split])
        for digit, total in per_class.items():
            # val and test are each within 1 of their share; train (the rest) absorbs both roundings
            tolerance = 2 if split == "train" else 1
            assert abs(counts[digit] - share * total) <= tolerance, (split, digit, counts[digit])


def test_digits_images_are_32x32_grayscale_with_the_right_digit(digits_root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for path in sorted((digits_root / "train").glob("*/*.png"))[:20]:
        with Image.open(path) as img:
            assert img.size == (32, 32) and img.mode == "L"
            index = int(path.stem)
            assert digits.target[index] == int(path.parent.name)
            # the 8x8 original, rescaled to 0..255, survives a downscale of the stored image
            small = np.asarray(img.resize((8, 8), Image.Resampling.BOX), dtype=float)
            assert np.corrcoef(small.ravel(), digits.images[index].ravel())[0, 1] > 0.9


def test_digits_is_deterministic_and_rerun_overwrites(digits_root: Path, tmp_path: Path) -> None:
    counts = write_digits(tmp_path, seed=0, size=32)
    assert counts == {s: len(v) for s, v in _files(digits_root).items()}
    assert _files(tmp_path) == _files(digits_root)
    first = (tmp_path / "train" / "0").iterdir().__next__()
    assert first.read_bytes() == (digits_root / "train" / "0" / first.name).read_bytes()

    write_digits(tmp_path, seed=1, size=32)  # another split, same folder: no stale leftovers
    moved = _files(tmp_path)
    assert moved != _files(digits_root)
    assert sum(len(v) for v in moved.values()) == 1797


def test_digits_size_option(tmp_path: Path) -> None:
    write_digits(tmp_path, size=16)
    path = next((tmp_path / "val").glob("*/*.png"))
    with Image.open(path) as img:
        assert img.size == (16, 16)


@pytest.mark.parametrize(
    ("name", "rows", "classes"),
    [("breast_cancer", 569, {"malignant", "benign"}), ("wine", 178, {"class_0", "class_1", "class_2"})],
)
def test_tabular_split_files(name: str, rows: int, classes: set[str], tmp_path: Path) -> None:
    counts = write_tabular(name, tmp_path, seed=0)
    assert set(counts) == set(SPLITS) and sum(counts.values()) == rows
    frames = {s: pd.read_csv(tmp_path / f"{s}.csv") for s in SPLITS}
    assert {s: len(f) for s, f in frames.items()} == counts
    for frame in frames.values():
        assert set(frame["target"]) == classes  # names, not integers; every class in every split
        assert all(c.isidentifier() and c == c.lower() for c in frame.columns)
    assert abs(counts["train"] - 0.7 * rows) <= 2
    # deterministic: same seed -> same files
    again = tmp_path / "again"
    write_tabular(name, again, seed=0)
    assert (again / "val.csv").read_bytes() == (tmp_path / "val.csv").read_bytes()


def test_tabular_single_file_and_column_names(tmp_path: Path) -> None:
    counts = write_tabular("breast_cancer", tmp_path, single_file=True)
    assert counts == {"data": 569}
    frame = pd.read_csv(tmp_path / "data.csv")
    assert "mean_radius" in frame.columns and frame.columns[-1] == "target"
    assert Counter(frame["target"]) == {"benign": 357, "malignant": 212}
    assert snake_case("od280/od315_of_diluted_wines") == "od280_od315_of_diluted_wines"


def test_unknown_tabular_name_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="breast_cancer, wine"):
        write_tabular("iris-ish", tmp_path)


def test_demo_registry_dispatches_by_name(tmp_path: Path) -> None:
    assert set(DEMO_DATASETS) == {"digits", "breast_cancer", "wine", "multidigits", "patches"}
    assert DEMO_DATASETS["wine"](tmp_path, seed=3) == write_tabular("wine", tmp_path / "direct", seed=3)
