"""Export a trained run to a bundle that is checked against PyTorch before it is written.

``export_run`` is the one entry point; the run's task writes its model and its part of
``bundle.json`` (see ``pixelmill.tasks``). This package imports no torch at import time:
serving imports ``pixelmill.export.bundle``, which loads this package first.
"""

from __future__ import annotations

from pathlib import Path

from pixelmill.errors import ConfigError
from pixelmill.export.bundle import Bundle, read_bundle, write_bundle
from pixelmill.export.parity import MAX_ABS_DIFF, MIN_INT8_AGREEMENT, agreement, verdict
from pixelmill.export.writer import default_out

FORMATS = ("onnx", "torchscript")
# --quantize -> how. "int8" is static: int8 activations between layers, calibrated on the run's
# training images - the fast one on CPUs. "int8-dynamic" quantises weights only and reads no images.
QUANTIZE_MODES = {"int8": "static", "int8-dynamic": "dynamic"}
QUANTIZE = (None, *QUANTIZE_MODES)
# --calibration-method -> ONNX Runtime's CalibrationMethod. Percentile (99.999th) kept top-1
# agreement best across models and calibration sizes: MinMax ranges widen with every outlier
# image added, Entropy costs twice the time for no better agreement (benchmarks/inference.py).
CALIBRATION_METHODS = {"percentile": "Percentile", "minmax": "MinMax", "entropy": "Entropy"}
DEFAULT_CALIBRATION_METHOD = "percentile"
DEFAULT_CALIBRATION_IMAGES = 128
DEFAULT_OPSET = 17


def export_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    fmt: str = "onnx",
    quantize: str | None = None,
    out: str | Path | None = None,
    max_images: int = 64,
    opset: int = DEFAULT_OPSET,
    name: str | None = None,
    min_int8_agreement: float = MIN_INT8_AGREEMENT,
    calibration_images: int | None = None,
    calibration_method: str | None = None,
) -> Bundle:
    """Export a run's checkpoint to a checked bundle directory and return it.

    The exported model runs on up to ``max_images`` real evaluation samples in its runtime
    and in PyTorch; a disagreement raises :class:`BundleError` and leaves nothing behind.
    Float exports must match top-1 on every sample and probabilities within 1e-4; int8
    exports must match top-1 on at least ``min_int8_agreement`` of them. ``quantize="int8"``
    is static int8 calibrated on up to ``calibration_images`` (default 128) of the run's training
    images with ``calibration_method`` (default percentile); ``"int8-dynamic"`` quantises the
    weights only and reads no images.
    """
    from pixelmill.runs import load_run

    if fmt not in FORMATS:
        raise ConfigError(f"invalid export format '{fmt}'; only {', '.join(FORMATS)} are supported")
    if quantize not in QUANTIZE:
        raise ConfigError(f"invalid quantisation '{quantize}'; only {' and '.join(q for q in QUANTIZE if q)} are supported")
    if quantize and fmt != "onnx":
        raise ConfigError(f"--quantize {quantize} needs --format onnx")
    if (calibration_images, calibration_method) != (None, None) and QUANTIZE_MODES.get(quantize) != "static":
        raise ConfigError("--calibration-images and --calibration-method apply to --quantize int8 (static) only")
    calibration_method = calibration_method or DEFAULT_CALIBRATION_METHOD
    calibration_images = DEFAULT_CALIBRATION_IMAGES if calibration_images is None else calibration_images
    if calibration_method not in CALIBRATION_METHODS:
        raise ConfigError(f"invalid calibration method '{calibration_method}'; only {', '.join(CALIBRATION_METHODS)} are supported")
    if calibration_images < 1:
        raise ConfigError(f"--calibration-images must be at least 1, got {calibration_images}")
    run = load_run(run_dir, checkpoint)
    run.task.check_export(fmt, quantize)
    target = Path(out) if out else default_out(run.run_dir, fmt, quantize)
    options = {
        "max_images": max_images, "opset": opset, "name": name, "min_int8_agreement": min_int8_agreement,
        "calibration_images": calibration_images, "calibration_method": calibration_method,
    }
    return run.task.export(run, target, fmt, quantize, options)


__all__ = ["CALIBRATION_METHODS", "FORMATS", "QUANTIZE", "QUANTIZE_MODES", "MAX_ABS_DIFF", "Bundle", "agreement", "export_run", "read_bundle", "verdict", "write_bundle"]
