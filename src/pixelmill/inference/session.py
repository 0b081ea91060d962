"""What every task's torch-free runtime shares: the ONNX Runtime session, image inputs, decoded predictions.

Serving and ``pixelmill predict`` prepare pixels with the same
:func:`pixelmill.data.preprocess.to_model_input` that evaluation used, so a served
prediction matches an evaluated one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixelmill.data.preprocess import Preprocessing, load_image, to_model_input
from pixelmill.errors import BundleError, DataError
from pixelmill.export.bundle import Bundle
from pixelmill.inference.providers import CPU, choose_providers, normalize_providers, warn_once

ImageLike = Any  # PIL.Image.Image | np.ndarray | str | Path


@dataclass
class Prediction:
    """One input's result: the decided label, its probability, the top-k and every class's probability.

    ``threshold``/``positive_class``: set when a binary model decided at its operating point
    (``label`` is then ``positive_class`` exactly when its probability reaches ``threshold``).
    """

    label: str
    confidence: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    probabilities: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    positive_class: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "label": self.label,
            "confidence": self.confidence,
            "top_k": [{"label": k, "probability": p} for k, p in self.top_k],
            "probabilities": dict(self.probabilities),
        }
        if self.threshold is not None:
            out |= {"threshold": self.threshold, "positive_class": self.positive_class}
        return out


@dataclass(frozen=True)
class Decision:
    """A binary model's operating point: ``positive`` is the label where its probability reaches ``threshold``."""

    positive: str
    threshold: float

    @classmethod
    def of_bundle(cls, bundle: Bundle) -> Decision | None:
        """The operating point bundle.json carries (binary models exported with one), else None."""
        info = bundle.info
        if info.threshold is None or info.positive_class is None:
            return None
        if len(bundle.classes) != 2 or info.positive_class not in bundle.classes:
            raise BundleError(f"bundle {bundle.path} has a threshold for '{info.positive_class}' but classes {bundle.classes}; export it again")
        return cls(info.positive_class, float(info.threshold))


class Decisions:
    """What the single-label runtimes share: decode probabilities at the model's operating point (binary), else by argmax.

    Expects ``classes`` and sets nothing itself; ``decision`` is the model's own operating point.
    """

    classes: list[str]
    decision: Decision | None = None

    def decode(self, probs: np.ndarray, top_k: int = 5, threshold: float | None = None) -> list[Prediction]:
        """(N, C) probabilities -> predictions; ``threshold`` replaces a binary model's own for this call."""
        decision = self.decision
        if threshold is not None:
            if len(self.classes) != 2:
                raise DataError(f"threshold applies to binary and multi-label models; this model has {len(self.classes)} classes")
            if not 0.0 <= float(threshold) <= 1.0:
                raise DataError(f"threshold must be a probability in [0, 1]; got {threshold}")
            decision = Decision(decision.positive if decision else self.classes[1], float(threshold))
        return to_predictions(probs, self.classes, top_k, decision)


def array_to_image(arr: np.ndarray) -> Image.Image:
    """A NumPy image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> PIL image.

    uint8 is taken as is; floats in [0, 1] are scaled to [0, 255]; other integers are clipped.
    """
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise DataError(f"a NumPy image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    mode = "L" if arr.ndim == 2 else ("RGB" if arr.shape[2] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(arr), mode)


def prepare_image(image: ImageLike, prep: Preprocessing) -> np.ndarray:
    """Any accepted image -> (H, W, C) uint8 model input."""
    if isinstance(image, (str, Path)):
        try:
            image = load_image(image, prep.channels)
        except FileNotFoundError:
            raise DataError(f"image file '{image}' does not exist") from None
        except UnidentifiedImageError:
            raise DataError(f"cannot read image '{image}': not an image file, or a format Pillow cannot open") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image '{image}': {getattr(exc, 'strerror', None) or exc}") from None
    elif isinstance(image, np.ndarray):
        image = array_to_image(image)
    elif not isinstance(image, Image.Image):
        raise DataError(f"cannot predict on a {type(image).__name__}; pass a path, a PIL image or a NumPy array")
    return to_model_input(image, prep)


def to_predictions(probs: np.ndarray, classes: Sequence[str], top_k: int = 5, decision: Decision | None = None) -> list[Prediction]:
    """(N, C) probabilities -> one :class:`Prediction` per row: the argmax, or a binary ``decision``'s label."""
    k = max(1, min(int(top_k), len(classes)))
    pos = list(classes).index(decision.positive) if decision else -1
    out = []
    for row in np.asarray(probs, dtype=np.float64):
        order = np.argsort(-row, kind="stable")[:k]
        chosen = int(order[0]) if decision is None else (pos if row[pos] >= decision.threshold else 1 - pos)
        out.append(
            Prediction(
                label=classes[chosen],
                confidence=float(row[chosen]),
                top_k=[(classes[int(i)], float(row[i])) for i in order],
                probabilities={name: float(p) for name, p in zip(classes, row)},
                threshold=decision.threshold if decision else None,
                positive_class=decision.positive if decision else None,
            )
        )
    return out


def open_onnx_file(path: Path, intra_op_threads: int | None = None, inter_op_threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session over an ``.onnx`` file (full graph optimisation, quiet log).

    ``providers``: the execution providers wanted, in order of preference (full or short
    names, see :mod:`pixelmill.inference.providers`); None runs on CPU only. Those this
    onnxruntime lacks are dropped, with one warning per process for each wanted list;
    ``session.get_providers()`` tells which ones the session uses.
    """
    import onnxruntime as ort

    wanted = normalize_providers(providers) if providers else [CPU]
    chosen, message = choose_providers(wanted)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads:
        options.inter_op_num_threads = int(inter_op_threads)
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise BundleError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:300]}") from None
    if message is None:  # an available provider can still fail to start (no device, missing libraries)
        running = list(session.get_providers())
        failed = [name for name in chosen if name not in running]
        if failed:
            message = f"{', '.join(failed)} did not start in this onnxruntime; running on {', '.join(running)}"
    warn_once(wanted, message)
    return session


def open_session(bundle: Bundle, intra_op_threads: int | None = None, inter_op_threads: int | None = None, providers: list[str] | None = None):
    """An ONNX Runtime session over the bundle's model, on ``providers`` (None: CPU only); see :func:`open_onnx_file`."""
    return open_onnx_file(bundle.model_file, intra_op_threads, inter_op_threads, providers)
