"""Trustworthy splits: byte-identical images across splits reported (or refused), splits.csv records where every
file went, and a train/val-only dataset still gets evaluated."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import fast_train_overrides
from pixelmill.config import load_config
from pixelmill.data.scan import scan_images
from pixelmill.training.fit import train


@pytest.fixture
def leaky(tmp_path: Path, image_folder_factory) -> Path:
    """train/val/test class folders; one training image copied (renamed) into test."""
    root = tmp_path / "leaky"
    image_folder_factory(root / "train", {"ok": 12, "nok": 12})
    image_folder_factory(root / "val", {"ok": 4, "nok": 4}, seed=1)
    image_folder_factory(root / "test", {"ok": 4, "nok": 4}, seed=2)
    shutil.copy(root / "train" / "nok" / "003.png", root / "test" / "nok" / "copy-of-003.png")
    return root


def test_a_copy_in_train_and_test_is_listed(leaky: Path) -> None:
    scan = scan_images(leaky)
    assert len(scan.leaks) == 1
    files = scan.to_summary()["leaks"][0]["files"]
    assert files == [{"path": "train/nok/003.png", "split": "train"}, {"path": "test/nok/copy-of-003.png", "split": "test"}]
    (leaky / "test" / "nok" / "copy-of-003.png").unlink()
    assert scan_images(leaky).leaks == []


def test_a_run_records_leaks_splits_and_shows_them(leaky: Path, tmp_path: Path, caplog) -> None:
    result = train(load_config(fast_train_overrides(leaky, tmp_path / "runs", "eval.splits=[test]", epochs=1)))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["data"]["leaks"][0]["files"][1]["path"] == "test/nok/copy-of-003.png"
    assert "sit byte-identical in more than one split" in caplog.text
    report = (result.run_dir / "report.html").read_text()
    assert "Leaks: 1" in report and "copy-of-003.png" in report
    with open(result.run_dir / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "split", "label"]
    assert len(rows) == len({r["path"] for r in rows}) == sum(summary["data"]["counts"].values()) == 41
    for row in rows:
        path = Path(row["path"])
        assert path.is_file() and path.parent.name == row["label"] and path.parent.parent.name == row["split"]


def test_leakage_error_refuses_in_one_line_and_writes_no_run(leaky: Path, tmp_path: Path) -> None:
    args = fast_train_overrides(leaky, tmp_path / "runs", "data.leakage=error", epochs=1)
    out = subprocess.run([sys.executable, "-m", "pixelmill.cli", "train", *args], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "copy-of-003.png" in errors[0] and "data.leakage=warn" in errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("summary.json"))


def test_a_train_val_dataset_is_evaluated_on_val(tmp_path: Path, image_folder_factory, caplog) -> None:
    root = tmp_path / "antsbees"
    image_folder_factory(root / "train", {"ants": 10, "bees": 10})
    image_folder_factory(root / "val", {"ants": 5, "bees": 5}, seed=1)
    result = train(load_config(fast_train_overrides(root, tmp_path / "runs", epochs=1)))
    assert "no test split: evaluated val instead" in caplog.text
    metrics = json.loads((result.run_dir / "eval" / "val" / "metrics.json").read_text())
    assert metrics["n"] == 10 and result.test_metrics["accuracy"] == metrics["accuracy"]
    assert json.loads((result.run_dir / "summary.json").read_text())["eval"]["val"]["n"] == 10
