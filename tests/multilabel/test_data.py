"""Multi-label manifests: parsed strictly, verified like single-label scans, split by iterative stratification."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelmill.errors import DataError
from pixelmill.tasks.multilabel.data import scan_manifest


def _images(root: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "img" / f"{i:03d}.png")
        names.append(f"img/{i:03d}.png")
    return names


def _manifest(root: Path, rows: list[str], header: str = "path,labels") -> Path:
    path = root / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_labels_no_finding_and_label_frequencies(tmp_path: Path) -> None:
    names = _images(tmp_path, 6)
    cells = ["Effusion|Atelectasis", "No Finding", "", "Effusion", " Atelectasis | Effusion ", "Mass"]
    splits = ["train", "train", "val", "train", "val", "train"]
    manifest = _manifest(tmp_path, [f"{n},{c},{s}" for n, c, s in zip(names, cells, splits)], "path,labels,split")
    scan = scan_manifest(manifest)
    assert scan.classes == ["Atelectasis", "Effusion", "Mass"]
    assert scan.class_counts("train") == {"Atelectasis": 1, "Effusion": 2, "Mass": 1}
    assert scan.class_counts("val") == {"Atelectasis": 1, "Effusion": 1, "Mass": 0}
    assert scan.no_label_counts() == {"train": 1, "val": 1, "test": 0}
    summary = scan.to_summary()
    assert summary["class_counts"]["val"] == {"Atelectasis": 1, "Effusion": 1, "Mass": 0}
    assert summary["no_label_counts"]["train"] == 1
    first = dict(scan.splits["train"])[str(tmp_path / names[0])]
    assert first.tolist() == [1.0, 1.0, 0.0]


def test_a_custom_separator_and_no_label_value(tmp_path: Path) -> None:
    names = _images(tmp_path, 4)
    manifest = _manifest(tmp_path, [f"{names[0]},a;b", f"{names[1]},none", f"{names[2]},b", f"{names[3]},a"])
    scan = scan_manifest(manifest, separator=";", no_label="none", val_ratio=0.25, test_ratio=0.0)
    assert scan.classes == ["a", "b"]
    assert sum(scan.counts().values()) == 4


def test_bad_files_are_skipped_and_counted_and_the_fingerprint_follows_labels(tmp_path: Path) -> None:
    names = _images(tmp_path, 8)
    (tmp_path / names[0]).write_bytes(b"not an image")
    rows = [f"{n},{'a|b' if i % 2 else 'a'}" for i, n in enumerate(names)]
    scan = scan_manifest(_manifest(tmp_path, rows), val_ratio=0.25, test_ratio=0.0)
    assert scan.bad_counts() == {"not an image": 1} and sum(scan.counts().values()) == 7
    rows[3] = f"{names[3]},b"
    changed = scan_manifest(_manifest(tmp_path, rows), val_ratio=0.25, test_ratio=0.0)
    assert changed.fingerprint != scan.fingerprint  # same files, another label set


@pytest.mark.parametrize(
    ("rows", "header", "needle"),
    [
        (["{0},a", "{1},a|b", "{2},c"], "path,labels,split", None),  # filled in below: val label not in train
        (["{0},a||b", "{1},a"], "path,labels", "line 2 has labels 'a||b' with an empty label"),
        (["{0},a|", "{1},a"], "path,labels", "line 2 has labels 'a|'"),
        (["{0},No Finding|a", "{1},a"], "path,labels", "lists 'No Finding' together with other labels"),
        (["{0},", "{1},No Finding"], "path,labels", "no row of"),
        (["{0},a", "{1},b"], "path,label", "data.kind=image"),
        (["{0},a", "{1},b"], "path,labels,split", "split ''"),
    ],
    ids=["unknown-in-val", "double-separator", "trailing-separator", "no-finding-mixed", "all-empty", "label-column", "empty-split"],
)
def test_bad_manifests_name_the_line_and_the_fix(tmp_path: Path, rows: list[str], header: str, needle: str | None) -> None:
    names = _images(tmp_path, 3)
    if needle is None:
        rows = [f"{names[0]},a,train", f"{names[1]},a|b,train", f"{names[2]},c,val"]
        needle = "line 4: label 'c' (val) has no train row"
    else:
        rows = [r.format(*names) for r in rows]
    with pytest.raises(DataError, match=needle.replace("|", r"\|").replace("(", r"\(").replace(")", r"\)")) as err:
        scan_manifest(_manifest(tmp_path, rows, header), val_ratio=0.3, test_ratio=0.0)
    assert "\n" not in str(err.value)


def test_a_label_left_without_train_images_is_named(tmp_path: Path) -> None:
    names = _images(tmp_path, 4)
    (tmp_path / names[3]).write_bytes(b"")  # the only 'rare' train image is empty
    rows = [f"{names[0]},a,train", f"{names[1]},a,val", f"{names[2]},rare,val", f"{names[3]},rare,train"]
    with pytest.raises(DataError, match="label 'rare' has no usable train image"):
        scan_manifest(_manifest(tmp_path, rows, "path,labels,split"))


def test_a_folder_is_refused_for_multilabel(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="not a CSV manifest.*path,labels"):
        scan_manifest(tmp_path)


def test_single_label_scan_points_a_labels_manifest_to_multilabel(tmp_path: Path) -> None:
    from pixelmill.data.scan import scan_images

    names = _images(tmp_path, 2)
    with pytest.raises(DataError, match="set data.kind=multilabel"):
        scan_images(_manifest(tmp_path, [f"{names[0]},a|b", f"{names[1]},a"]))


def test_automatic_split_is_seeded_and_keeps_label_shares(tmp_path: Path) -> None:
    """Without a split column: every label's share in val and test stays near its share overall."""
    rng = np.random.default_rng(1)
    names = _images(tmp_path, 300)
    labels = ["a", "b", "c", "d"]
    rates = [0.5, 0.2, 0.08, 0.04]
    rows = [f"{n},{'|'.join(lab for lab, r in zip(labels, rates) if rng.random() < r)}" for n in names]
    manifest = _manifest(tmp_path, rows)
    scan = scan_manifest(manifest, val_ratio=0.2, test_ratio=0.2, seed=3)
    again = scan_manifest(manifest, val_ratio=0.2, test_ratio=0.2, seed=3)
    other = scan_manifest(manifest, val_ratio=0.2, test_ratio=0.2, seed=4)
    assert scan.counts() == {"train": 180, "val": 60, "test": 60}
    assert [p for p, _ in scan.splits["val"]] == [p for p, _ in again.splits["val"]]
    assert [p for p, _ in scan.splits["val"]] != [p for p, _ in other.splits["val"]]
    overall = np.concatenate([scan.targets(s) for s in ("train", "val", "test")]).mean(axis=0)
    for split in ("train", "val", "test"):
        share = scan.targets(split).mean(axis=0)
        # iterative stratification: within one image of the exact share per label (a random split misses by ~3x more)
        assert np.all(np.abs(share - overall) <= 1.5 / len(scan.splits[split]) + 1e-9), (split, share, overall)


