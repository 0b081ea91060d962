"""Torch-free multi-label runtime: the bundle's sigmoid outputs turned into label sets at its per-label thresholds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pixelmill.errors import BundleError, DataError
from pixelmill.export.bundle import Bundle
from pixelmill.inference.session import Prediction, to_predictions
from pixelmill.tasks.image_classification.runtime import OnnxClassifier

Thresholds = float | Mapping[str, float] | None  # an override: one value for every label, or some labels' own


@dataclass
class LabelSetPrediction(Prediction):
    """One image's labels: every label whose probability reaches its threshold.

    ``label``/``confidence``/``top_k`` keep the single-label meaning (the most probable labels),
    so code written for single-label predictions still reads these.
    """

    labels: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), **super().to_dict(), "thresholds": dict(self.thresholds)}


def resolve_thresholds(classes: Sequence[str], own: Mapping[str, float], override: Thresholds = None) -> np.ndarray:
    """(L,) thresholds: the model's own, replaced by ``override`` (one float, or label -> float for some labels)."""
    values = dict(own)
    if isinstance(override, Mapping):
        unknown = sorted(set(override) - set(classes))
        if unknown:
            raise DataError(f"threshold for unknown label(s) {', '.join(unknown)}; the model's labels are {', '.join(classes)}")
        values |= {k: float(v) for k, v in override.items()}
    elif override is not None:
        values = {name: float(override) for name in classes}
    bad = [f"{k}={v}" for k, v in values.items() if not 0.0 <= v <= 1.0]
    if bad:
        raise DataError(f"thresholds must be probabilities in [0, 1]; got {', '.join(bad)}")
    return np.array([values[name] for name in classes], dtype=np.float64)


def to_label_sets(probs: np.ndarray, classes: Sequence[str], thresholds: np.ndarray, top_k: int = 5) -> list[LabelSetPrediction]:
    """(N, L) probabilities -> one :class:`LabelSetPrediction` per row (labels in the model's label order)."""
    named = dict(zip(classes, (float(t) for t in thresholds)))
    decided = np.asarray(probs) >= np.asarray(thresholds)[None, :]
    return [
        LabelSetPrediction(**vars(p), labels=[name for name, on in zip(classes, row) if on], thresholds=named)
        for p, row in zip(to_predictions(probs, classes, top_k), decided)
    ]


def bundle_thresholds(bundle: Bundle) -> dict[str, float]:
    """The per-label thresholds bundle.json carries (BundleError when a label has none)."""
    own = bundle.info.thresholds or {}
    missing = [name for name in bundle.classes if name not in own]
    if missing:
        raise BundleError(f"bundle {bundle.path} has no threshold for label(s) {', '.join(missing)}; export the run again")
    return {name: float(own[name]) for name in bundle.classes}


class LabelSets:
    """What both multi-label runtimes (ONNX bundle, eager run) add to their single-label base: label sets.

    Expects ``classes``, ``thresholds`` (label -> float), ``prepare(image)`` and ``run(batch)``.
    """

    classes: list[str]
    thresholds: dict[str, float]

    def decode(self, probs: np.ndarray, top_k: int = 5, thresholds: Thresholds = None) -> list[LabelSetPrediction]:
        """(N, L) probabilities -> label sets at the model's thresholds, or at ``thresholds`` instead."""
        return to_label_sets(probs, self.classes, resolve_thresholds(self.classes, self.thresholds, thresholds), top_k)

    def predict(self, images: list[Any], top_k: int = 5, thresholds: Thresholds = None) -> list[LabelSetPrediction]:
        """Prepare, run as one batch and decode ``images``."""
        if not images:
            return []
        return self.decode(self.run(np.stack([self.prepare(img) for img in images])), top_k, thresholds)  # type: ignore[attr-defined]


class OnnxMultiLabel(LabelSets, OnnxClassifier):
    """A multi-label bundle on ONNX Runtime: ``run`` gives (N, L) sigmoid probabilities, ``decode`` label sets."""

    def __init__(self, bundle: Bundle, intra_op_threads: int | None = None, inter_op_threads: int | None = None, *, providers: list[str] | None = None) -> None:
        super().__init__(bundle, intra_op_threads, inter_op_threads, providers=providers)
        self.thresholds = bundle_thresholds(bundle)
