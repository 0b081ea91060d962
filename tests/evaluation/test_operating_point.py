"""Binary operating points (eval.threshold, eval.positive_class): chosen on val by a stated rule, met on val,
reported at test with sensitivity/specificity/PPV/NPV, carried in bundle.json and applied by predict and serve."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score
from typer.testing import CliRunner

from helpers import clean_env, fast_train_overrides, serve_process
from pixelmill.cli import app
from pixelmill.config import load_config
from pixelmill.data.demo import write_tabular
from pixelmill.export import export_run
from pixelmill.inference.predictor import Predictor
from pixelmill.training.fit import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tabular_overrides(root: Path, *extra: str) -> list[str]:
    return [
        "data=tabular", f"data.path={root / 'data'}", "data.target=target", "model=mlp", "logger=[csv]",
        "trainer.progress_bar=false", "trainer.max_epochs=4", f"output_dir={root / 'runs'}", *extra,
    ]


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Breast cancer screening: malignant is the finding; the threshold must catch 95% of them on val."""
    root = tmp_path_factory.mktemp("sensitive")
    write_tabular("breast_cancer", root / "data")
    result = train(load_config(_tabular_overrides(root, "eval.threshold=sensitivity@0.95", "eval.positive_class=malignant", "eval.splits=[train,val,test]")))
    assert result.status == "finished"
    return result.run_dir


ROUNDING = 1e-6  # predictions.csv keeps 6 decimals; the threshold is one of the scores, unrounded


def _train_cli(args: list[str]) -> subprocess.CompletedProcess:
    """``pixelmill train ARGS`` as a user runs it (user errors: one line on stderr, exit code 2)."""
    return subprocess.run([sys.executable, "-m", "pixelmill.cli", "train", *args], capture_output=True, text=True, env=clean_env({}))


