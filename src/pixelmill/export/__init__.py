"""Export a trained run to a bundle that is checked against PyTorch before it is written.

``export_run`` is the one entry point. This module imports no torch at import time: serving
imports ``pixelmill.export.bundle``, which loads this package first.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pixelmill import runs
from pixelmill.data.preprocess import Preprocessing, load_image, to_model_input
from pixelmill.errors import BundleError, ConfigError, DataError
from pixelmill.export.bundle import BUNDLE_FILE, Bundle, read_bundle, write_bundle

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
QUANTIZE = (None, "int8")
MAX_ABS_DIFF = 1e-4  # float32 export: probabilities may differ by at most this much
MIN_INT8_AGREEMENT = 0.99  # int8 export: share of images whose top-1 must match PyTorch
DEFAULT_OPSET = 17


def default_out(run_dir: Path, fmt: str, quantize: str | None) -> Path:
    """RUN_DIR/bundle for float ONNX; RUN_DIR/bundle-int8 and RUN_DIR/bundle-torchscript otherwise."""
    suffix = "-int8" if quantize else ("" if fmt == "onnx" else f"-{fmt}")
    return Path(run_dir) / f"bundle{suffix}"


def check_images(cfg, summary: dict[str, Any], run_dir: Path, limit: int = 64) -> list[str]:
    """Up to ``limit`` real evaluation images of the run (test split, else val), spread over the split."""
    from pixelmill.training.fit import _scan

    items: list[str] = []
    try:
        scan = _scan(cfg)
        split = next((s for s in ("test", "val") if scan.splits.get(s)), None)
        items = [str(p) for p, _ in scan.splits[split]] if split else []
    except (DataError, ConfigError, OSError) as exc:
        log.warning("cannot scan the run's data (%s); checking on the images listed in eval/", exc)
    if not items:  # the data moved: fall back to the files evaluation listed, if they still exist
        import csv

        for pred_csv in sorted((run_dir / "eval").glob("*/predictions.csv")):
            with open(pred_csv, newline="") as fh:
                items += [row["path"] for row in csv.DictReader(fh) if Path(row["path"]).is_file()]
    if not items:
        raise BundleError(f"no evaluation images found for '{run_dir}' to check the export against; restore its data.path")
    step = max(1, len(items) // limit)
    return items[::step][:limit]


def _reference(net, prep: Preprocessing, paths: list[str]) -> np.ndarray:
    """PyTorch probabilities through the evaluation pipeline (torchvision transforms, eager net)."""
    import torch

    from pixelmill.data.transforms import eval_transform

    transform = eval_transform(prep)
    x = torch.stack([transform(load_image(p, prep.channels)) for p in paths])
    with torch.inference_mode():
        return torch.softmax(net.eval()(x).float(), dim=1).numpy()


def agreement(reference: np.ndarray, exported: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement and the largest absolute probability difference."""
    if reference.shape != exported.shape:
        raise BundleError(f"exported model returns shape {exported.shape}, PyTorch {reference.shape}")
    return {
        "checked_images": int(reference.shape[0]),
        "max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - exported))),
        "top1_agreement": float(np.mean(reference.argmax(1) == exported.argmax(1))),
    }


def verdict(figures: dict[str, Any], quantize: str | None, min_agreement: float) -> str | None:
    """None if the figures pass, else the reason to refuse the bundle."""
    if quantize:
        if figures["top1_agreement"] < min_agreement:
            return (
                f"int8 top-1 agrees with PyTorch on {figures['top1_agreement']:.1%} of {figures['checked_images']} "
                f"images (< {min_agreement:.0%}; max |diff| {figures['max_abs_diff']:.2e})"
            )
        return None
    if figures["top1_agreement"] < 1.0:
        return f"top-1 differs from PyTorch on {1 - figures['top1_agreement']:.1%} of {figures['checked_images']} images"
    if figures["max_abs_diff"] > MAX_ABS_DIFF:
        return f"probabilities differ from PyTorch by up to {figures['max_abs_diff']:.2e} (> {MAX_ABS_DIFF:.0e})"
    return None


def _write_model(fmt: str, quantize: str | None, wrapper, work: Path, sample, opset: int):
    """Write the model file into ``work``; return (file name, runner over it)."""
    from pixelmill.export import onnx as onnx_export
    from pixelmill.export import torchscript

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


