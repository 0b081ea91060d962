"""`pixelmill evaluate` on a trained run: splits, other folders, checkpoints, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from pixelmill.errors import DataError, RunError
from pixelmill.evaluation.evaluate import evaluate_run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the shared run, so evaluation outputs do not leak between tests."""
    return shutil.copytree(trained_run, tmp_path / "run")


def test_training_evaluated_the_test_split(trained_run):
    out = trained_run / "eval" / "test"
    for name in ("metrics.json", "classification_report.txt", "predictions.csv", "confusion_matrix.png", "roc.png", "pr.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["eval"]["test"]["accuracy"] == metrics["accuracy"]
    assert metrics["n"] == 270 and len(metrics["per_class"]) == 10
    html = (trained_run / "report.html").read_text()
    assert 'id="metrics"' in html and "finished" in html


def test_evaluate_val_split_and_last_checkpoint(run_copy):
    metrics, out = evaluate_run(run_copy, split="val", checkpoint="last")
    assert out == run_copy / "eval" / "val"
    assert metrics["n"] == 270
    assert json.loads((run_copy / "summary.json").read_text())["eval"]["val"]["accuracy"] == metrics["accuracy"]


def test_evaluate_other_folder_with_a_subset_of_classes(run_copy, digits_root, tmp_path):
    folder = tmp_path / "field"
    for digit in ("3", "7"):
        shutil.copytree(digits_root / "test" / digit, folder / digit)
    metrics, out = evaluate_run(run_copy, data=folder)
    assert metrics["n"] == len(list(folder.rglob("*.png")))
    assert out.name == "field"
    # Labels were mapped onto the run's class indices: only 3 and 7 have support.
    support = {name: m["support"] for name, m in metrics["per_class"].items() if m["support"]}
    assert set(support) == {"3", "7"}


def test_unknown_classes_are_named(run_copy, image_folder_factory, tmp_path):
    folder = image_folder_factory(tmp_path / "other", {"3": 2, "cat": 2, "dog": 2}, mode="L")
    with pytest.raises(DataError, match="cat, dog"):
        evaluate_run(run_copy, data=folder)


def test_cli_evaluate_and_errors(run_copy, tmp_path):
    cli = [sys.executable, "-m", "pixelmill.cli", "evaluate"]
    ok = subprocess.run(cli + [str(run_copy), "--split", "val"], capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""})
    assert ok.returncode == 0, ok.stderr
    assert "accuracy" in ok.stdout and "eval/val" in ok.stdout
    bad = subprocess.run(cli + [str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    with pytest.raises(RunError, match="no checkpoint"):
        evaluate_run(run_copy, checkpoint=str(tmp_path / "nope.ckpt"))
