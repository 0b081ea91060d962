"""Temperature scaling (eval.calibrate=temperature): fitted on val, lowers an over-confident model's ECE,
and lives inside the exported ONNX graph so every client gets calibrated probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fast_train_overrides
from pixelmill.config import load_config
from pixelmill.errors import ConfigError
from pixelmill.export import export_run
from pixelmill.inference.predictor import Predictor
from pixelmill.tasks.classification import fit_temperature, tempered_softmax
from pixelmill.training.fit import train


def test_fitted_temperature_minimises_the_validation_loss() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 500)
    logits = 4.0 * (rng.normal(size=(500, 4)) + 1.2 * np.eye(4)[y])  # over-confident: 4x too sharp
    t = fit_temperature(logits, y)
    z, target = torch.from_numpy(logits), torch.from_numpy(y)

    def nll(temperature: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / temperature, target))

    assert t > 2.0
    assert nll(t) <= min(nll(t * 0.9), nll(t * 1.1), nll(1.0))


@pytest.fixture(scope="module")
def calibrated(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An over-confident run (many steps, high learning rate, small data) calibrated on val."""
    out = tmp_path_factory.mktemp("calibrated")
    args = fast_train_overrides(digits_root, out / "runs", "eval.calibrate=temperature", "optim.lr=0.01", "eval.splits=[val,test]", epochs=8)
    return train(load_config(args)).run_dir


def test_temperature_scaling_lowers_validation_ece(calibrated: Path) -> None:
    record = json.loads((calibrated / "calibration.json").read_text())
    assert record["split"] == "val" and record["temperature"] > 0
    assert record["ece_after"] < record["ece_before"]
    val = json.loads((calibrated / "eval" / "val" / "metrics.json").read_text())
    assert val["calibration"]["temperature"] == pytest.approx(record["temperature"])
    assert val["ece"] == pytest.approx(record["ece_after"]) and val["ece_uncalibrated"] == pytest.approx(record["ece_before"])
    assert (calibrated / "eval" / "val" / "reliability.png").stat().st_size > 2000
    assert "Reliability diagram" in (calibrated / "report.html").read_text()


def test_the_bundle_carries_the_temperature_in_its_graph(calibrated: Path, digit_files: list[Path], tmp_path: Path) -> None:
    bundle = export_run(calibrated, out=tmp_path / "bundle")
    t = json.loads((calibrated / "calibration.json").read_text())["temperature"]
    assert bundle.meta["calibration"] == {"method": "temperature", "temperature": t}
    onnx = Predictor.load(bundle.path)
    batch = np.stack([onnx.classifier.prepare(str(f)) for f in digit_files[:6]])
    eager = Predictor.load(calibrated).classifier
    np.testing.assert_allclose(onnx.classifier.run(batch), eager.run(batch), atol=1e-4)
    # and they are the tempered probabilities, not the raw softmax
    from pixelmill.runs import load_run

    run = load_run(calibrated)
    x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - torch.tensor(run.preprocessing.mean).view(1, -1, 1, 1)) / torch.tensor(
        run.preprocessing.std
    ).view(1, -1, 1, 1)
    with torch.inference_mode():
        logits = run.net(x)
    np.testing.assert_allclose(onnx.classifier.run(batch), tempered_softmax(t)(logits).numpy(), atol=1e-4)
    assert not np.allclose(onnx.classifier.run(batch), torch.softmax(logits, 1).numpy(), atol=1e-3)


def test_a_tabular_model_is_calibrated_in_evaluation_eager_and_its_onnx_graph(tmp_path: Path) -> None:
    """Wine, over-trained: the temperature fitted on val is what evaluation, the run and the bundle all apply."""
    import csv

    from pixelmill.data.demo import write_tabular

    write_tabular("wine", tmp_path / "data")
    args = [
        "data=tabular", f"data.path={tmp_path / 'data'}", "data.target=target", "model=mlp", "logger=[csv]", "optim.lr=0.02",
        "trainer.progress_bar=false", "trainer.max_epochs=30", f"output_dir={tmp_path / 'runs'}", "eval.calibrate=temperature",
    ]
    run = train(load_config(args)).run_dir
    record = json.loads((run / "calibration.json").read_text())
    assert record["temperature"] != pytest.approx(1.0, abs=1e-3) and record["ece_after"] <= record["ece_before"]
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == pytest.approx(record["temperature"])
    bundle = export_run(run, out=tmp_path / "bundle")
    assert bundle.meta["calibration"] == {"method": "temperature", "temperature": record["temperature"]}
    with open(tmp_path / "data" / "test.csv", newline="") as fh:
        records = [{k: v for k, v in row.items() if k != "target"} for row in csv.DictReader(fh)]
    onnx, eager = Predictor.load(bundle.path).classifier, Predictor.load(run).classifier
    served = np.array([list(p.probabilities.values()) for p in onnx.predict_records(records)])
    np.testing.assert_allclose(served, [list(p.probabilities.values()) for p in eager.predict_records(records)], atol=1e-4)
    with open(run / "eval" / "test" / "predictions.csv", newline="") as fh:
        evaluated = np.array([[float(row[f"p_{c}"]) for c in bundle.classes] for row in csv.DictReader(fh)])
    np.testing.assert_allclose(served, evaluated, atol=1e-4)  # the calibrated probabilities evaluation reported


def test_an_unknown_or_multilabel_only_calibration_method_is_refused(digits_root: Path, tmp_path: Path) -> None:
    from pixelmill.tasks import get_task

    with pytest.raises(ConfigError, match="eval.calibrate"):
        load_config(["eval.calibrate=isotonic"])
    cfg = load_config(fast_train_overrides(digits_root, tmp_path / "runs", "eval.calibrate=platt"))
    task = get_task("image")
    with pytest.raises(ConfigError, match="eval.calibrate=platt applies to multi-label models"):
        task.check_data(cfg, task.load_data(cfg))
