"""CSV to served prediction: train an MLP on real sklearn tables, export one ONNX graph, predict, serve."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import pandas as pd
import pytest
from typer.testing import CliRunner

from helpers import serve_process
from pixelmill.cli import app
from pixelmill.config import load_config
from pixelmill.data.demo import write_tabular
from pixelmill.errors import BundleError, DataError
from pixelmill.export import export_run
from pixelmill.inference.predictor import Predictor
from pixelmill.training.fit import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(name: str, root: Path) -> Path:
    write_tabular(name, root / "data")
    overrides = [
        "data=tabular", f"data.path={root / 'data'}", "data.target=target", "model=mlp", "logger=[csv]",
        "trainer.progress_bar=false", "trainer.max_epochs=5", f"output_dir={root / 'runs'}", f"run_name={name}",
    ]
    result = train(load_config(overrides))
    assert result.status == "finished"
    return result.run_dir


@pytest.fixture(scope="module", params=["breast_cancer", "wine"])
def run(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def bundle(run: Path):
    return export_run(run)


def _data(run: Path) -> Path:
    return run.parents[2] / "data"


def _eval_predictions(run: Path) -> dict[str, dict[str, str]]:
    with open(run / "eval" / "test" / "predictions.csv", newline="") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def test_export_is_one_checked_graph_over_named_columns(run: Path, bundle) -> None:
    meta = json.loads((bundle.path / "bundle.json").read_text())
    schema = json.loads((run / "schema.json").read_text())
    assert meta["kind"] == "tabular" and meta["schema"] == schema and meta["classes"] == schema["classes"]
    columns = [c["name"] for c in schema["columns"]]
    assert [i["name"] for i in meta["inputs"]] == columns
    check = meta["export"]
    n_test = len(pd.read_csv(_data(run) / "test.csv"))
    assert check["checked_images"] == n_test  # every test row
    assert check["top1_agreement"] == 1.0 and check["max_abs_diff"] <= 1e-4
    graph = onnx.load(str(bundle.path / "model.onnx")).graph
    assert [i.name for i in graph.input] == columns
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in graph.input)  # these sets are all numeric
    assert [o.name for o in graph.output] == ["probabilities"]


def test_tampered_bundle_and_disagreeing_export_are_refused(run: Path, bundle, tmp_path: Path, monkeypatch) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    with open(copy / "model.onnx", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(BundleError, match="tampered"):
        Predictor.load(copy)
    edited = tmp_path / "edited"
    shutil.copytree(bundle.path, edited)
    meta = json.loads((edited / "bundle.json").read_text())
    meta["schema"]["columns"].reverse()  # a schema edited by hand would feed the wrong columns
    (edited / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError):
        Predictor.load(edited)

    import pixelmill.tasks.tabular_classification.export as tabular_export

    real = tabular_export.reference
    monkeypatch.setattr(tabular_export, "reference", lambda *a: real(*a)[:, ::-1].copy())  # swap the classes
    with pytest.raises(BundleError, match="refusing to write a bundle.*top-1 differs"):
        export_run(run, out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_predict_cli_on_the_test_csv_matches_evaluation(run: Path, bundle, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(app, ["predict", str(bundle.path), str(_data(run) / "test.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    evaluated = _eval_predictions(run)
    assert [r["row"] for r in rows] == [str(i) for i in range(1, len(evaluated) + 1)]
    assert {r["source"] for r in rows} == set(evaluated)
    for row in rows:
        expected = evaluated[row["source"]]
        assert row["label"] == expected["predicted"]
        for name, value in row.items():
            if name.startswith("p_"):
                assert float(value) == pytest.approx(float(expected[name]), abs=1e-4)
    # the run directory itself (scikit-learn + PyTorch) gives the same labels
    torch_rows = Predictor.load(run).predict_csv(_data(run) / "test.csv")
    assert [r.prediction.label for r in torch_rows] == [r["label"] for r in rows]


def test_a_csv_without_a_column_is_a_one_line_error(run: Path, bundle, tmp_path: Path) -> None:
    frame = pd.read_csv(_data(run) / "test.csv").drop(columns=["target"])  # the target is optional
    dropped = frame.columns[3]
    frame.drop(columns=[dropped]).to_csv(tmp_path / "rows.csv", index=False)
    cmd = [sys.executable, "-m", "pixelmill.cli", "predict", str(bundle.path), str(tmp_path / "rows.csv"), "--out", str(tmp_path / "p.csv")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"missing column(s) '{dropped}'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.csv").exists()
    frame.to_csv(tmp_path / "ok.csv", index=False)
    assert len(Predictor.load(bundle.path).predict_csv(tmp_path / "ok.csv")) == len(frame)


def test_records_are_validated_by_column(bundle) -> None:
    predictor = Predictor.load(bundle.path)
    columns = list(predictor.classifier.schema.columns)
    record = {name: 1.0 for name in columns}
    assert len(predictor.predict_records([record, {**record, "unused": "x"}])) == 2
    with pytest.raises(DataError, match=f"record 1 is missing column '{columns[2]}'"):
        predictor.predict_records([record, {k: v for k, v in record.items() if k != columns[2]}])
    with pytest.raises(DataError, match=f"record 0, column '{columns[0]}' \\(numeric\\) must be a number"):
        predictor.predict_records([{**record, columns[0]: "abc"}])


def _test_records(run: Path) -> list[dict]:
    frame = pd.read_csv(_data(run) / "test.csv").drop(columns=["target"])
    return json.loads(frame.to_json(orient="records"))


@pytest.mark.slow
def test_served_predictions_equal_pixelmill_predict(run: Path, bundle, tmp_path: Path) -> None:
    expected = Predictor.load(bundle.path).predict_csv(_data(run) / "test.csv")
    records = _test_records(run)[:32]
    with serve_process(str(bundle.path), tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        info = http.get("/model").json()
        assert info["kind"] == "tabular" and info["schema"]["classes"] == bundle.classes
        assert [c["name"] for c in info["schema"]["columns"]] == list(records[0])

        got = http.post("/predict", json={"records": records})
        assert got.status_code == 200, got.text
        for mine, theirs in zip(got.json()["predictions"], expected):
            assert mine["label"] == theirs.prediction.label
            assert mine["probabilities"] == pytest.approx(theirs.prediction.probabilities, abs=1e-6)

        column = list(records[0])[1]
        bad = http.post("/predict", json={"records": [records[0], {**records[1], column: "lots"}]})
        assert bad.status_code == 422 and f"record 1, column '{column}'" in bad.json()["error"]
        gone = http.post("/predict", json={"records": [{k: v for k, v in records[0].items() if k != column}]})
        assert gone.status_code == 422 and f"missing column '{column}'" in gone.json()["error"]

        meta = http.get(f"/v2/models/{bundle.name}").json()
        assert [t["name"] for t in meta["inputs"]] == list(records[0])
        assert {t["datatype"] for t in meta["inputs"]} == {"FP32"} and meta["outputs"][0]["shape"] == [-1, len(bundle.classes)]
        inputs = [
            {"name": name, "datatype": "FP64", "shape": [len(records), 1], "data": [r[name] for r in records]}
            for name in records[0]
        ]
        v2 = http.post(f"/v2/models/{bundle.name}/infer", json={"inputs": inputs})
        assert v2.status_code == 200, v2.text
        (out,) = v2.json()["outputs"]
        probs = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        want = np.asarray([[p.prediction.probabilities[c] for c in bundle.classes] for p in expected[: len(records)]])
        np.testing.assert_allclose(probs, want, atol=1e-6)
        short = http.post(f"/v2/models/{bundle.name}/infer", json={"inputs": inputs[1:]})
        assert short.status_code == 422 and f"column '{inputs[0]['name']}'" in short.json()["error"]


def _mixed_csv(path: Path, n: int = 200) -> Path:
    """Numeric with gaps, categorical with gaps, boolean yes/no, an ignored id; the label depends on all three."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    color = rng.choice(["red", "green", "blue"], size=n)
    member = rng.random(n) < 0.5
    score = x + (color == "red") * 1.5 - member
    pd.DataFrame({
        "x": np.where(np.arange(n) % 11 == 0, np.nan, x.round(3)),
        "color": np.where(np.arange(n) % 13 == 0, "", color),
        "member": np.where(member, "yes", "no"),
        "id": [f"u{i}" for i in range(n)],
        "target": np.where(score > 0.3, "high", "low"),
    }).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mixed")
    data = _mixed_csv(root / "mixed.csv")
    overrides = [
        "data=tabular", f"data.path={data}", "data.target=target", "model=mlp", "logger=[csv]", "data.columns={id: ignore}",
        "trainer.progress_bar=false", "trainer.max_epochs=5", f"output_dir={root / 'runs'}", "run_name=mixed",
    ]
    run = train(load_config(overrides)).run_dir
    return run, data, export_run(run)


