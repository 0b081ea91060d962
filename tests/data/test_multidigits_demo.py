"""Built-in multi-label demo data: multidigits canvases of 0 to 3 sklearn digits plus a CSV manifest."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelmill.data.demo import DEMO_DATASETS, MULTIDIGITS_BACKGROUND, multidigits_source_split, plan_multidigits, write_multidigits
from pixelmill.errors import DataError

SPLITS = ("train", "val", "test")
SMALL = {"train": 200, "val": 60, "test": 60}
CELL = 32


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multidigits")
    assert write_multidigits(root, seed=0, per_split=SMALL) == SMALL
    return root


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    return load_digits()


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_manifest_header_and_rows(small_root: Path) -> None:
    lines = (small_root / "manifest.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path,labels,split"
    rows = _rows(small_root)
    assert Counter(r["split"] for r in rows) == SMALL
    for row in rows:
        assert row["path"] == f"images/{row['split']}/{Path(row['path']).name}"
        labels = row["labels"].split("|") if row["labels"] else []
        assert labels == sorted(set(labels)) and len(labels) <= 3
        assert all(label in {str(d) for d in range(10)} for label in labels)
        with Image.open(small_root / row["path"]) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    # every file on disk is in the manifest and vice versa
    on_disk = {str(p.relative_to(small_root)) for p in (small_root / "images").rglob("*.png")}
    assert on_disk == {r["path"] for r in rows}
    assert {label for r in rows if r["split"] == "train" for label in r["labels"].split("|") if label} == {str(d) for d in range(10)}


def test_labels_are_the_distinct_digits_visible_in_the_image(small_root: Path, digits) -> None:
    """Read the labels back from the pixels: which cells hold a digit, and which source digit it is."""
    rows = {r["path"]: r for r in _rows(small_root)}
    plan = plan_multidigits(seed=0, per_split=SMALL)
    checked_repeat = False
    for canvas in plan[:40] + plan[-20:]:
        image = np.asarray(Image.open(small_root / canvas.path), dtype=float)
        bright = image.max(axis=2) > MULTIDIGITS_BACKGROUND + 40
        occupied = {(x // CELL, y // CELL) for x, y, _ in canvas.boxes}
        for cx in range(2):
            for cy in range(2):
                has_ink = bright[cy * CELL : (cy + 1) * CELL, cx * CELL : (cx + 1) * CELL].any()
                assert has_ink == ((cx, cy) in occupied), (canvas.path, cx, cy)
        for source, (x, y, side) in zip(canvas.sources, canvas.boxes):
            crop = Image.fromarray(image[y : y + side, x : x + side].max(axis=2).astype(np.uint8))
            small = np.asarray(crop.resize((8, 8), Image.Resampling.BOX), dtype=float).ravel()
            scores = np.array([np.corrcoef(small, d.ravel())[0, 1] for d in digits.images])
            assert scores[source] > 0.9, (canvas.path, source, scores[source])
        drawn = [int(digits.target[s]) for s in canvas.sources]
        checked_repeat |= len(set(drawn)) < len(drawn)
        expected = "|".join(sorted({str(d) for d in drawn}))
        assert rows[canvas.path]["labels"] == expected, canvas.path
    # a set, not a list: some canvas drew the same class twice and lists it once
    assert checked_repeat or any(len({digits.target[s] for s in c.sources}) < len(c.sources) for c in plan)


def test_no_source_digit_is_shared_between_splits(digits) -> None:
    pools = multidigits_source_split(seed=0)
    assert sum(len(p) for p in pools.values()) == len(digits.target)
    assert {s: round(len(p) / len(digits.target), 2) for s, p in pools.items()} == {"train": 0.6, "val": 0.2, "test": 0.2}
    plan = plan_multidigits(seed=0, per_split=SMALL)
    used = {split: {s for c in plan if c.split == split for s in c.sources} for split in SPLITS}
    for split in SPLITS:
        assert used[split] <= set(pools[split])
    assert not used["test"] & (used["train"] | used["val"])
    assert not used["val"] & used["train"]
    # the same holds for the pixels themselves, not only the indices (sklearn's digits hold no duplicates across pools)
    blocks = {split: {digits.images[i].tobytes() for i in used[split]} for split in SPLITS}
    assert not blocks["test"] & (blocks["train"] | blocks["val"])


def test_empty_label_share_is_small_but_present(small_root: Path) -> None:
    rows = _rows(small_root)
    for split in SPLITS:
        labels = [r["labels"] for r in rows if r["split"] == split]
        share = labels.count("") / len(labels)
        assert 0 < share <= 0.1, (split, share)
    for row in rows:
        if not row["labels"]:  # background only: nothing bright anywhere
            assert np.asarray(Image.open(small_root / row["path"])).max() < MULTIDIGITS_BACKGROUND


def test_same_seed_same_bytes_and_rerun_replaces(small_root: Path, tmp_path: Path) -> None:
    write_multidigits(tmp_path, seed=0, per_split=SMALL)
    assert _tree(tmp_path) == _tree(small_root)

    write_multidigits(tmp_path, seed=1, per_split={"train": 150, "val": 20, "test": 20})
    rows = _rows(tmp_path)
    assert len(rows) == 190 and (tmp_path / "manifest.csv").read_bytes() != (small_root / "manifest.csv").read_bytes()
    assert {str(p.relative_to(tmp_path)) for p in (tmp_path / "images").rglob("*.png")} == {r["path"] for r in rows}
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_sizes_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'valid'"):
        write_multidigits(tmp_path, per_split={"valid": 10})
    with pytest.raises(DataError, match="no canvas with digit"):
        write_multidigits(tmp_path, per_split={"train": 2, "val": 2, "test": 2})
    assert not (tmp_path / "manifest.csv").exists()


def test_cli_writes_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from typer.testing import CliRunner

    from pixelmill.cli import app

    assert DEMO_DATASETS["multidigits"] is write_multidigits
    monkeypatch.setitem(DEMO_DATASETS, "multidigits", functools.partial(write_multidigits, per_split=SMALL))
    out = tmp_path / "md"
    result = CliRunner().invoke(app, ["data", "demo", "multidigits", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.csv").is_file()
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert f"wrote multidigits to {out}: train 200, val 60, test 60" in printed
    assert f"next: pixelmill train data.kind=multilabel data.path={out}/manifest.csv" in printed
