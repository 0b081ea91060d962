"""Explain images with any runtime that has ``explain`` (an explainable bundle, or a run in PyTorch): torch-free."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pixelmill.errors import BundleError, DataError
from pixelmill.explain.heatmaps import Explanation, heatmap_png


@dataclass
class ImageExplanation:
    """One input's prediction and the heatmap of each explained class (its predicted class or labels, or the one asked for)."""

    source: str
    prediction: Any = None
    explanations: list[Explanation] = field(default_factory=list)
    pixels: np.ndarray | None = None  # (H, W, C) uint8: what the model saw
    error: str | None = None

    def picture(self) -> Image.Image:
        pixels = self.pixels if self.pixels is not None else np.zeros((1, 1, 3), np.uint8)
        return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


def class_index(classes: Sequence[str], name: str) -> int:
    """The index of class ``name``; DataError listing the classes otherwise."""
    if name not in classes:
        raise DataError(f"unknown class '{name}'; the model's classes are: {', '.join(classes)}")
    return list(classes).index(name)


def targets_of(prediction: Any, classes: Sequence[str]) -> list[int]:
    """What to explain by default: each label a multi-label model decided (its top label when none), else the predicted class."""
    labels = getattr(prediction, "labels", None)
    names = (labels or [prediction.label]) if labels is not None else [prediction.label]
    return [list(classes).index(name) for name in names]


def explain_images(runtime: Any, inputs: Sequence[Any], class_name: str | None = None, top_k: int = 5) -> list[ImageExplanation]:
    """Each input (a path, PIL image or array) -> its :class:`ImageExplanation`; an unreadable input gets ``error`` and the rest go on."""
    if not hasattr(runtime, "check_explainable"):
        raise BundleError("this model format has no explanations; explain the run directory or its ONNX bundle")
    runtime.check_explainable()  # BundleError with the reason, before any image is read
    classes = list(runtime.classes)
    wanted = class_index(classes, class_name) if class_name is not None else None
    results = []
    for item in inputs:
        source = str(item) if isinstance(item, (str, Path)) else type(item).__name__
        try:
            results.append(ImageExplanation(source, pixels=runtime.prepare(item)))
        except DataError as exc:
            results.append(ImageExplanation(source, error=str(exc)))
    ready = [r for r in results if r.error is None]
    if not ready:
        return results
    batch = np.stack([r.pixels for r in ready])
    # A bundle: one ONNX Runtime call gives the prediction and every class's map. PyTorch: Grad-CAM needs the targets before its backward pass.
    probs, cams = runtime.run_with_cams(batch) if hasattr(runtime, "run_with_cams") else (runtime.run(batch), None)
    predictions = runtime.decode(probs, top_k)
    targets = [[wanted] if wanted is not None else targets_of(p, classes) for p in predictions]
    probs, maps = (probs, runtime.heatmaps(cams, targets)) if cams is not None else runtime.explain(batch, targets)
    for row, (result, prediction, wanted_here, heatmaps) in enumerate(zip(ready, predictions, targets, maps)):
        result.prediction = prediction
        result.explanations = [Explanation(classes[c], float(probs[row, c]), h) for c, h in zip(wanted_here, heatmaps)]
    return results


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", text).strip("_") or "class"


def write_explanations(results: list[ImageExplanation], out: Path) -> list[Path]:
    """Per explained class: ``OUT/<image>_<class>.png`` (the heatmap over the model's input) and ``.npy`` (the raw map)."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for result in results:
        if result.error is not None:
            continue
        stem = _slug(Path(result.source).stem)
        for explanation in result.explanations:
            base = out / f"{stem}_{_slug(explanation.label)}"
            base.with_suffix(".png").write_bytes(heatmap_png(explanation.heatmap, result.picture()))
            np.save(base.with_suffix(".npy"), explanation.heatmap)
            written.append(base.with_suffix(".png"))
    return written

