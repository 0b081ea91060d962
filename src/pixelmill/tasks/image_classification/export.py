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
from pixelmill.errors import BundleError, DataError, PixelmillError
from pixelmill.explain.gradcam import cam_weights
from pixelmill.export import QUANTIZE_MODES, torchscript
from pixelmill.export import onnx as onnx_export
from pixelmill.export.bundle import Bundle, read_bundle, write_bundle
from pixelmill.export.parity import agreement, verdict
from pixelmill.export.writer import run_meta, staged
from pixelmill.runs import LoadedRun
from pixelmill.tasks.classification import softmax
from pixelmill.tasks.image_classification.data import calibration_images, check_images, load_scan

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
Head = Callable[[torch.Tensor], torch.Tensor]  # (N, outputs) logits -> what the bundle returns


def reference(net: torch.nn.Module, prep: Preprocessing, paths: list[str], head: Head = softmax) -> np.ndarray:
    """PyTorch probabilities through the evaluation pipeline (torchvision transforms, eager net, the task's head)."""
    transform = eval_transform(prep)
    x = torch.stack([transform(load_image(p, prep.channels)) for p in paths])
    with torch.inference_mode():
        return head(net.eval()(x)).numpy()


def calibration_batch(paths: list[str], prep: Preprocessing) -> np.ndarray:
    """The calibration images as the graph takes them: (N, H, W, C) uint8 through the evaluation
    pipeline. A file that became unreadable since the scan is skipped; DataError if none is left."""
    images = []
    for path in paths:
        try:
            images.append(to_model_input(load_image(path, prep.channels), prep))
        except (OSError, ValueError) as exc:
            log.warning("int8 calibration skips %s: %s", path, exc)
    if not images:
        raise DataError(f"int8 calibration could read none of the {len(paths)} training images it picked; "
                        "restore the run's data or export with --quantize int8-dynamic")
    return np.stack(images)


def _quantize(quantize: str, float_file: Path, model_file: Path, calibration: np.ndarray | None, method: str) -> dict[str, Any]:
    """Quantise ``float_file`` into ``model_file`` as ``--quantize`` asks; return the settings for bundle.json."""
    if QUANTIZE_MODES[quantize] == "dynamic":
        return onnx_export.quantize_int8(float_file, model_file)
    try:
        return onnx_export.quantize_static_int8(float_file, model_file, calibration, method) | {"calibration_split": "train"}
    except PixelmillError:
        raise
    except Exception as exc:  # an operator the static quantiser cannot handle: dynamic may still work
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise BundleError(f"static int8 quantisation failed on this model ({first}); export with --quantize int8-dynamic") from None


def _write_model(fmt: str, quantize: str | None, wrapper, work: Path, sample, opset: int, calibration: np.ndarray | None = None, method: str = ""):
    """Write the model file into ``work``; return (file name, runner over it, quantisation settings or None)."""
    model_file = work / FORMATS[fmt]
    if fmt == "torchscript":
        torchscript.export_torchscript(wrapper, model_file, sample)
        return model_file.name, torchscript.torchscript_runner(model_file), None
    settings = None
    if quantize:
        float_file = work / "model.float.onnx"
        onnx_export.export_onnx(wrapper, float_file, sample, opset)
        settings = _quantize(quantize, float_file, model_file, calibration, method)
        float_file.unlink()
    else:
        onnx_export.export_onnx(wrapper, model_file, sample, opset)
    return model_file.name, onnx_export.onnx_runner(model_file), settings


def _no_explain_reason(fmt: str, quantize: str | None) -> str:
    if fmt != "onnx":
        return f"a {fmt} bundle carries no class activation maps"
    if quantize:
        return "an int8 bundle carries no class activation maps (export it in float for them)"
    return "the network's head is not global average pooling + one linear layer"


