"""How ``pixelmill serve`` reads and answers multi-label requests.

Requests are read exactly as for single-label image models (multipart files or base64 JSON
on ``/predict``, a UINT8 tensor on v2, whose answer is the (N, L) probabilities tensor). The
native answer names, per image, the ``labels`` at or above their thresholds, every label's
probability and the thresholds applied; ``?threshold=`` overrides them for one request.
``/explain`` answers the same fields plus the heatmap of each predicted label.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import HTTPException
from fastapi.responses import JSONResponse

from pixelmill.errors import DataError
from pixelmill.serving.schemas import LabelSetExplainResponse, LabelSetImageExplanation, LabelSetImagePrediction, LabelSetPredictResponse
from pixelmill.tasks.image_classification.serving import explain_inputs, explained_images, native_inputs, v2_batch, v2_config_inputs, v2_inputs

takes_threshold = True  # /predict?threshold= applies to this task's answers

__all__ = [
    "explain_inputs", "explain_response", "native_inputs", "native_response", "takes_threshold", "v2_batch", "v2_config_inputs", "v2_inputs",
]


def native_response(engine: Any, names: list[str], probs: np.ndarray, top_k: int, threshold: float | None = None) -> JSONResponse:
    """Per image: its labels, the most probable labels, every label's probability and the thresholds used."""
    try:
        predictions = engine.classifier.decode(probs, top_k, threshold)
    except DataError as exc:
        raise HTTPException(422, str(exc)) from None
    body = LabelSetPredictResponse(
        model=engine.name,
        version=engine.version,
        predictions=[LabelSetImagePrediction(file=name, **p.to_dict()) for name, p in zip(names, predictions)],
    )
    return JSONResponse(body.model_dump())


def explain_response(engine: Any, names: list[str], images: list[np.ndarray | str], probs: np.ndarray, cams: np.ndarray, **options: Any) -> JSONResponse:
    """``/explain``: per image its label set as ``/predict`` gives it and the heatmap of each predicted label."""
    body = LabelSetExplainResponse(
        model=engine.name, version=engine.version,
        predictions=explained_images(engine, names, images, probs, cams, LabelSetImageExplanation, **options),
    )
    return JSONResponse(body.model_dump())
