"""train() on CSVs: scikit-learn's real tables through the same module, callbacks, run dir, evaluation and report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pixelmill.config import load_config, load_saved
from pixelmill.data.demo import write_tabular
from pixelmill.errors import ConfigError, DataError
from pixelmill.evaluation.evaluate import evaluate_run
from pixelmill.training.checkpoint import net_state_dict, read_checkpoint
from pixelmill.training.fit import resume, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _overrides(path: Path, out: Path, *extra: str) -> list[str]:
    # The issue's own command line: data.kind / model.name pick the packaged tabular and mlp defaults.
    return [
        "data.kind=tabular", f"data.path={path}", "data.target=target", "model.name=mlp",
        "logger=[csv]", "trainer.progress_bar=false", f"output_dir={out}", *extra,
    ]


@pytest.fixture(scope="module")
def bc_run(tmp_path_factory: pytest.TempPathFactory):
    """breast_cancer as train/val/test CSVs, the packaged tabular + mlp configs, default trainer."""
    root = tmp_path_factory.mktemp("bc")
    write_tabular("breast_cancer", root / "data")
    return train(load_config(_overrides(root / "data", root / "runs", "run_name=bc")))


def test_breast_cancer_mlp_reaches_95_percent(bc_run) -> None:
    run = bc_run.run_dir
    assert bc_run.status == "finished"
    assert bc_run.test_metrics["accuracy"] >= 0.95
    for name in ("schema.json", "preprocessor.joblib", "checkpoints/best.ckpt", "eval/test/metrics.json", "report.html"):
        assert (run / name).is_file(), name
    assert not (run / "eval" / "test" / "misclassified.png").exists()  # no image gallery for rows
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preprocessing"] == {"kind": "tabular", "schema": "schema.json", "preprocessor": "preprocessor.joblib", "n_features": 30}
    assert summary["classes"] == ["benign", "malignant"] and summary["data"]["counts"] == {"train": 399, "val": 85, "test": 85}
    assert len(summary["data"]["features"]) == 30 and summary["data"]["features"][0]["column"] == "mean_radius"
    schema = json.loads((run / "schema.json").read_text())
    assert schema["target"] == "target" and {c["type"] for c in schema["columns"]} == {"numeric"}
    with open(run / "eval" / "test" / "predictions.csv") as f:
        first = next(csv.DictReader(f))
    assert first["path"].startswith("test.csv:") and first["true"] in ("benign", "malignant")
    html = (run / "report.html").read_text()
    assert 'id="features"' in html and "worst_concave_points" in html and 'id="misclassified"' not in html


def test_evaluate_a_split_and_another_csv(bc_run, tmp_path: Path) -> None:
    run = bc_run.run_dir
    val, out = evaluate_run(run, split="val")
    assert out == run / "eval" / "val" and val["n"] == 85
    # The test rows again, columns shuffled plus one the model never saw: same predictions, same metrics.
    frame = pd.read_csv(Path(load_saved(run / "config.yaml").data.path) / "test.csv")
    frame = frame[list(reversed(frame.columns))].assign(notes="x")
    frame.to_csv(tmp_path / "holdout.csv", index=False)
    again, out = evaluate_run(run, data=tmp_path / "holdout.csv")
    assert out == run / "eval" / "holdout"
    assert again["accuracy"] == pytest.approx(bc_run.test_metrics["accuracy"]) and again["n"] == 85
    frame.loc[3, "target"] = "unknown"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="label 'unknown' on line 5"):
        evaluate_run(run, data=tmp_path / "bad.csv")
    assert 'id="features"' in (run / "report.html").read_text()


def test_evaluate_command_on_a_tabular_run(bc_run) -> None:
    from typer.testing import CliRunner

    from pixelmill.cli import app

    result = CliRunner().invoke(app, ["evaluate", str(bc_run.run_dir), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output


def test_wine_from_one_csv(tmp_path: Path) -> None:
    write_tabular("wine", tmp_path / "data", single_file=True)
    result = train(load_config(_overrides(tmp_path / "data" / "data.csv", tmp_path / "runs")))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["data"]["layout"] == "csv file" and summary["classes"] == ["class_0", "class_1", "class_2"]
    assert summary["data"]["counts"] == {"train": 124, "val": 27, "test": 27}
    assert result.test_metrics["accuracy"] >= 0.9


def _mixed_csv(path: Path, n: int = 160) -> Path:
    """Numeric (with gaps), categorical (with gaps), boolean and an id column; the label depends on the first three."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    member = rng.random(n) < 0.5
    score = x + (color == "red") * 1.5 - member
    frame = pd.DataFrame({
        "x": np.where(np.arange(n) % 11 == 0, np.nan, x.round(3)),
        "color": np.where(np.arange(n) % 13 == 0, "", color),
        "member": np.where(member, "yes", "no"),
        "id": [f"u{i}" for i in range(n)],
        "target": np.where(score > 0.3, "high", "low"),
    })
    frame.to_csv(path, index=False)
    return path


def test_resume_of_a_tabular_run_is_exact(tmp_path: Path) -> None:
    data = _mixed_csv(tmp_path / "mixed.csv")
    args = _overrides(data, tmp_path / "runs", "data.columns={id: ignore}", "eval.splits=[]", "trainer.deterministic=true")
    full = train(load_config([*args, "run_name=full", "trainer.max_epochs=3"]))
    part = train(load_config([*args, "run_name=part", "trainer.max_epochs=1"]))
    schema_before = (part.run_dir / "schema.json").read_text()
    resumed = resume(part.run_dir, ["trainer.max_epochs=3"])
    assert resumed.status == "finished" and (resumed.run_dir / "schema.json").read_text() == schema_before
    wf = net_state_dict(read_checkpoint(full.run_dir / "checkpoints" / "last.ckpt"))
    wr = net_state_dict(read_checkpoint(resumed.run_dir / "checkpoints" / "last.ckpt"))
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert (full.run_dir / "metrics.csv").read_text() == (resumed.run_dir / "metrics.csv").read_text()
    schema = json.loads(schema_before)
    assert {c["name"]: c["type"] for c in schema["columns"]} == {"x": "numeric", "color": "categorical", "member": "boolean"}
    assert schema["ignored"] == ["id"] and schema["classes"] == ["high", "low"]


def test_model_and_target_mistakes_stop_before_a_run_dir_exists(tmp_path: Path) -> None:
    data = _mixed_csv(tmp_path / "mixed.csv")
    with pytest.raises(ConfigError, match="needs a model for table rows; set model.name to one of: mlp"):
        train(load_config([*_overrides(data, tmp_path / "runs"), "model.name=small_cnn"]))
    with pytest.raises(ConfigError, match="data.target is not set; .* one of: x, color, member, id, target"):
        train(load_config(["data=tabular", f"data.path={data}", "model=mlp", f"output_dir={tmp_path / 'runs'}"]))
    assert not (tmp_path / "runs").exists()
