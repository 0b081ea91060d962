"""eval.calibrate for multi-label runs: per-label temperature or Platt scaling fitted on val, thresholds chosen on the
calibrated probabilities, ECE before/after in metrics.json, and the calibration inside the exported graph."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import multilabel_overrides
from pixelmill.config import load_config
from pixelmill.evaluation.multilabel import label_calibration_error
from pixelmill.export import export_run
from pixelmill.inference.predictor import Predictor
from pixelmill.tasks.multilabel.training import fit_label_calibration, fit_label_temperatures
from pixelmill.training.fit import train


def test_each_label_gets_the_temperature_that_minimises_its_loss() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(600, 3)).astype(np.float64)
    y[:, 2] = 0.0  # a label without positives: nothing to fit
    # x = noise + 1.5 (2y - 1) has true log-odds 3x; logits s*x are over-confident by s / 3
    sharpness = np.array([6.0, 4.5, 6.0])
    logits = sharpness * (rng.normal(size=(600, 3)) + 1.5 * (2 * y - 1))
    t = fit_label_temperatures(logits, y)
    assert t[2] == 1.0
    assert t[0] == pytest.approx(2.0, rel=0.2) and t[1] == pytest.approx(1.5, rel=0.2)

    def bce(j: int, temperature: float) -> float:
        z, target = torch.from_numpy(logits[:, j] / temperature), torch.from_numpy(y[:, j])
        return float(torch.nn.functional.binary_cross_entropy_with_logits(z, target))

    for j in (0, 1):
        assert bce(j, t[j]) <= min(bce(j, t[j] * 0.9), bce(j, t[j] * 1.1), bce(j, 1.0))


def test_platt_scaling_also_removes_a_shift() -> None:
    """Positive weights in training shift a label's probabilities up: a bias, which a temperature alone cannot undo."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=(800, 2)).astype(np.float64)
    x = rng.normal(size=(800, 2)) + 1.5 * (2 * y - 1)  # true log-odds 3x
    scale, bias = fit_label_calibration(2.0 * x + 1.5, y, "platt")  # logits: too flat and shifted by +1.5
    np.testing.assert_allclose(scale, 1.5, rtol=0.2)
    np.testing.assert_allclose(bias, -1.5 * 1.5, atol=0.5)


def test_label_calibration_error_is_the_binned_gap_over_every_probability() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(size=(200, 4))
    y = (rng.uniform(size=(200, 4)) < p**2).astype(float)
    flat_p, flat_y = p.ravel(), y.ravel()
    expected = 0.0
    for b in range(15):
        inside = (flat_p > b / 15) & (flat_p <= (b + 1) / 15)
        if inside.any():
            expected += inside.mean() * abs(flat_y[inside].mean() - flat_p[inside].mean())
    assert label_calibration_error(y, p) == pytest.approx(expected)


@pytest.fixture(scope="module")
def calibrated(multidigits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A multi-label run trained with positive weights (its probabilities run high), Platt-calibrated on val."""
    out = tmp_path_factory.mktemp("ml-calibrated")
    args = multilabel_overrides(multidigits, out / "runs", "eval.calibrate=platt", "model.class_weights=auto", "optim.lr=0.01", "eval.splits=[val,test]", epochs=8)
    return train(load_config(args)).run_dir


def test_per_label_platt_scaling_lowers_validation_and_test_ece(calibrated: Path) -> None:
    record = json.loads((calibrated / "calibration.json").read_text())
    classes = json.loads((calibrated / "summary.json").read_text())["classes"]
    assert record["method"] == "platt" and list(record["scale"]) == list(record["bias"]) == classes
    assert record["ece_after"] < record["ece_before"]
    test = json.loads((calibrated / "eval" / "test" / "metrics.json").read_text())
    assert test["ece"] < test["ece_uncalibrated"]  # on images the fit never saw
    val = json.loads((calibrated / "eval" / "val" / "metrics.json").read_text())
    assert val["ece"] == pytest.approx(record["ece_after"]) and val["ece_uncalibrated"] == pytest.approx(record["ece_before"])
    assert "plots/reliability.png" in val["plots"] and (calibrated / "eval" / "val" / "plots" / "reliability.png").stat().st_size > 2000
    assert "Reliability diagram" in (calibrated / "report.html").read_text()


def test_thresholds_are_chosen_on_the_calibrated_probabilities(calibrated: Path) -> None:
    """max_f1 picks one of the val scores per label: those scores are the calibrated ones evaluation reports."""
    thresholds = json.loads((calibrated / "thresholds.json").read_text())["thresholds"]
    with open(calibrated / "eval" / "val" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for label, t in thresholds.items():
        scores = np.array([float(r[f"p_{label}"]) for r in rows])
        assert np.abs(scores - t).min() < 2e-6, label


def test_the_bundle_applies_the_calibration_in_its_graph(calibrated: Path, multidigits: Path, tmp_path: Path) -> None:
    bundle = export_run(calibrated, out=tmp_path / "bundle")
    record = json.loads((calibrated / "calibration.json").read_text())
    assert bundle.meta["calibration"] == {"method": "platt", "scale": record["scale"], "bias": record["bias"]}
    images = sorted(multidigits.parent.rglob("*.png"))[:8]
    onnx, eager = Predictor.load(bundle.path).classifier, Predictor.load(calibrated).classifier
    batch = np.stack([onnx.prepare(str(f)) for f in images])
    np.testing.assert_allclose(onnx.run(batch), eager.run(batch), atol=1e-4)
    from pixelmill.runs import load_run

    run = load_run(calibrated)
    prep = run.preprocessing
    x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - torch.tensor(prep.mean).view(1, -1, 1, 1)) / torch.tensor(prep.std).view(1, -1, 1, 1)
    with torch.inference_mode():
        logits = run.net(x)
    scale, bias = (torch.tensor([record[key][c] for c in bundle.classes]) for key in ("scale", "bias"))
    np.testing.assert_allclose(onnx.run(batch), torch.sigmoid(logits * scale + bias).numpy(), atol=1e-4)
    assert not np.allclose(onnx.run(batch), torch.sigmoid(logits).numpy(), atol=1e-3)