def _move_into_place(work: Path, out: Path) -> None:
    """Replace ``out`` (absent, empty or an older bundle) with ``work``."""
    old = None
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / BUNDLE_FILE).is_file()):
            raise BundleError(f"'{out}' exists and is not a bundle; pass another --out")
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(3)}")
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load_run(run_dir: Path, checkpoint: str):
    """(summary, config, network in eval mode with the checkpoint's weights, checkpoint epoch)."""
    from pixelmill.config import load_saved
    from pixelmill.models import create_model
    from pixelmill.training.checkpoint import net_state_dict, read_checkpoint

    summary = runs.read_summary(run_dir)
    if not summary.get("classes") or "preprocessing" not in summary:
        raise BundleError(f"'{run_dir}' has no classes/preprocessing in summary.json; it never started training")
    cfg = load_saved(run_dir / runs.CONFIG)
    ckpt = read_checkpoint(runs.checkpoint_path(run_dir, checkpoint))
    net = create_model(cfg.model.name, len(summary["classes"]), in_chans=int(summary["preprocessing"]["channels"]))
    net.load_state_dict(net_state_dict(ckpt), strict=True)
    return summary, cfg, net.eval(), ckpt.get("epoch")


def _bundle_meta(
    run_dir: Path, summary: dict[str, Any], cfg, prep: Preprocessing, classes: list[str],
    name: str | None, model_file: str, checkpoint: str, epoch: int | None,
) -> dict[str, Any]:
    """bundle.json without ``export`` and ``files``: what the model is, where it came from, how good it is."""
    run_name = summary.get("run_name", run_dir.name)
    return {
        "format": "pixelmill-bundle",
        "format_version": 1,
        "kind": "image",
        "name": name or f"{summary.get('experiment', cfg.experiment)}-{run_name}",
        "model_name": cfg.model.name,
        "model_file": model_file,
        "classes": classes,
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "shape": [-1, prep.size, prep.size, prep.channels]},
        "output": {"name": "probabilities", "shape": [-1, len(classes)]},
        "preprocessing": prep.to_dict(),
        "metrics": {"eval": summary.get("eval", {}), "best": summary.get("best")},
        "data_fingerprint": summary.get("data", {}).get("fingerprint"),
        "run": {"run_dir": str(run_dir.resolve()), "run_name": run_name, "checkpoint": checkpoint, "epoch": epoch},
        "versions": runs.versions("torch", "onnx", "onnxruntime"),
        "created_at": runs.now_iso(),
    }


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

    The exported model runs on up to ``max_images`` real evaluation images in its runtime
    and in PyTorch; a disagreement raises :class:`BundleError` and leaves nothing behind.
    Float exports must match top-1 on every image and probabilities within 1e-4; int8
    exports must match top-1 on at least ``min_int8_agreement`` of the images.
    """
    import torch

    from pixelmill.export.onnx import UInt8Classifier

    if fmt not in FORMATS:
        raise ConfigError(f"invalid export format '{fmt}'; only {', '.join(FORMATS)} are supported")
    if quantize not in QUANTIZE:
        raise ConfigError(f"invalid quantisation '{quantize}'; only int8 is supported")
    if quantize and fmt != "onnx":
        raise ConfigError("--quantize int8 needs --format onnx")
    run_dir = runs.resolve_run_dir(run_dir)
    if runs.read_summary(run_dir).get("preprocessing", {}).get("kind") == "tabular":
        if fmt != "onnx" or quantize:
            raise ConfigError("a tabular run exports to float ONNX only; drop --format/--quantize")
        from pixelmill.export.tabular import export_tabular_run

        return export_tabular_run(run_dir, checkpoint, out, max_rows=max(max_images, 256), opset=opset, name=name)
    summary, cfg, net, epoch = _load_run(run_dir, checkpoint)
    classes, prep = list(summary["classes"]), Preprocessing.from_dict(summary["preprocessing"])

    paths = check_images(cfg, summary, run_dir, max_images)
    batch = np.stack([to_model_input(load_image(p, prep.channels), prep) for p in paths])  # (N, H, W, C) uint8
    reference = _reference(net, prep, paths)

    out = Path(out) if out else default_out(run_dir, fmt, quantize)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    work.mkdir()
    try:
        wrapper = UInt8Classifier(net, prep).eval()
        model_name, runner = _write_model(fmt, quantize, wrapper, work, torch.from_numpy(batch[:2].copy()), opset)
        figures = agreement(reference, runner(batch))
        reason = verdict(figures, quantize, min_int8_agreement)
        if reason:
            raise BundleError(f"refusing to write a bundle for '{run_dir}': {reason}")
        meta = _bundle_meta(run_dir, summary, cfg, prep, classes, name, model_name, checkpoint, epoch)
        meta["export"] = {"format": fmt, "opset": opset if fmt == "onnx" else None, "quantize": quantize, **figures}
        if quantize:
            meta["export"]["min_top1_agreement"] = min_int8_agreement
        write_bundle(work, meta, [model_name])
        _move_into_place(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "exported %s: top-1 agreement %.2f%%, max |diff| %.2e on %d images",
        out, 100 * figures["top1_agreement"], figures["max_abs_diff"], figures["checked_images"],
    )
    return read_bundle(out)


__all__ = ["FORMATS", "Bundle", "export_run", "read_bundle", "write_bundle"]