def test_cli_bad_manifest_exits_2_with_one_line_and_writes_no_run(tmp_path: Path) -> None:
    names = _images(tmp_path, 2)
    manifest = _manifest(tmp_path, [f"{names[0]},a||b", f"{names[1]},a"])
    out = subprocess.run(
        [sys.executable, "-m", "pixelmill.cli", "train", "data.kind=multilabel", f"data.path={manifest}", f"output_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert "line 2" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("summary.json"))


def test_monitor_defaults_to_map_and_must_be_a_multilabel_metric() -> None:
    from pixelmill.config import load_config
    from pixelmill.errors import ConfigError

    assert load_config(["data.kind=multilabel"]).trainer.monitor == "val/map"
    assert load_config([]).trainer.monitor == "val/acc"
    assert load_config(["data.kind=multilabel", "trainer.monitor=val/auc_macro"]).trainer.monitor == "val/auc_macro"
    with pytest.raises(ConfigError, match="multi-label image classification run logs: auto, val/map"):
        load_config(["data.kind=multilabel", "trainer.monitor=val/acc"])
    with pytest.raises(ConfigError, match="eval.threshold"):
        load_config(["data.kind=multilabel", "eval.threshold=youden-ish"])


def test_a_path_labels_manifest_selects_the_multilabel_task(tmp_path: Path) -> None:
    """`pixelmill train data.path=manifest.csv` needs no data.kind when the header says path,labels."""
    from pixelmill.config import load_config

    names = _images(tmp_path, 2)
    manifest = _manifest(tmp_path, [f"{names[0]},a|b", f"{names[1]},a"])
    cfg = load_config([f"data.path={manifest}"])
    assert cfg.data.kind == "multilabel" and cfg.trainer.monitor == "val/map" and cfg.data.label_separator == "|"
    single = _manifest(tmp_path, [f"{names[0]},a", f"{names[1]},b"], "path,label")
    assert load_config([f"data.path={single}"]).data.kind == "image"
    assert load_config([f"data.path={manifest}", "data.kind=image"]).data.kind == "image"  # an explicit kind wins
