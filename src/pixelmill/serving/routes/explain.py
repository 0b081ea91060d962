"""``POST /explain``: per image the prediction and where the model looked, from the bundle's class activation maps.

Read like ``/predict`` (multipart ``files`` or JSON ``instances``) and behind the same limits,
auth and metrics; batched by the engine's explain batcher. A file that cannot be read gets
its own ``{"file", "error"}`` entry and the others are answered. A model without the maps
(an int8 or TorchScript export, a tabular model, a head that is not pooling + one linear
layer) answers 409 with bundle.json's reason: the request is fine, the served model cannot do it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, Optional

import anyio
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from pixelmill.errors import DataError
from pixelmill.explain.images import class_index
from pixelmill.serving.routes import ERRORS, IMAGES_BODY, serving, settings_of
from pixelmill.serving.schemas import ErrorResponse, ExplainResponse

router = APIRouter(tags=["native"])

NOT_EXPLAINABLE = 409
_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    NOT_EXPLAINABLE: {"model": ErrorResponse, "description": "The served model has no explanations (bundle.json's reason)"},
}


_THRESHOLD = Query(
    None, ge=0.0, le=1.0,
    description="Binary models: the threshold on the positive class's probability; multi-label models: one threshold for every label (instead of the model's own).",
)


@dataclass
class ExplainQuery:
    """The query parameters every ``/explain`` route takes."""

    class_name: Optional[str]
    output: str
    cells: int
    top_k: Optional[int]
    threshold: Optional[float]


def explain_query(
    class_name: Optional[str] = Query(
        None, alias="class", description="Explain this class for every image (default: the predicted class; multi-label: each predicted label)."
    ),
    output: Literal["png", "grid"] = Query(
        "png", description="png: a base64 PNG of the heatmap over the image as the model saw it; grid: cells x cells floats in [0, 1]."
    ),
    cells: int = Query(16, ge=1, le=64, description="output=grid: cells per side (at most the model's input size)."),
    top_k: Optional[int] = Query(None, ge=1, le=10_000, description="How many classes to list per image (default: server's top_k)."),
    threshold: Optional[float] = _THRESHOLD,
) -> ExplainQuery:
    return ExplainQuery(class_name, output, cells, top_k, threshold)


@router.post("/explain", response_model=ExplainResponse, responses=_RESPONSES, openapi_extra=IMAGES_BODY)
async def explain(request: Request, query: ExplainQuery = Depends(explain_query)) -> JSONResponse:
    """Explain one or more images: multipart files (field ``files``) or JSON ``{"instances": [base64, ...]}``.

    Returns per image what ``/predict`` returns plus ``explanations``: for each explained class
    its label, probability and heatmap (``heatmap_png`` or ``grid``); or ``{"file", "error"}``
    for an image that could not be read. With several models served, name one: ``/models/{name}/explain``.
    """
    return await _explain(request, None, None, query)


@router.post("/models/{name}/explain", response_model=ExplainResponse, responses=_RESPONSES, openapi_extra=IMAGES_BODY)
async def explain_model(name: str, request: Request, query: ExplainQuery = Depends(explain_query)) -> JSONResponse:
    """``/explain`` on the named model: its default version, or the version its traffic split picks."""
    return await _explain(request, name, None, query)


@router.post("/models/{name}/versions/{version}/explain", response_model=ExplainResponse, responses=_RESPONSES, openapi_extra=IMAGES_BODY)
async def explain_version(name: str, version: str, request: Request, query: ExplainQuery = Depends(explain_query)) -> JSONResponse:
    """``/explain`` on one version of the named model."""
    return await _explain(request, name, version, query)


async def _explain(request: Request, name: Optional[str], version: Optional[str], query: ExplainQuery) -> JSONResponse:
    settings = settings_of(request)
    class_name, output, cells, top_k, threshold = query.class_name, query.output, query.cells, query.top_k, query.threshold
    async with serving(request, name, version) as choice:  # explanations are never shadowed: only /predict and v2 infer are
        engine = choice.engine
        reason = engine.unexplainable
        if reason is not None:
            raise HTTPException(NOT_EXPLAINABLE, reason)
        codec = engine.codec
        options = {} if threshold is None else {"threshold": threshold}
        if options and not getattr(codec, "takes_threshold", False):
            raise HTTPException(422, f"threshold applies to binary and multi-label models; '{engine.name}' is a {engine.task.title} model")
        try:
            target = None if class_name is None else class_index(engine.classes, class_name)
        except DataError as exc:
            raise HTTPException(422, str(exc)) from None
        side = min(engine.input_shape[:2])  # (H, W, C) of an image
        if output == "grid" and cells > side:
            raise HTTPException(422, f"cells={cells} is more than the model's input size ({side} pixels); ask for at most {side}")

        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limiter = request.app.state.decode_limiter
        names, images = await codec.explain_inputs(request, media_type, engine, settings, limiter)  # per file: (H, W, C) uint8 or an error
        readable = [image for image in images if not isinstance(image, str)]
        if not readable:
            raise HTTPException(422, "no image could be read: " + "; ".join(images))
        probs, cams = await engine.explain(np.stack(readable))  # (n, classes), (n, classes, h, w)
        render = partial(
            codec.explain_response, engine, names, images, probs, cams,
            top_k=top_k or settings.top_k, target=target, output=output, cells=cells, **options,
        )
        # Upsampling, colouring and PNG encoding take milliseconds per image: a thread, so the event loop keeps serving.
        return await anyio.to_thread.run_sync(render, limiter=limiter)
