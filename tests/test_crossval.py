"""Cross-validation as a user meets it: `pixelmill cv` on real digits, real trainings, real fold runs."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import fast_train_overrides
from pixelmill.crossval import assign_folds
from pixelmill.errors import DataError

PIXELMILL = [sys.executable, "-m", "pixelmill.cli"]
ENV = {**os.environ, "COLUMNS": "200"}


def _overrides(data: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    """The small CNN on 32x32 grayscale digits: 4 batches of 32 per epoch."""
    return fast_train_overrides(data, out, "trainer.limit_train_batches=4", *extra, epochs=epochs)


def _invoke(*args: str):
    from typer.testing import CliRunner

    from pixelmill.cli import app

    result = CliRunner().invoke(app, ["cv", *args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def _splits(run_dir: Path) -> dict[str, set[str]]:
    """A run's splits.csv: split -> the samples in it."""
    out: dict[str, set[str]] = {}
    with open(run_dir / "splits.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["split"], set()).add(row.get("path") or row["row"])
    return out


def _groups(run_dir: Path) -> dict[str, set[str]]:
    """A run's splits.csv: split -> the groups in it."""
    out: dict[str, set[str]] = {}
    with open(run_dir / "splits.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["split"], set()).add(row["group"])
    return out


@pytest.fixture(scope="module")
def digit_folders(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every 3rd digit image as <root>/{train,val,test}/<digit>/: the folder layout, a fixed test split."""
    import shutil

    root = tmp_path_factory.mktemp("digit-folders")
    for split in ("train", "val", "test"):
        for p in sorted((digits_root / split).rglob("*.png"))[::3]:
            (root / split / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / split / p.parent.name / p.name)
    return root


@pytest.fixture(scope="module")
def small_digits(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest path,label,split,patient of every 4th digit image; each patient has 3 images, all in one split."""
    path = tmp_path_factory.mktemp("small-digits") / "manifest.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "patient"])
        for split in ("train", "val", "test"):
            files = sorted((digits_root / split).rglob("*.png"))[::4]
            writer.writerows([str(p), p.parent.name, split, f"{split}-{i // 3}"] for i, p in enumerate(files))
    return path


@pytest.mark.slow
def test_three_folds_give_three_runs_and_a_summary_of_their_own_metrics(digit_folders, tmp_path):
    from typer.testing import CliRunner

    from pixelmill.cli import app

    out = tmp_path / "runs"
    result = _invoke("--folds", "3", "--name", "cv", *_overrides(digit_folders, out))
    cv_dir = out / "default" / "cv"
    run_dirs = [out / "default" / f"cv-fold-{k}" for k in (1, 2, 3)]
    assert sorted(p.name for p in (out / "default").iterdir()) == ["cv", "cv-fold-1", "cv-fold-2", "cv-fold-3"]
    assert all(json.loads((d / "summary.json").read_text())["status"] == "finished" for d in run_dirs)
    assert "accuracy" in result.output and "\u00b1" in result.output and "cv_report.html" in result.output

    # The summary's figures are those of the runs' own evaluations: mean and sample std per split.
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert sorted(summary["splits"]) == ["test", "val"] and "ddof=1" in summary["std"]
    for split in ("val", "test"):
        figures = [json.loads((d / "eval" / split / "metrics.json").read_text()) for d in run_dirs]
        part = summary["splits"][split]
        for key in ("accuracy", "f1_macro", "log_loss", "n"):
            values = [f[key] for f in figures]
            assert part["mean"][key] == pytest.approx(statistics.fmean(values))
            assert part["std"][key] == pytest.approx(statistics.stdev(values))
        assert [row["metrics"]["accuracy"] for row in part["per_fold"]] == [f["accuracy"] for f in figures]

    # Every train+val image is validated on in exactly one fold; the test split is the user's, fixed in every fold.
    pool = {str(p) for split in ("train", "val") for p in (digit_folders / split).rglob("*.png")}
    test = {str(p) for p in (digit_folders / "test").rglob("*.png")}
    splits = [_splits(d) for d in run_dirs]
    vals = [s["val"] for s in splits]
    assert sum(len(v) for v in vals) == len(pool) and set().union(*vals) == pool
    for s in splits:
        assert s["test"] == test and s["train"] == pool - s["val"]

    report = (cv_dir / "cv_report.html").read_text()
    assert report.count("fold 3</a>") == 2 and report.count("mean &plusmn; std") == 2
    assert "<script" not in report and "http" not in report and "src=" not in report  # self-contained
    cv = json.loads((cv_dir / "cv.json").read_text())
    assert cv["status"] == "finished" and cv["folds"] == 3 and cv["splitter"] == "StratifiedKFold"

    # A fold is an ordinary run.
    shown = CliRunner().invoke(app, ["runs", "show", str(run_dirs[0])])
    assert shown.exit_code == 0 and "cv-fold-1" in shown.output


def test_group_column_keeps_each_patient_in_one_split_of_every_fold(small_digits, tmp_path):
    out = tmp_path / "runs"
    _invoke("--folds", "3", "--name", "g", *_overrides(small_digits, out, "data.group_column=patient"))
    run_dirs = [out / "default" / f"g-fold-{k}" for k in (1, 2, 3)]
    assert json.loads((out / "default" / "g" / "cv.json").read_text())["splitter"] == "StratifiedGroupKFold"
    fold_groups = [_groups(d) for d in run_dirs]
    for groups in fold_groups:
        assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
    vals = [g["val"] for g in fold_groups]
    assert sum(len(v) for v in vals) == len(set().union(*vals))  # a patient is held out in one fold only
    assert len({frozenset(g["test"]) for g in fold_groups}) == 1


def test_mlflow_fold_runs_are_children_of_one_parent_with_the_mean_figures(small_digits, tmp_path):
    from mlflow.tracking import MlflowClient

    out, uri = tmp_path / "runs", f"sqlite:///{tmp_path}/mlruns.db"
    mlflow = ["logger=[csv,mlflow]", f"tracking.mlflow.uri={uri}", f"tracking.mlflow.artifact_location={tmp_path}/mlartifacts"]
    _invoke("--folds", "2", "--name", "m", *_overrides(small_digits, out, *mlflow))

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("default").experiment_id
    parent_id = json.loads((out / "default" / "m" / "cv.json").read_text())["mlflow_parent_run_id"]
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == ["m-fold-1", "m-fold-2"]
    parent = client.get_run(parent_id)
    summary = json.loads((out / "default" / "m" / "cv_summary.json").read_text())
    assert parent.info.status == "FINISHED" and parent.info.run_name == "m"
    assert parent.data.metrics["mean/test/accuracy"] == pytest.approx(summary["splits"]["test"]["mean"]["accuracy"])
    assert {"cv_summary.json", "cv_report.html"} <= {a.path for a in client.list_artifacts(parent_id)}


def test_tabular_rows_are_cross_validated_too(tmp_path):
    from pixelmill.data.demo import DEMO_DATASETS

    DEMO_DATASETS["breast_cancer"](tmp_path / "bc")
    out = tmp_path / "runs"
    _invoke("--folds", "2", "--name", "t", "data=tabular", f"data.path={tmp_path / 'bc'}", "data.target=target", "model=mlp",
            "trainer.max_epochs=1", "trainer.progress_bar=false", "logger=[csv]", f"output_dir={out}")
    splits = [_splits(out / "default" / f"t-fold-{k}") for k in (1, 2)]
    # Fold k's rows are its own train/val CSVs; each pool row is validated on once, the test rows stay put.
    assert [len(s["val"]) + len(s["train"]) for s in splits] == [399 + 85] * 2
    assert sum(len(s["val"]) for s in splits) == 399 + 85 and all(len(s["test"]) == 85 for s in splits)
    assert json.loads((out / "default" / "t" / "cv_summary.json").read_text())["splits"]["test"]["mean"]["n"] == 85


def test_label_sets_are_cross_validated_with_iterative_stratification(tmp_path):
    from pixelmill.data.demo import write_multidigits

    write_multidigits(tmp_path / "md", seed=0, per_split={"train": 90, "val": 30, "test": 30})
    out = tmp_path / "runs"
    overrides = ["data.kind=multilabel", f"data.path={tmp_path / 'md' / 'manifest.csv'}", "data.image_size=32", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=2", "trainer.progress_bar=false", "logger=[csv]", f"output_dir={out}"]
    result = _invoke("--folds", "2", "--name", "ml", *overrides)
    assert json.loads((out / "default" / "ml" / "cv.json").read_text())["splitter"] == "MultilabelStratifiedKFold"
    assert "mAP" in result.output
    assert sum(len(_splits(out / "default" / f"ml-fold-{k}")["val"]) for k in (1, 2)) == 120


def test_folds_of_label_sets_with_groups_keep_groups_whole_and_every_label_in_train():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 4)) < 0.3).astype(np.float32)
    groups = [f"p{i // 4}" for i in range(200)]
    fold_of = assign_folds(["a", "b", "c", "d"], labels, groups, 4, seed=0)
    assert set(fold_of.tolist()) == {1, 2, 3, 4}
    for group in set(groups):
        assert len({int(fold_of[i]) for i, g in enumerate(groups) if g == group}) == 1
    for fold in (1, 2, 3, 4):
        assert (labels[fold_of != fold].sum(axis=0) > 0).all()


def test_a_class_whose_groups_all_fall_in_one_fold_is_refused():
    labels = np.array([0] * 10 + [1] * 2)
    groups = [f"p{i}" for i in range(10)] + ["rare", "rare"]  # class 1 sits in one patient
    with pytest.raises(DataError, match="no training samples of class 'b'"):
        assign_folds(["a", "b"], labels, groups, 2, seed=0)


@pytest.mark.slow
def test_a_killed_cross_validation_resumes_at_the_fold_it_stopped_in(small_digits, tmp_path):
    out = tmp_path / "runs"
    cmd = PIXELMILL + ["cv", "--folds", "3", "--name", "r", *_overrides(small_digits, out, epochs=3)]
    worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=ENV)
    fold1, fold2 = out / "default" / "r-fold-1", out / "default" / "r-fold-2"
    deadline = time.time() + 300
    while not (fold2 / "checkpoints" / "last.ckpt").is_file():  # fold 2 finished an epoch
        assert worker.poll() is None and time.time() < deadline, "the cross-validation never reached fold 2"
        time.sleep(0.02)
    worker.kill()  # SIGKILL mid-fold: no chance to clean up
    worker.wait()
    stopped = json.loads((fold2 / "summary.json").read_text())
    fold1_ckpt = (fold1 / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    fold1_finished = json.loads((fold1 / "summary.json").read_text())["finished_at"]

    rerun = subprocess.run(PIXELMILL + ["cv", "--resume", str(out / "default" / "r")], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in (out / "default").iterdir()) == ["r", "r-fold-1", "r-fold-2", "r-fold-3"]
    for k in (1, 2, 3):
        assert json.loads((out / "default" / f"r-fold-{k}" / "summary.json").read_text())["status"] == "finished"
    # Fold 1 was kept as it was.
    assert (fold1 / "checkpoints" / "best.ckpt").stat().st_mtime_ns == fold1_ckpt
    assert json.loads((fold1 / "summary.json").read_text())["finished_at"] == fold1_finished
    # Fold 2 was killed after its first of 3 epochs; the same run went on from that checkpoint.
    resumed = json.loads((fold2 / "summary.json").read_text())
    # The kill may land between the checkpoint save and the summary update that counts the epoch.
    assert stopped["status"] == "running" and stopped.get("epochs_completed", 0) < 3
    assert resumed["created_at"] == stopped["created_at"] and resumed["epochs_completed"] == 3
    assert "Restored all states from the checkpoint" in (fold2 / "train.log").read_text()
    assert json.loads((out / "default" / "r" / "cv.json").read_text())["status"] == "finished"
    assert (out / "default" / "r" / "cv_summary.json").is_file()


def _few_groups(small_digits: Path, tmp_path: Path) -> Path:
    """The small manifest with only two patients in train+val."""
    path = tmp_path / "two-patients.csv"
    with open(small_digits, newline="") as src, open(path, "w", newline="") as dst:
        reader, writer = csv.DictReader(src), csv.writer(dst)
        writer.writerow(reader.fieldnames)
        for i, row in enumerate(reader):
            row["patient"] = row["patient"] if row["split"] == "test" else f"p{i % 2}"
            row["split"] = "train" if row["split"] == "val" else row["split"]  # a val split needs whole patients: carved from train
            writer.writerow(row.values())
    return path


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("one fold", ["--folds", "1"], "--folds must be at least 2 (got 1)"),
        ("more folds than groups", ["--folds", "3", "data.group_column=patient", "data.val_ratio=0.5"], "needs at least 3 groups (data.group_column=patient) in the train+val pool, but it has 2"),
        ("more folds than a class has", ["--folds", "60"], "but class '"),
        ("a key cv sets itself", ["--folds", "2", "run_name=x"], "'run_name' is set by cv"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(small_digits, tmp_path, case, args, message):
    data = _few_groups(small_digits, tmp_path) if "groups" in case else small_digits
    cmd = PIXELMILL + ["cv", *args, f"data.path={data}", f"output_dir={tmp_path / 'runs'}", "logger=[csv]"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
    if case == "more folds than a class has":
        assert "has " in errors[0] and "use --folds" in errors[0]  # how many it has, and what to do


def test_resume_of_a_folder_that_is_no_cross_validation_is_refused(digits_root, tmp_path):
    out = subprocess.run(PIXELMILL + ["cv", "--resume", str(digits_root)], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "is not a cross-validation directory (no cv.json)" in out.stderr
    assert not (digits_root / "cv.json").exists() and list(tmp_path.iterdir()) == []
