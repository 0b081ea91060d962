"""Patient-, lesion- or part-level splits (data.group_column): a group never spans two splits."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelmill.data.scan import scan_images
from pixelmill.errors import DataError
from pixelmill.tasks.multilabel.data import scan_manifest


def _patients(root: Path, n_patients: int = 40, per: int = 3, multilabel: bool = False, split: bool = False) -> Path:
    """Several images per patient; a patient's images share its label (as a lesion's do)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["path,labels,patient" if multilabel else "path,label,patient"]
    if split:
        lines[0] += ",split"
    for p in range(n_patients):
        label = ("a|b" if p % 4 == 0 else "a" if p % 2 else "b") if multilabel else ("benign" if p % 3 else "malignant")
        for k in range(per):
            name = f"img/p{p:02d}_{k}.png"
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / name)
            lines.append(f"{name},{label},P{p:02d}" + (f",{'train' if p < 30 else 'test'}" if split else ""))
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def _group_splits(scan) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for split, items in scan.splits.items():
        for path, _ in items:
            out.setdefault(scan.groups[path], set()).add(split)
    return out


@pytest.mark.parametrize("multilabel", [False, True], ids=["single-label", "multi-label"])
def test_automatic_splits_keep_every_group_together(tmp_path: Path, multilabel: bool) -> None:
    manifest = _patients(tmp_path, multilabel=multilabel)
    if multilabel:
        scan = scan_manifest(manifest, group_column="patient", val_ratio=0.2, test_ratio=0.2, seed=1)
    else:
        scan = scan_images(manifest, group_column="patient", val_ratio=0.2, test_ratio=0.2, seed=1)
    assert all(len(splits) == 1 for splits in _group_splits(scan).values())
    counts = scan.counts()
    assert sum(counts.values()) == 120 and all(12 <= counts[s] <= 36 for s in ("val", "test"))  # whole patients, about 20% each
    header, rows = scan.split_table()
    assert header[-1] == "group" and {r[-1] for r in rows} == {f"P{p:02d}" for p in range(40)}
    # the same scan without groups mixes patients across splits: the constraint is real
    plain = scan_manifest(manifest, val_ratio=0.2, test_ratio=0.2, seed=1) if multilabel else scan_images(manifest, val_ratio=0.2, test_ratio=0.2, seed=1)
    where = {}
    for split, items in plain.splits.items():
        for path, _ in items:
            where.setdefault(Path(path).name.split("_")[0], set()).add(split)
    assert any(len(s) > 1 for s in where.values())


def test_a_group_in_two_given_splits_is_named(tmp_path: Path) -> None:
    manifest = _patients(tmp_path, split=True)
    text = manifest.read_text()
    assert ",P31,test\n" in text
    manifest.write_text(text.replace(",P31,test\n", ",P31,train\n", 1))  # one of P31's images moves to train
    with pytest.raises(DataError, match=r"group 'P31' \(data.group_column\) is in (train|test) \('p31_\d.png'\) and (train|test)"):
        scan_images(manifest, group_column="patient")


@pytest.mark.parametrize(
    ("edit", "column", "needle"),
    [
        (lambda t: t, "lesion", r"has no column 'lesion' \(data.group_column\); its columns are path, label, patient"),
        (lambda t: t.replace(",P05\n", ",\n", 1), "patient", r"line \d+ has an empty patient"),
    ],
    ids=["missing-column", "empty-cell"],
)
def test_bad_group_columns_are_one_line(tmp_path: Path, edit, column: str, needle: str) -> None:
    manifest = _patients(tmp_path)
    manifest.write_text(edit(manifest.read_text()))
    with pytest.raises(DataError, match=needle):
        scan_images(manifest, group_column=column)


def test_group_column_needs_a_manifest(tmp_path: Path, image_folder_factory) -> None:
    image_folder_factory(tmp_path / "flat", {"a": 3, "b": 3})
    with pytest.raises(DataError, match="data.group_column=patient needs a CSV manifest"):
        scan_images(tmp_path / "flat", group_column="patient")


def test_cli_missing_group_column_exits_2(tmp_path: Path) -> None:
    manifest = _patients(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "pixelmill.cli", "train", f"data.path={manifest}", "data.group_column=lesion", f"output_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "lesion" in errors[0] and "Traceback" not in out.stderr
    assert not any((tmp_path / "runs").rglob("summary.json")) if (tmp_path / "runs").exists() else True


def test_splits_csv_of_a_grouped_run(tmp_path: Path) -> None:
    from helpers import fast_train_overrides
    from pixelmill.config import load_config
    from pixelmill.training.fit import train

    manifest = _patients(tmp_path)
    result = train(load_config(fast_train_overrides(manifest, tmp_path / "runs", "data.group_column=patient", "eval.splits=[]", epochs=1)))
    with open(result.run_dir / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "split", "label", "group"] and len(rows) == 120
    by_group: dict[str, set[str]] = {}
    for row in rows:
        by_group.setdefault(row["group"], set()).add(row["split"])
        assert Path(row["path"]).name.startswith(row["group"].lower())
    assert len(by_group) == 40 and all(len(s) == 1 for s in by_group.values())


def test_tabular_data_says_how_to_split_by_group(tmp_path: Path) -> None:
    from pixelmill.config import load_config
    from pixelmill.errors import ConfigError
    from pixelmill.tasks import get_task

    (tmp_path / "rows.csv").write_text("x,patient,target\n1,P1,a\n2,P2,b\n")
    cfg = load_config(["data.kind=tabular", f"data.path={tmp_path / 'rows.csv'}", "data.target=target", "data.group_column=patient"])
    with pytest.raises(ConfigError, match="split the CSV by group into train.csv/val.csv/test.csv"):
        get_task("tabular").load_data(cfg)