def _predictions(run: Path, split: str) -> list[dict[str, str]]:
    with open(run / "eval" / split / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_the_threshold_meets_its_sensitivity_on_val(sensitive: Path) -> None:
    record = json.loads((sensitive / "threshold.json").read_text())
    assert record["rule"] == "sensitivity@0.95" and record["positive"] == "malignant"
    rows = _predictions(sensitive, "val")
    y = np.array([r["true"] == "malignant" for r in rows])
    p = np.array([float(r["p_malignant"]) for r in rows])
    decided = p >= record["threshold"] - ROUNDING
    assert recall_score(y, decided) >= 0.95
    # The most specific such threshold: the next higher score would miss the target.
    higher = p[p > record["threshold"] + ROUNDING]
    if higher.size:
        assert recall_score(y, p >= higher.min()) < 0.95
    assert record["val"]["sensitivity"] == pytest.approx(recall_score(y, decided))
    # It is not the argmax decision: a stated sensitivity moves the threshold off 0.5.
    assert record["threshold"] != 0.5


def test_test_metrics_are_at_the_operating_point_and_match_scikit_learn(sensitive: Path) -> None:
    metrics = json.loads((sensitive / "eval" / "test" / "metrics.json").read_text())
    threshold = json.loads((sensitive / "threshold.json").read_text())["threshold"]
    rows = _predictions(sensitive, "test")
    y = np.array([r["true"] == "malignant" for r in rows])
    p = np.array([float(r["p_malignant"]) for r in rows])
    decided = p >= threshold - ROUNDING
    assert [r["predicted"] == "malignant" for r in rows] == decided.tolist()
    point = metrics["operating_point"]
    assert point["positive"] == "malignant" and point["threshold"] == pytest.approx(threshold)
    assert metrics["sensitivity"] == pytest.approx(recall_score(y, decided))
    assert metrics["specificity"] == pytest.approx(recall_score(~y, ~decided))
    assert metrics["ppv"] == pytest.approx(precision_score(y, decided))
    assert metrics["npv"] == pytest.approx(precision_score(~y, ~decided))
    assert metrics["accuracy"] == pytest.approx(float(np.mean(decided == y)))
    assert point["tp"] + point["fn"] == int(y.sum())
    for name in ("sensitivity", "specificity"):
        low, high = metrics["ci95"][name]
        assert low <= metrics[name] <= high
    report = (sensitive / "report.html").read_text()
    assert ">specificity<" in report and ">npv<" in report
    # eval.splits=[train,val,test]: each split evaluated, each with its own column and section in the report
    assert all((sensitive / "eval" / split / "metrics.json").is_file() for split in ("train", "val", "test"))
    assert all(f"<h3>{split}</h3>" in report for split in ("train", "val", "test"))


def test_bundle_predict_and_serve_apply_the_threshold(sensitive: Path, tmp_path: Path) -> None:
    bundle = export_run(sensitive, out=tmp_path / "bundle")
    threshold = json.loads((sensitive / "threshold.json").read_text())["threshold"]
    assert bundle.meta["threshold"] == pytest.approx(threshold) and bundle.meta["positive_class"] == "malignant"
    test_csv = sensitive.parents[2] / "data" / "test.csv"  # ROOT/runs/<experiment>/<run>
    out = tmp_path / "predicted.csv"
    result = CliRunner().invoke(app, ["predict", str(bundle.path), str(test_csv), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        predicted = list(csv.DictReader(fh))
    p = np.array([float(r["p_malignant"]) for r in predicted])
    assert [r["label"] == "malignant" for r in predicted] == (p >= threshold).tolist()
    # The run's own test decisions, row for row.
    assert [r["label"] for r in predicted] == [r["predicted"] for r in _predictions(sensitive, "test")]

    # Records between the threshold and 0.5 are where argmax and the operating point differ.
    records = [{k: v for k, v in r.items() if k != "target"} for r in csv.DictReader(open(test_csv, newline=""))]
    onnx = Predictor.load(bundle.path)
    answers = onnx.classifier.predict_records(records)
    assert all(a.threshold == pytest.approx(threshold) and a.positive_class == "malignant" for a in answers)
    with serve_process(str(bundle.path), tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        body = http.post("/predict", json={"records": records}).json()
        served = [a["label"] for a in body["predictions"]]
        assert served == [a.label for a in answers]
        assert body["predictions"][0]["threshold"] == pytest.approx(threshold)
        strict = http.post("/predict", params={"threshold": 0.999999}, json={"records": records}).json()["predictions"]
        assert [a["label"] == "malignant" for a in strict] == [a["probabilities"]["malignant"] >= 0.999999 for a in strict]
        assert sum(a["label"] == "malignant" for a in strict) < sum(label == "malignant" for label in served)
        info = http.get("/model").json()
        assert info["threshold"] == pytest.approx(threshold) and info["positive_class"] == "malignant"


def test_a_binary_run_without_a_rule_decides_by_argmax_at_one_half(tmp_path: Path) -> None:
    write_tabular("breast_cancer", tmp_path / "data")
    run = train(load_config(_tabular_overrides(tmp_path, "trainer.max_epochs=1", "eval.bootstrap=0"))).run_dir
    record = json.loads((run / "threshold.json").read_text())
    assert record == record | {"rule": "0.5", "positive": "malignant", "threshold": 0.5}  # the second class in class order
    rows = _predictions(run, "test")
    argmax = [max(("benign", "malignant"), key=lambda c: float(r[f"p_{c}"])) for r in rows]
    assert [r["predicted"] for r in rows] == argmax
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert {"sensitivity", "specificity", "ppv", "npv"} <= set(metrics)


def test_image_operating_point_runs_through_the_eager_and_onnx_runtimes(image_folder_factory, tmp_path: Path) -> None:
    """Folders sort as defect, good: eval.positive_class names the finding; youden picks the threshold."""
    for split, n in (("train", 40), ("val", 20), ("test", 20)):
        image_folder_factory(tmp_path / "data" / split, {"defect": n // 2, "good": n // 2}, seed=len(split))
    args = fast_train_overrides(tmp_path / "data", tmp_path / "runs", "model.in_chans=3", "eval.threshold=youden", "eval.positive_class=defect", epochs=2)
    run = train(load_config(args)).run_dir
    record = json.loads((run / "threshold.json").read_text())
    assert record["positive"] == "defect" and record["rule"] == "youden"
    bundle = export_run(run, out=tmp_path / "bundle")
    assert bundle.meta["positive_class"] == "defect"
    images = sorted((tmp_path / "data" / "test").rglob("*.png"))
    eager, onnx = Predictor.load(run), Predictor.load(bundle.path)
    for answers in (eager.predict(images), onnx.predict(images)):
        assert [a.label == "defect" for a in answers] == [a.probabilities["defect"] >= record["threshold"] for a in answers]
    assert [a.label for a in eager.predict(images)] == [a.label for a in onnx.predict(images)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("eval.threshold=sensitivity@0.99",), "needs at least 100 positive validation"),
        (("eval.positive_class=healthy",), "eval.positive_class 'healthy' is not a class"),
    ],
)
def test_a_binary_rule_the_data_cannot_serve_fails_before_training(tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    write_tabular("breast_cancer", tmp_path / "data")
    result = _train_cli(_tabular_overrides(tmp_path, *extra))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_threshold_on_a_ten_class_model_is_refused(digits_root: Path, tmp_path: Path) -> None:
    result = _train_cli(fast_train_overrides(digits_root, tmp_path / "runs", "eval.threshold=youden"))
    assert result.returncode == 2 and "apply to binary models; this one has 10 classes" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_calibration_on_a_one_class_val_split_fails_before_training(image_folder_factory, tmp_path: Path) -> None:
    image_folder_factory(tmp_path / "data" / "train", {"cat": 10, "dog": 10})
    image_folder_factory(tmp_path / "data" / "val", {"cat": 6})
    args = fast_train_overrides(tmp_path / "data", tmp_path / "runs", "model.in_chans=3", "eval.calibrate=temperature")
    result = _train_cli(args)
    assert result.returncode == 2 and "needs validation samples of at least 2 classes; the val split has 6 cat, 0 dog" in result.stderr
    assert not (tmp_path / "runs").exists()
