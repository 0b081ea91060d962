"""The parity check every export passes: the exported model against PyTorch on real samples."""

from __future__ import annotations

from typing import Any

import numpy as np

from pixelmill.errors import BundleError

MAX_ABS_DIFF = 1e-4  # float32 export: probabilities may differ by at most this much
MIN_INT8_AGREEMENT = 0.99  # int8 export: share of samples whose top-1 must match PyTorch


def agreement(reference: np.ndarray, exported: np.ndarray, thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 agreement and the largest absolute probability difference.

    With per-output ``thresholds`` (multi-label) also ``label_agreement``: the share of
    (sample, label) decisions at those thresholds that the exported model keeps.
    """
    if reference.shape != exported.shape:
        raise BundleError(f"exported model returns shape {exported.shape}, PyTorch {reference.shape}")
    figures = {
        "checked_images": int(reference.shape[0]),
        "max_abs_diff": float(np.max(np.abs(reference.astype(np.float64) - exported))),
        "top1_agreement": float(np.mean(reference.argmax(1) == exported.argmax(1))),
    }
    if thresholds is not None:
        figures["label_agreement"] = float(np.mean((reference >= thresholds) == (exported >= thresholds)))
    return figures


def verdict(figures: dict[str, Any], quantize: str | None, min_agreement: float, noun: str = "images") -> str | None:
    """None if the figures pass, else the reason to refuse the bundle (``noun``: what was checked)."""
    n = figures["checked_images"]
    if quantize:
        # Multi-label models are judged by their label decisions, single-label ones by their top-1 class.
        key, what = ("label_agreement", "label decisions") if "label_agreement" in figures else ("top1_agreement", "top-1")
        if figures[key] < min_agreement:
            return (
                f"int8 {what} match PyTorch on {figures[key]:.1%} of {n} "
                f"{noun} (< {min_agreement:.0%}; max |diff| {figures['max_abs_diff']:.2e})"
            )
        return None
    if figures["top1_agreement"] < 1.0:
        return f"top-1 differs from PyTorch on {1 - figures['top1_agreement']:.1%} of {n} {noun}"
    if figures["max_abs_diff"] > MAX_ABS_DIFF:
        return f"probabilities differ from PyTorch by up to {figures['max_abs_diff']:.2e} (> {MAX_ABS_DIFF:.0e})"
    return None