def _write_explainable(
    run: LoadedRun, prep: Preprocessing, head: Head, weights: torch.Tensor, work: Path, batch: np.ndarray, expected: np.ndarray, opset: int
) -> tuple[str, dict[str, Any]]:
    """model.onnx with the ``cam`` output, checked against Grad-CAM in PyTorch on the check images.

    BundleError when a normalised heatmap of the predicted class differs by more than CAM_TOLERANCE.
    """
    from pixelmill.explain import CAM_OUTPUT, CAM_TOLERANCE
    from pixelmill.explain.gradcam import CamHead, gradcam, normalised_input, target_layer
    from pixelmill.explain.heatmaps import heatmaps_from_cams
    from pixelmill.inference.session import open_onnx_file

    wrapper = CamHead(run.net, prep.mean, prep.std, head, weights).eval()
    model_file = work / FORMATS["onnx"]
    onnx_export.export_onnx(wrapper, model_file, torch.from_numpy(batch[:2].copy()), opset, outputs=CamHead.output_names)
    (cams,) = open_onnx_file(model_file).run([CAM_OUTPUT], {onnx_export.INPUT_NAME: batch})
    predicted = expected.argmax(axis=1)
    exported = heatmaps_from_cams(cams[np.arange(len(batch)), predicted], (prep.size, prep.size))
    x = normalised_input(batch, prep.mean, prep.std)
    layer_name, layer = target_layer(run.net, x[:1])
    diff = float(np.abs(exported - gradcam(run.net, x, predicted.tolist(), layer)).max())
    if diff > CAM_TOLERANCE:
        raise BundleError(
            f"refusing to write a bundle for '{run.run_dir}': its class activation maps differ from Grad-CAM on "
            f"'{layer_name}' by {diff:.2e} (> {CAM_TOLERANCE:.0e}) on {len(batch)} images"
        )
    explain = {
        "available": True, "output": CAM_OUTPUT, "method": "cam", "shape": [-1, len(run.classes), *cams.shape[2:]],
        "layer": layer_name, "max_abs_diff": diff, "tolerance": CAM_TOLERANCE, "checked_images": len(batch),
    }
    return model_file.name, explain


def export(
    run: LoadedRun, out: Path, fmt: str, quantize: str | None, options: dict[str, Any],
    head: Head = softmax, paths: list[str] | None = None, extra: dict[str, Any] | None = None,
    thresholds: np.ndarray | None = None, load: Callable[[Any], Any] = load_scan,
) -> Bundle:
    """Export ``run`` as ``fmt`` (onnx or torchscript, int8 for onnx) after the parity check on real images.

    ``head`` is the activation the graph ends in (softmax; multi-label: sigmoid), ``paths`` the
    images to check on (default: the run's evaluation images), ``extra`` more bundle.json keys,
    ``thresholds`` the per-output decision thresholds an int8 export must keep (multi-label),
    ``load`` the task's scan of the run's data (static int8 calibrates on its train split).
    """
    prep: Preprocessing = run.preprocessing
    calibration = None
    if quantize and QUANTIZE_MODES[quantize] == "static":  # first: a missing train split fails fast
        calibration = calibration_batch(calibration_images(run.config, options["calibration_images"], load), prep)
    paths = paths or check_images(run.config, run.run_dir, options["max_images"], load=load)
    batch = np.stack([to_model_input(load_image(p, prep.channels), prep) for p in paths])  # (N, H, W, C) uint8
    expected = reference(run.net, prep, paths, head)
    opset = options["opset"]
    weights = cam_weights(run.net) if fmt == "onnx" and not quantize else None  # the explain output: float ONNX, a GAP + linear head
    settings = None
    with staged(out) as work:
        if weights is not None:
            model_name, explain = _write_explainable(run, prep, head, weights, work, batch, expected, opset)
            runner = onnx_export.onnx_runner(work / model_name)
        else:
            wrapper = onnx_export.UInt8Classifier(run.net, prep, head).eval()
            model_name, runner, settings = _write_model(
                fmt, quantize, wrapper, work, torch.from_numpy(batch[:2].copy()), opset, calibration, options.get("calibration_method", ""),
            )
            explain = {"available": False, "reason": _no_explain_reason(fmt, quantize)}
            log.info("%s: no explain output in this bundle; `pixelmill explain RUN_DIR` uses Grad-CAM in PyTorch", explain["reason"])
        figures = agreement(expected, runner(batch), thresholds)
        reason = verdict(figures, quantize, options["min_int8_agreement"])
        if reason:
            hint = "; try another --calibration-method, more --calibration-images or --quantize int8-dynamic" if calibration is not None else ""
            raise BundleError(f"refusing to write a bundle for '{run.run_dir}': {reason}{hint}")
        meta = run_meta(run, options.get("name"), model_name, runs.versions("torch", "onnx", "onnxruntime"))
        meta |= {
            "input": {"name": onnx_export.INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": [-1, prep.size, prep.size, prep.channels]},
            "output": {"name": onnx_export.OUTPUT_NAME, "shape": [-1, len(run.classes)]},
            "preprocessing": prep.to_dict(),
            "export": {"format": fmt, "opset": opset if fmt == "onnx" else None, "quantize": quantize, **figures},
            "explain": explain,
        }
        if quantize:
            meta["export"] |= {"min_top1_agreement": options["min_int8_agreement"], "quantization": settings}
        meta |= extra or {}
        write_bundle(work, meta, [model_name])
    log.info(
        "exported %s: top-1 agreement %.2f%%, max |diff| %.2e on %d images",
        out, 100 * figures["top1_agreement"], figures["max_abs_diff"], figures["checked_images"],
    )
    return read_bundle(out)
