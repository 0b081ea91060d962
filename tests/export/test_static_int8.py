"""``pixelmill export --quantize int8``: static int8, calibrated on the run's training images, gated on agreement."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from helpers import fast_train_overrides
from pixelmill.cli import app
from pixelmill.data.preprocess import load_image, to_model_input
from pixelmill.errors import ConfigError
from pixelmill.export import CALIBRATION_METHODS, export_run
from pixelmill.runs import load_run
from pixelmill.tasks.image_classification.export import reference
from pixelmill.tasks.image_classification.runtime import OnnxClassifier


@pytest.fixture(scope="module")
def confident_run(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six full epochs on digits: a model that learned (about 90% test accuracy, median top-1 margin ~0.8).

    The shared ``trained_run`` is nearly uniform (top-1 probability ~0.13 over 10 classes, margins
    under 0.01), so any rounding flips near-ties and its agreement says little about quantisation;
    a model collapsed onto one class by a too-high learning rate says as little, and which of its
    few near-ties flip depends on the CPU's int8 kernels (AVX2 or AVX-512 VNNI).
    """
    from pixelmill.config import load_config
    from pixelmill.training.fit import train

    out = tmp_path_factory.mktemp("confident") / "runs"
    overrides = fast_train_overrides(digits_root, out, "run_name=confident", "eval.splits=[]", "trainer.limit_train_batches=1.0", epochs=6)
    result = train(load_config(overrides))
    assert result.status == "finished"
    return result.run_dir


def _test_digits(digits_root: Path) -> list[str]:
    return sorted(str(p) for p in (digits_root / "test").rglob("*.png"))


def test_static_int8_bundle_passes_the_gate_and_records_its_calibration(confident_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle-int8"
    result = CliRunner().invoke(app, ["export", str(confident_run), "--quantize", "int8", "--out", str(out)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "int8 static" in result.output and "percentile on 128 training images" in result.output

    check = json.loads((out / "bundle.json").read_text())["export"]
    assert check["quantize"] == "int8" and check["min_top1_agreement"] == 0.99
    assert check["top1_agreement"] >= 0.99 and check["checked_images"] == 64
    quantization = check["quantization"]
    assert quantization | {"float_nodes": None} == {
        "mode": "static", "format": "QDQ", "weights": "int8", "per_channel": True, "activations": "uint8",
        "reduce_range": False, "calibration_method": "percentile", "calibration_images": 128, "calibration_split": "train",
        "float_nodes": None,
    }

    graph = onnx.load(str(out / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") >= 3 and not {"ConvInteger", "DynamicQuantizeLinear"} & set(ops)
    initializers = {t.name: t for t in graph.initializer}
    conv_weights = [node for node in graph.node if node.op_type == "DequantizeLinear" and len(initializers.get(node.input[0], onnx.TensorProto()).dims) == 4]
    assert conv_weights and all(initializers[node.input[0]].data_type == onnx.TensorProto.INT8 for node in conv_weights)
    # Per channel: one scale per output channel of each convolution.
    assert all(list(initializers[node.input[1]].dims) == [initializers[node.input[0]].dims[0]] for node in conv_weights)
    # The classifier and softmax stay float: probabilities are not rounded to steps of 1/255.
    assert ops[-1] == "Softmax" and set(quantization["float_nodes"]) == {n.name for n in graph.node[-2:]}


@pytest.mark.parametrize("method", list(CALIBRATION_METHODS))
def test_each_calibration_method_keeps_top1_on_every_test_image(method: str, confident_run: Path, digits_root: Path, tmp_path: Path) -> None:
    """The gate checks 64 images; here every test digit (270) is compared with the fp32 PyTorch model."""
    bundle = export_run(confident_run, quantize="int8", out=tmp_path / method, calibration_method=method, calibration_images=64)
    assert bundle.meta["export"]["quantization"]["calibration_images"] == 64
    assert bundle.meta["export"]["quantization"]["calibration_method"] == method

    run = load_run(confident_run)
    paths = _test_digits(digits_root)
    prep = run.preprocessing
    batch = np.stack([to_model_input(load_image(p, prep.channels), prep) for p in paths])
    fp32 = reference(run.net, prep, paths)
    int8 = OnnxClassifier(bundle).run(batch)
    agreement = float(np.mean(fp32.argmax(1) == int8.argmax(1)))
    assert agreement >= 0.99, f"{method}: {agreement:.2%} of {len(paths)} test images"
    assert np.allclose(int8.sum(1), 1.0, atol=1e-5)  # a float softmax, not uint8 steps


def test_dynamic_int8_stays_available_and_calibration_options_need_static(confident_run: Path, tmp_path: Path) -> None:
    bundle = export_run(confident_run, quantize="int8-dynamic")
    assert bundle.path == confident_run / "bundle-int8-dynamic"
    assert bundle.meta["export"]["quantize"] == "int8-dynamic"
    assert bundle.meta["export"]["quantization"] == {"mode": "dynamic", "weights": "int8"}
    with pytest.raises(ConfigError, match="apply to --quantize int8"):
        export_run(confident_run, quantize="int8-dynamic", calibration_images=10, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="percentile, minmax, entropy"):
        export_run(confident_run, quantize="int8", calibration_method="kl", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _empty_train_split(data: Path, digits_root: Path) -> Path:
    """The run's data now: val/ and test/ intact, train/ holding only files that are not images."""
    for split in ("val", "test"):
        shutil.copytree(digits_root / split, data / split)
    for label in (p.name for p in (digits_root / "train").iterdir()):
        (data / "train" / label).mkdir(parents=True)
        (data / "train" / label / "0.png").write_bytes(b"not a png")
    return data


@pytest.mark.reliability("export: int8 calibration with no training images exits 2 with one line")
@pytest.mark.parametrize("case", ["moved", "empty_train"])
def test_static_int8_without_training_images_exits_2_with_one_line(case: str, trained_run: Path, digits_root: Path, tmp_path: Path) -> None:
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("bundle*"))
    data = tmp_path / "gone" if case == "moved" else _empty_train_split(tmp_path / "data", digits_root)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(f"path: {digits_root}", f"path: {data}"))

    result = subprocess.run([sys.executable, "-m", "pixelmill.cli", "export", str(run), "--quantize", "int8"], capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and "int8 calibration" in errors[0] and "--quantize int8-dynamic" in errors[0]
    assert not (run / "bundle-int8").exists()
