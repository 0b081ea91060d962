"""``pixelmill predict`` and ``Predictor``: the same answer from a run, a bundle, a path, PIL or NumPy."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pixelmill.cli import app
from pixelmill.errors import DataError, ModelError
from pixelmill.export import export_run
from pixelmill.inference.predictor import Predictor, expand_inputs


@pytest.fixture(scope="module")
def bundle_dir(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(trained_run, out=tmp_path_factory.mktemp("predict") / "bundle", max_images=16).path


@pytest.fixture()
def image_dir(digits_root: Path, tmp_path: Path) -> Path:
    """Six real digits (one in a sub-folder) plus one file that only pretends to be a PNG."""
    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    for i, src in enumerate(sorted((digits_root / "test").glob("*/*.png"))[::45][:6]):
        shutil.copy(src, folder / ("more" if i == 5 else "") / f"digit{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def _test_images(digits_root: Path, n: int) -> list[Path]:
    files = sorted((digits_root / "test").glob("*/*.png"))
    return files[:: max(1, len(files) // n)][:n]


def test_predict_cli_writes_csv_with_a_row_for_the_broken_file(bundle_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(app, ["predict", str(bundle_dir), str(image_dir), "--out", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 7
    broken = [r for r in rows if r["source"].endswith("broken.png")]
    assert len(broken) == 1 and "cannot read image" in broken[0]["error"] and broken[0]["label"] == ""
    good = [r for r in rows if not r["error"]]
    assert len(good) == 6 and all(r["label"] in [str(d) for d in range(10)] for r in good)
    for row in good:
        probs = [float(row[f"p_{d}"]) for d in range(10)]
        assert abs(sum(probs) - 1) < 1e-4 and float(row["confidence"]) == pytest.approx(max(probs), abs=1e-6)


def test_predict_cli_json_and_table(bundle_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.json"
    pattern = str(image_dir / "digit*.png")
    result = CliRunner().invoke(app, ["predict", str(bundle_dir), pattern, str(image_dir / "missing.png"), "--out", str(out), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["classes"] == [str(d) for d in range(10)]
    preds = data["predictions"]
    assert len(preds) == 6  # five digit*.png at the top level + the missing file
    missing = preds[-1]
    assert missing["source"].endswith("missing.png") and "does not exist" in missing["error"] and missing["label"] is None
    assert all(len(p["top_k"]) == 2 and p["error"] is None for p in preds[:-1])

    table = CliRunner().invoke(app, ["predict", str(bundle_dir), str(image_dir / "more"), "--top-k", "1"])
    expected = Predictor.load(bundle_dir).predict([image_dir / "more" / "digit5.png"])[0]
    assert table.exit_code == 0 and "1 prediction(s)" in table.output and "error" not in table.output
    assert f"{expected.confidence:.4f}" in table.output


def test_predictor_accepts_paths_pil_and_numpy(bundle_dir: Path, digits_root: Path) -> None:
    import pixelmill

    assert pixelmill.Predictor is Predictor
    path = _test_images(digits_root, 1)[0]
    predictor = pixelmill.Predictor.load(bundle_dir)
    gray = np.asarray(Image.open(path))
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    preds = predictor.predict([str(path), path, Image.open(path), gray, gray[:, :, None], rgb, gray / 255.0], top_k=3)
    assert len({p.label for p in preds}) == 1
    for p in preds:
        np.testing.assert_allclose(list(p.probabilities.values()), list(preds[0].probabilities.values()), atol=1e-6)
        assert [k for k, _ in p.top_k][0] == p.label and len(p.top_k) == 3
        assert p.confidence == pytest.approx(max(p.probabilities.values()))
    assert predictor.predict(str(path))[0].label == preds[0].label  # a single image, not a list
    with pytest.raises(DataError, match="does not exist"):
        predictor.predict(["nope.png"])
    with pytest.raises(DataError, match="NumPy image"):
        predictor.predict([np.zeros((2, 3, 4, 5), dtype=np.uint8)])


def test_bundle_and_checkpoint_predict_the_same(trained_run: Path, bundle_dir: Path, digits_root: Path) -> None:
    images = _test_images(digits_root, 40)
    onnx_preds = Predictor.load(bundle_dir).predict(images, batch_size=16)
    torch_preds = Predictor.load(trained_run).predict(images, batch_size=16)
    assert [p.label for p in onnx_preds] == [p.label for p in torch_preds]
    diff = max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in zip(onnx_preds, torch_preds) for c in a.probabilities)
    assert diff < 1e-4
    # and both agree with what evaluation wrote for these files
    import csv as _csv

    evaluated = {r["path"]: r["predicted"] for r in _csv.DictReader((trained_run / "eval" / "test" / "predictions.csv").open())}
    assert [evaluated[str(p)] for p in images] == [p.label for p in onnx_preds]


def test_predict_files_in_order_with_errors_in_place_and_progress(trained_run: Path, bundle_dir: Path, digits_root: Path, tmp_path: Path) -> None:
    """Batches run side by side (one per core) yet rows keep the input order, bad files keep their row."""
    good = _test_images(digits_root, 37)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    inputs = [*good[:10], tmp_path / "broken.png", *good[10:30], tmp_path / "missing.png", *good[30:]]
    progress: list[tuple[int, int]] = []
    predictor = Predictor.load(bundle_dir)
    rows = predictor.predict_files(inputs, top_k=3, batch_size=8, on_progress=lambda done, total: progress.append((done, total)))
    assert [Path(r.source) for r in rows] == inputs
    assert "cannot read image" in rows[10].error and "does not exist" in rows[31].error
    assert rows[10].prediction is None and rows[31].prediction is None
    served = [r for r in rows if r.error is None]
    assert len(served) == 37 and all(r.prediction is not None for r in served)
    one_by_one = [predictor.predict(f)[0] for f in good]
    for row, expected in zip(served, one_by_one):
        assert row.prediction.label == expected.label
        np.testing.assert_allclose(list(row.prediction.probabilities.values()), list(expected.probabilities.values()), atol=1e-6)
    assert progress[-1] == (39, 39) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    # The checkpoint (PyTorch) decodes ahead of one model instead, with the same answers.
    torch_rows = Predictor.load(trained_run).predict_files(inputs, batch_size=8)
    assert [r.prediction.label if r.prediction else r.error for r in torch_rows] == [r.prediction.label if r.prediction else r.error for r in rows]
    # Loaded with one thread (as `pixelmill predict` does), the bundle opens a single session.
    single = Predictor.load(bundle_dir, threads=1).classifier
    assert single.single_threaded() is single and predictor.classifier.single_threaded() is not predictor.classifier


def test_predictor_rejects_what_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a run directory, a bundle directory"):
        Predictor.load(tmp_path)
    with pytest.raises(ModelError, match="bad model URI"):
        Predictor.load("models:/only-a-name")


def test_expand_inputs_files_folders_and_globs(image_dir: Path) -> None:
    files = expand_inputs([image_dir / "digit0.png", str(image_dir / "more"), str(image_dir / "digit[12].png"), "nothing*.png"])
    names = [Path(f).name for f in files]
    assert names == ["digit0.png", "digit5.png", "digit1.png", "digit2.png", "nothing*.png"]
    assert len(expand_inputs([image_dir])) == 7


def test_import_pixelmill_stays_light() -> None:
    code = "import sys, pixelmill; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules; print(pixelmill.Predictor.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "Predictor", done.stderr
