"""Image classification export: the uint8 NHWC graph (normalisation and softmax inside), checked against PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pixelmill import runs
from pixelmill.data.preprocess import Preprocessing, load_image, to_model_input
from pixelmill.data.transforms import eval_transform
from pixelmill.errors import BundleError
from pixelmill.export import onnx as onnx_export
from pixelmill.export import torchscript
from pixelmill.export.bundle import Bundle, read_bundle, write_bundle
from pixelmill.export.parity import agreement, verdict
from pixelmill.export.writer import run_meta, staged
from pixelmill.runs import LoadedRun
from pixelmill.tasks.classification import softmax
from pixelmill.tasks.image_classification.data import check_images

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
Head = Callable[[torch.Tensor], torch.Tensor]  # (N, outputs) logits -> what the bundle returns


def reference(net: torch.nn.Module, prep: Preprocessing, paths: list[str], head: Head = softmax) -> np.ndarray:
    """PyTorch probabilities through the evaluation pipeline (torchvision transforms, eager net, the task's head)."""
    transform = eval_transform(prep)
    x = torch.stack([transform(load_image(p, prep.channels)) for p in paths])
    with torch.inference_mode():
        return head(net.eval()(x)).numpy()


def _write_model(fmt: str, quantize: str | None, wrapper, work: Path, sample, opset: int):
    """Write the model file into ``work``; return (file name, runner over it)."""
    model_file = work / FORMATS[fmt]
    if fmt == "torchscript":
        torchscript.export_torchscript(wrapper, model_file, sample)
        return model_file.name, torchscript.torchscript_runner(model_file)
    if quantize:
        float_file = work / "model.float.onnx"
        onnx_export.export_onnx(wrapper, float_file, sample, opset)
        onnx_export.quantize_int8(float_file, model_file)
        float_file.unlink()
    else:
        onnx_export.export_onnx(wrapper, model_file, sample, opset)
    return model_file.name, onnx_export.onnx_runner(model_file)


def export(
    run: LoadedRun, out: Path, fmt: str, quantize: str | None, options: dict[str, Any],
    head: Head = softmax, paths: list[str] | None = None, extra: dict[str, Any] | None = None,
    thresholds: np.ndarray | None = None,
) -> Bundle:
    """Export ``run`` as ``fmt`` (onnx or torchscript, int8 for onnx) after the parity check on real images.

    ``head`` is the activation the graph ends in (softmax; multi-label: sigmoid), ``paths`` the
    images to check on (default: the run's evaluation images), ``extra`` more bundle.json keys,
    ``thresholds`` the per-output decision thresholds an int8 export must keep (multi-label).
    """
    prep: Preprocessing = run.preprocessing
    paths = paths or check_images(run.config, run.run_dir, options["max_images"])
    batch = np.stack([to_model_input(load_image(p, prep.channels), prep) for p in paths])  # (N, H, W, C) uint8
    expected = reference(run.net, prep, paths, head)
    opset = options["opset"]
    with staged(out) as work:
        wrapper = onnx_export.UInt8Classifier(run.net, prep, head).eval()
        model_name, runner = _write_model(fmt, quantize, wrapper, work, torch.from_numpy(batch[:2].copy()), opset)
        figures = agreement(expected, runner(batch), thresholds)
        reason = verdict(figures, quantize, options["min_int8_agreement"])
        if reason:
            raise BundleError(f"refusing to write a bundle for '{run.run_dir}': {reason}")
        meta = run_meta(run, options.get("name"), model_name, runs.versions("torch", "onnx", "onnxruntime"))
        meta |= {
            "input": {"name": onnx_export.INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": [-1, prep.size, prep.size, prep.channels]},
            "output": {"name": onnx_export.OUTPUT_NAME, "shape": [-1, len(run.classes)]},
            "preprocessing": prep.to_dict(),
            "export": {"format": fmt, "opset": opset if fmt == "onnx" else None, "quantize": quantize, **figures},
        }
        if quantize:
            meta["export"]["min_top1_agreement"] = options["min_int8_agreement"]
        meta |= extra or {}
        write_bundle(work, meta, [model_name])
    log.info(
        "exported %s: top-1 agreement %.2f%%, max |diff| %.2e on %d images",
        out, 100 * figures["top1_agreement"], figures["max_abs_diff"], figures["checked_images"],
    )
    return read_bundle(out)
