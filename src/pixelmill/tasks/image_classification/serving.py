"""How ``pixelmill serve`` reads and answers image classification requests.

Native ``/predict`` and ``/explain``: multipart files (field ``files``) or JSON
``{"instances": [base64, ...]}`` (:func:`read_files`), decoded in threads with the bomb, size
and format checks of ``serving.images``: ``/predict`` refuses the request for one bad file,
``/explain`` names it and answers the others. v2: one UINT8 ``[N, H, W, C]`` tensor named
after the bundle's input.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

import anyio
import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pixelmill.errors import DataError
from pixelmill.explain.heatmaps import grid, heatmap_png, heatmaps_from_cams
from pixelmill.explain.images import targets_of
from pixelmill.inference.session import array_to_image
from pixelmill.serving.images import decode_base64, decode_each, decode_images
from pixelmill.serving.schemas import (
    ExplainResponse,
    GridHeatmap,
    ImageExplanation,
    ImageFailure,
    ImagePrediction,
    InferRequest,
    InstancesRequest,
    PngHeatmap,
    PredictResponse,
    TensorSpec,
)
from pixelmill.serving.tensors import input_batch

takes_threshold = True  # /predict?threshold= moves a binary model's operating point (a 422 for other models)

NATIVE_MEDIA = "multipart/form-data (field 'files') or JSON {\"instances\": [base64 images]}"


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


async def read_files(request: Request, media_type: str, settings: Any) -> list[tuple[str, bytes]]:
    """The request's image files -> [(name, bytes)], undecoded; 4xx for a malformed request or too many files."""
    if media_type == "multipart/form-data":
        files = await _multipart_files(request, settings.max_files)
    elif media_type == "application/json" or media_type.endswith("+json"):
        files = await _json_instances(request, settings.max_files)
    else:
        raise HTTPException(415, f"send images as {NATIVE_MEDIA}")
    request.state.images = len(files)
    return files


async def native_inputs(request: Request, media_type: str, engine: Any, settings: Any, limiter: Any) -> tuple[list[str], np.ndarray]:
    """The request's images -> (file names, (N, H, W, C) uint8 batch); 4xx naming the bad file."""
    files = await read_files(request, media_type, settings)
    # Decoding runs in threads, a few at a time: concurrent large uploads cannot all hold full-size pixels at once.
    prep = engine.bundle.preprocessing
    batch = await anyio.to_thread.run_sync(decode_images, files, prep, settings.max_pixels, limiter=limiter)
    return [name for name, _ in files], batch


async def explain_inputs(request: Request, media_type: str, engine: Any, settings: Any, limiter: Any) -> tuple[list[str], list[np.ndarray | str]]:
    """The request's images -> (file names, per file its (H, W, C) uint8 image or why it was refused).

    4xx only for the request as a whole (malformed, too many files); a bad file is named in its own entry.
    """
    files = await read_files(request, media_type, settings)
    images = await anyio.to_thread.run_sync(decode_each, files, engine.bundle.preprocessing, settings.max_pixels, limiter=limiter)
    return [name for name, _ in files], images


def native_response(engine: Any, names: list[str], probs: np.ndarray, top_k: int, threshold: float | None = None) -> PredictResponse:
    """Per image: the label (a binary model's at its threshold), its confidence, the top-k and every class's probability."""
    try:
        predictions = engine.classifier.decode(probs, top_k, threshold)
    except DataError as exc:
        raise HTTPException(422, str(exc)) from None
    return PredictResponse(
        model=engine.name,
        version=engine.version,
        predictions=[ImagePrediction(file=name, **p.to_dict()) for name, p in zip(names, predictions)],
    )


def explained_images(
    engine: Any, names: list[str], images: list[np.ndarray | str], probs: np.ndarray, cams: np.ndarray,
    item: Callable[..., BaseModel], top_k: int, target: int | None, output: str, cells: int, threshold: Any = None,
) -> list[BaseModel]:
    """Per file: ``item(file, prediction fields, explanations)``, or an :class:`ImageFailure` for a file that was refused.

    ``probs`` (n, classes) and ``cams`` (n, classes, h, w) are the rows of the readable images,
    in order. Each image explains ``target`` if given, else its predicted class (multi-label:
    each predicted label); ``output`` is "png" (the heatmap over the image as the model saw it)
    or "grid" (``cells`` x ``cells`` floats).
    """
    try:
        predictions = engine.classifier.decode(probs, top_k, threshold)
    except DataError as exc:
        raise HTTPException(422, str(exc)) from None
    classes = engine.classes
    size = tuple(engine.input_shape[:2])
    rows = iter(range(len(predictions)))
    out: list[BaseModel] = []
    for name, image in zip(names, images):
        if isinstance(image, str):
            out.append(ImageFailure(file=name, error=image))
            continue
        row = next(rows)
        wanted = [target] if target is not None else targets_of(predictions[row], classes)
        explanations: list[BaseModel] = []
        for c, heatmap in zip(wanted, heatmaps_from_cams(cams[row, wanted], size)):
            label, probability = classes[c], float(probs[row, c])
            if output == "grid":
                explanations.append(GridHeatmap(label=label, probability=probability, grid=grid(heatmap, cells)))
            else:
                png = heatmap_png(heatmap, array_to_image(image))
                explanations.append(PngHeatmap(label=label, probability=probability, heatmap_png=base64.b64encode(png).decode()))
        out.append(item(file=name, **predictions[row].to_dict(), explanations=explanations))
    return out


def explain_response(engine: Any, names: list[str], images: list[np.ndarray | str], probs: np.ndarray, cams: np.ndarray, **options: Any) -> JSONResponse:
    """``/explain``: per image its prediction as ``/predict`` gives it and the heatmaps (``options``: see :func:`explained_images`)."""
    body = ExplainResponse(
        model=engine.name, version=engine.version, predictions=explained_images(engine, names, images, probs, cams, ImageExplanation, **options)
    )
    return JSONResponse(body.model_dump())


def v2_inputs(engine: Any) -> list[TensorSpec]:
    """v2 model metadata: one UINT8 [-1, H, W, C] input."""
    return [TensorSpec(name=engine.bundle.input_name, datatype="UINT8", shape=[-1, *engine.input_shape])]


def v2_config_inputs(engine: Any) -> list[dict[str, Any]]:
    """Triton model configuration ``input``."""
    return [{"name": engine.bundle.input_name, "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": list(engine.input_shape)}]


def v2_batch(request: InferRequest, binary: bytes, engine: Any, max_batch: int) -> np.ndarray:
    """A v2 request -> (N, H, W, C) uint8."""
    return input_batch(request, binary, engine.bundle.input_name, engine.input_shape, max_batch)
