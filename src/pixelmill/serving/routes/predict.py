"""Native API: ``POST /predict`` (multipart images or base64 JSON) and ``GET /model``, and both per served name and version."""

from __future__ import annotations

import math
from typing import Any, Optional

from fastapi import APIRouter, HTTPException, Query, Request

from pixelmill.serving.engine import Engine
from pixelmill.serving.routes import ERRORS, IMAGES_BODY, engine_of, infer, serving, settings_of
from pixelmill.serving.schemas import ModelInfo, PredictResponse

router = APIRouter(tags=["native"])

def _finite(value: Any) -> Any:
    """NaN/inf (e.g. an undefined AUC in bundle.json) -> None, so the JSON stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


_TOP_K = Query(None, ge=1, le=10_000, description="How many classes to list per image (default: server's top_k).")
_THRESHOLD = Query(
    None, ge=0.0, le=1.0,
    description="Binary models: the threshold on the positive class's probability; multi-label models: one threshold for every label (instead of the model's own).",
)


async def _predict(request: Request, name: Optional[str], version: Optional[str], top_k: Optional[int], threshold: Optional[float]) -> Any:
    settings = settings_of(request)
    async with serving(request, name, version) as choice:
        engine = choice.engine
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        codec = engine.codec  # the task's: images for image classification, records for tabular
        options = {} if threshold is None else {"threshold": threshold}
        if options and not getattr(codec, "takes_threshold", False):
            raise HTTPException(422, f"threshold applies to binary and multi-label models; '{engine.name}' is a {engine.task.title} model")
        ids, batch = await codec.native_inputs(request, media_type, engine, settings, request.app.state.decode_limiter)
        outputs = await infer(request, choice, batch)  # (N, num_classes)
        return codec.native_response(engine, ids, outputs, top_k or settings.top_k, **options)


@router.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=IMAGES_BODY)
async def predict(request: Request, top_k: Optional[int] = _TOP_K, threshold: Optional[float] = _THRESHOLD) -> PredictResponse:
    """Classify one or more images: multipart files (field ``files``) or JSON ``{"instances": [base64, ...]}``.

    Returns per image the label, its confidence, the top-k and every class's probability. With
    several models served, name one: ``/models/{name}/predict``.
    """
    return await _predict(request, None, None, top_k, threshold)


@router.post("/models/{name}/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=IMAGES_BODY)
async def predict_model(name: str, request: Request, top_k: Optional[int] = _TOP_K, threshold: Optional[float] = _THRESHOLD) -> PredictResponse:
    """``/predict`` on the named model: its default version, or the version its traffic split picks."""
    return await _predict(request, name, None, top_k, threshold)


@router.post("/models/{name}/versions/{version}/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=IMAGES_BODY)
async def predict_version(
    name: str, version: str, request: Request, top_k: Optional[int] = _TOP_K, threshold: Optional[float] = _THRESHOLD
) -> PredictResponse:
    """``/predict`` on one version of the named model."""
    return await _predict(request, name, version, top_k, threshold)


def _info(engine: Engine) -> ModelInfo:
    info = engine.bundle.info
    return ModelInfo(
        name=engine.name,
        version=engine.version,
        model_name=info.model_name,
        classes=engine.classes,
        input=info.input.model_dump(exclude_unset=True) if info.input else {},
        input_size=list(engine.input_shape),
        output=info.output.model_dump(exclude_unset=True),
        preprocessing=info.preprocessing,
        metrics=_finite(info.metrics),
        versions=info.versions,
        sha256=info.files.get(info.model_file),
        kind=info.kind,
        inputs=info.inputs,
        table_schema=engine.bundle.meta.get("schema"),
        thresholds=info.thresholds,
        threshold=info.threshold,
        positive_class=info.positive_class,
        explain=engine.bundle.meta.get("explain"),
        providers=engine.providers,
    )


@router.get("/model", response_model=ModelInfo, responses=ERRORS)
async def model_info(request: Request) -> ModelInfo:
    """The served model: name, version, classes, input size, preprocessing and evaluation metrics."""
    return _info(engine_of(request))


@router.get("/models/{name}", response_model=ModelInfo, responses=ERRORS)
async def named_model_info(name: str, request: Request) -> ModelInfo:
    """``/model`` of the named model's default version."""
    return _info(engine_of(request, name))


@router.get("/models/{name}/versions/{version}", response_model=ModelInfo, responses=ERRORS)
async def model_version_info(name: str, version: str, request: Request) -> ModelInfo:
    """``/model`` of one version of the named model."""
    return _info(engine_of(request, name, version))
