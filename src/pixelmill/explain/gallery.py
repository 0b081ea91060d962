"""The report's explanations: the most confident mistakes and a sample of correct predictions, each beside its Grad-CAM heatmap."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pixelmill.data.preprocess import Preprocessing, to_model_input
from pixelmill.errors import PixelmillError
from pixelmill.explain.gradcam import gradcam, normalised_input, target_layer

log = logging.getLogger(__name__)


def write_gallery(
    net: torch.nn.Module, prep: Preprocessing, load: Callable[[str], Any], sample_ids: list[str], y: np.ndarray,
    probs: np.ndarray, predicted: np.ndarray, classes: list[str], path: Path, per_kind: int = 8, seed: int = 0,
) -> Path | None:
    """``path``: up to ``per_kind`` most confident mistakes, then a seeded sample of as many correct predictions,
    each image beside the heatmap of its predicted class. None when no image could be read."""
    from pixelmill.evaluation.plots import plot_explained

    path.unlink(missing_ok=True)
    confidence = probs[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != y)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:per_kind]
    right = np.flatnonzero(predicted == y)
    right = np.sort(np.random.default_rng(seed).permutation(right)[:per_kind])
    chosen, images = [], []
    for i in [*wrong, *right]:
        try:
            images.append(to_model_input(load(sample_ids[i]), prep))
            chosen.append(int(i))
        except (OSError, ValueError, PixelmillError) as exc:  # a file gone since evaluation: leave it out
            log.warning("cannot load %s for the explanations gallery: %s", sample_ids[i], exc)
    if not chosen:
        return None
    x = normalised_input(np.stack(images), prep.mean, prep.std)
    _, layer = target_layer(net, x[:1])
    maps = gradcam(net, x, [int(predicted[i]) for i in chosen], layer)
    entries = []
    for pixels, heatmap, i in zip(images, maps, chosen):
        picture = _pil(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)  # what the model saw
        caption = f"true {classes[y[i]]} / pred {classes[predicted[i]]} ({confidence[i]:.2f})"
        entries.append((picture, heatmap, caption, bool(predicted[i] != y[i])))
    title = f"Where the model looked (Grad-CAM): {len(wrong)} most confident mistakes, {len(chosen) - len(wrong)} correct"
    return plot_explained(entries, path, title)


def _pil(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(pixels)
