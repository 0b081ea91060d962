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
QUANTIZE = (None, "int8")
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
) -> Bundle:
    """Export a run's checkpoint to a checked bundle directory and return it.

    The exported model runs on up to ``max_images`` real evaluation samples in its runtime
    and in PyTorch; a disagreement raises :class:`BundleError` and leaves nothing behind.
    Float exports must match top-1 on every sample and probabilities within 1e-4; int8
    exports must match top-1 on at least ``min_int8_agreement`` of them.
    """
    from pixelmill.runs import load_run

    if fmt not in FORMATS:
        raise ConfigError(f"invalid export format '{fmt}'; only {', '.join(FORMATS)} are supported")
    if quantize not in QUANTIZE:
        raise ConfigError(f"invalid quantisation '{quantize}'; only int8 is supported")
    if quantize and fmt != "onnx":
        raise ConfigError("--quantize int8 needs --format onnx")
    run = load_run(run_dir, checkpoint)
    run.task.check_export(fmt, quantize)
    target = Path(out) if out else default_out(run.run_dir, fmt, quantize)
    options = {"max_images": max_images, "opset": opset, "name": name, "min_int8_agreement": min_int8_agreement}
    return run.task.export(run, target, fmt, quantize, options)


__all__ = ["FORMATS", "MAX_ABS_DIFF", "Bundle", "agreement", "export_run", "read_bundle", "verdict", "write_bundle"]