def test_categorical_boolean_and_missing_values_end_to_end(mixed, tmp_path: Path) -> None:
    run, data, bundle = mixed
    assert bundle.meta["export"]["top1_agreement"] == 1.0 and bundle.meta["export"]["max_abs_diff"] <= 1e-4
    types = {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(bundle.model_file)).graph.input}
    assert types == {"x": onnx.TensorProto.FLOAT, "color": onnx.TensorProto.STRING, "member": onnx.TensorProto.FLOAT}
    predictor = Predictor.load(bundle.path)
    rows = predictor.predict_csv(data)  # id and target columns are ignored
    evaluated = _eval_predictions(run)
    assert evaluated and all(evaluated[r.source]["predicted"] == r.prediction.label for r in rows if r.source in evaluated)

    frame = pd.read_csv(data, keep_default_na=False).head(20)
    records = [{"x": None if r["x"] == "" else float(r["x"]), "color": r["color"], "member": r["member"] == "yes", "id": r["id"]}
               for r in frame.to_dict(orient="records")]
    by_records = predictor.predict_records(records)
    for mine, theirs in zip(by_records, rows[:20]):
        assert mine.probabilities == pytest.approx(theirs.prediction.probabilities, abs=1e-6)
    assert predictor.predict_records([{"x": 0.1, "color": "purple", "member": "Y"}])  # unseen category: all-zero one-hot
    with pytest.raises(DataError, match="record 0, column 'member' \\(boolean\\) must be boolean"):
        predictor.predict_records([{"x": 0.1, "color": "red", "member": "perhaps"}])

    with serve_process(str(bundle.path), tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        got = http.post("/predict", json={"records": records}).json()["predictions"]
        assert [p["label"] for p in got] == [p.label for p in by_records]
        meta = http.get(f"/v2/models/{bundle.name}").json()
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("x", "FP32"), ("color", "BYTES"), ("member", "FP32")]
        n = len(records)
        inputs = [
            {"name": "x", "datatype": "FP32", "shape": [n, 1], "data": [r["x"] for r in records]},
            {"name": "color", "datatype": "BYTES", "shape": [n, 1], "data": [r["color"] for r in records]},
            {"name": "member", "datatype": "BYTES", "shape": [n], "data": ["yes" if r["member"] else "no" for r in records]},
        ]
        (out,) = http.post(f"/v2/models/{bundle.name}/infer", json={"inputs": inputs}).json()["outputs"]
        want = [[p.probabilities[c] for c in bundle.classes] for p in by_records]
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), want, atol=1e-6)
        inputs[2]["data"][4] = "perhaps"
        bad = http.post(f"/v2/models/{bundle.name}/infer", json={"inputs": inputs})
        assert bad.status_code == 422 and "record 4, column 'member'" in bad.json()["error"]


