"""Native API: ``POST /predict`` (multipart images or base64 JSON) and ``GET /model``."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pixelmill.inference import to_predictions
from pixelmill.serving.images import decode_base64, decode_images
from pixelmill.serving.routes import ERRORS, engine_of, settings_of
from pixelmill.serving.schemas import (
    ImagePrediction, InstancesRequest, ModelInfo, PredictResponse, RecordPrediction, RecordsPredictResponse,
)
from pixelmill.serving.tabular import checked_rows, records_of

router = APIRouter(tags=["native"])

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}},
                    "required": ["files"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "instances": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "anyOf": [
                                    {"type": "string", "description": "base64 image file (or a data: URL)"},
                                    {"type": "object", "properties": {"b64": {"type": "string"}}, "required": ["b64"]},
                                ]
                            },
                        }
                    },
                    "required": ["instances"],
                    "additionalProperties": False,
                }
            },
        },
    }
}


async def _multipart_files(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    try:
        form = await request.form(max_files=max_files, max_fields=max_files, max_part_size=64 * 1024)
    except StarletteHTTPException as exc:  # starlette's own, raised by the multipart parser
        if "Too many files" in str(exc.detail):
            raise HTTPException(413, f"too many files; send at most {max_files} per request") from None
        raise HTTPException(400, f"malformed multipart body: {exc.detail}") from None
    except Exception as exc:  # the parser gave up on these bytes
        raise HTTPException(400, f"malformed multipart body: {str(exc)[:200]}") from None
    try:
        uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not uploads:
            raise HTTPException(422, "no image files in the multipart body; send them in the field 'files' (with a filename)")
        return [(upload.filename or f"files[{i}]", await upload.read()) for i, upload in enumerate(uploads)]
    finally:
        await form.close()


async def _json_instances(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    try:
        payload = json.loads(await request.body())
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"malformed JSON: {str(exc)[:200]}") from None
    try:
        instances = InstancesRequest.model_validate(payload).instances
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise HTTPException(422, f'expected {{"instances": [base64 images]}}: {problems}') from None
    if not instances:
        raise HTTPException(422, "'instances' is empty; send at least one base64 image")
    if len(instances) > max_files:
        raise HTTPException(413, f"too many instances ({len(instances)}); send at most {max_files} per request")
    out = []
    for i, item in enumerate(instances):
        name = f"instances[{i}]"
        out.append((name, decode_base64(item if isinstance(item, str) else item.b64, name)))
    return out


def _finite(value: Any) -> Any:
    """NaN/inf (e.g. an undefined AUC in bundle.json) -> None, so the JSON stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@router.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=_PREDICT_BODY)
async def predict(
    request: Request,
    top_k: Optional[int] = Query(None, ge=1, le=10_000, description="How many classes to list per image (default: server's top_k)."),
) -> PredictResponse:
    """Classify one or more images: multipart files (field ``files``) or JSON ``{"instances": [base64, ...]}``.

    Returns per image the label, its confidence, the top-k and every class's probability.
    """
    engine, settings = engine_of(request), settings_of(request)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if engine.bundle.kind == "tabular":
        return await _predict_records(request, media_type, top_k)
    if media_type == "multipart/form-data":
        files = await _multipart_files(request, settings.max_files)
    elif media_type == "application/json" or media_type.endswith("+json"):
        files = await _json_instances(request, settings.max_files)
    else:
        raise HTTPException(415, "send images as multipart/form-data (field 'files') or JSON {\"instances\": [base64 images]}")
    request.state.images = len(files)
    # Decoding runs in threads, a few at a time: concurrent large uploads cannot all hold full-size pixels at once.
    prep, limiter = engine.bundle.preprocessing, request.app.state.decode_limiter
    batch = await anyio.to_thread.run_sync(decode_images, files, prep, settings.max_pixels, limiter=limiter)  # (N, H, W, C)
    probs = await engine.infer(batch)  # (N, num_classes)
    predictions = to_predictions(probs, engine.classes, top_k or settings.top_k)
    return PredictResponse(
        model=engine.bundle.name,
        version=engine.version,
        predictions=[ImagePrediction(file=name, **p.to_dict()) for (name, _), p in zip(files, predictions)],
    )


async def _predict_records(request: Request, media_type: str, top_k: Optional[int]) -> JSONResponse:
    """Tabular models: JSON ``{"records": [{column: value, ...}, ...]}``; 422 names a bad record's column."""
    engine, settings = engine_of(request), settings_of(request)
    if not (media_type == "application/json" or media_type.endswith("+json")):
        raise HTTPException(415, 'this model takes table rows: send JSON {"records": [{"column": value, ...}, ...]}')
    records = records_of(await request.body(), settings.max_infer_batch)
    rows = checked_rows(records, engine.classifier.schema)  # (N,) structured rows
    request.state.images = len(rows)
    probs = await engine.infer(rows)  # (N, num_classes)
    predictions = to_predictions(probs, engine.classes, top_k or settings.top_k)
    body = RecordsPredictResponse(
        model=engine.bundle.name,
        version=engine.version,
        predictions=[RecordPrediction(record=i, **p.to_dict()) for i, p in enumerate(predictions)],
    )
    return JSONResponse(body.model_dump())


@router.get("/model", response_model=ModelInfo, responses=ERRORS)
async def model_info(request: Request) -> ModelInfo:
    """The served model: name, version, classes, input size, preprocessing and evaluation metrics."""
    engine = engine_of(request)
    meta = engine.bundle.meta
    return ModelInfo(
        name=engine.bundle.name,
        version=engine.version,
        model_name=meta.get("model_name"),
        classes=engine.classes,
        input=meta.get("input", {}),
        input_size=list(engine.input_shape),
        output=meta.get("output", {}),
        preprocessing=meta.get("preprocessing", {}),
        metrics=_finite(meta.get("metrics") or {}),
        versions=meta.get("versions") or {},
        sha256=meta.get("files", {}).get(meta.get("model_file", "")),
        kind=engine.bundle.kind,
        inputs=meta.get("inputs"),
        table_schema=meta.get("schema"),
    )