def test_a_tabular_model_registers_and_predicts_through_the_registry(run: Path, bundle, tmp_path: Path) -> None:
    """The registry takes every task's bundle: a CSV model's signature is one input per column."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import get_model_info

    from pixelmill.model_registry import register

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    version = register(run, name="table", tracking_uri=uri, artifact_location=str(tmp_path / "art"))
    source = MlflowClient(uri).get_model_version("table", version.version).source
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        signature = get_model_info(source).signature
    finally:
        mlflow.set_tracking_uri(previous)
    assert [spec.name for spec in signature.inputs.inputs] == [c["name"] for c in bundle.meta["inputs"]]
    registered = Predictor.load(f"models:/table/{version.version}", tracking_uri=uri)
    assert [r.prediction.probabilities for r in registered.predict_csv(_data(run) / "test.csv")] == [
        r.prediction.probabilities for r in Predictor.load(bundle.path).predict_csv(_data(run) / "test.csv")
    ]


def test_splits_csv_names_every_row_and_its_class(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "splits.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["row", "split", "label"]
    assert len(rows) == len({r["row"] for r in rows}) == sum(summary["data"]["counts"].values())
    assert {r["label"] for r in rows} == set(summary["classes"])
    assert all(":" in r["row"] and r["row"].rsplit(":", 1)[1].isdigit() for r in rows)  # file.csv:LINE
