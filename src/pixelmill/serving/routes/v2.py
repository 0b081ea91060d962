"""Open Inference Protocol v2 (KServe / Triton REST): server and model metadata, readiness, infer.

Triton clients (``tritonclient.http``) work unchanged, JSON or binary tensors, with or
without a model version in the path.
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, HTTPException, Request, Response

from pixelmill import __version__
from pixelmill.serving.engine import Engine
from pixelmill.serving.routes import ERRORS, engine_of, infer, repository_of, serving, settings_of
from pixelmill.serving.schemas import InferRequest, InferResponse, ModelMetadata, ReadyResponse, ServerMetadata, TensorSpec, inline_schema
from pixelmill.serving.tensors import HEADER_LENGTH, encode_response, output_requests, parse_request, split_body

router = APIRouter(prefix="/v2", tags=["v2"])

_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "JSON tensors; Triton's binary tensor extension appends raw bytes after the JSON "
        "and sends its length in the Inference-Header-Content-Length header.",
        "content": {"application/json": {"schema": inline_schema(InferRequest)}},
    }
}
_INFER_RESPONSES = {**ERRORS, 200: {"model": InferResponse, "description": "Output tensors (JSON, or JSON + binary)"}}


def _model(request: Request, name: str, version: Optional[str]) -> Engine:
    """The named version (default: the name's default version) if this server serves it, else 404."""
    return engine_of(request, name, version or None)


@router.get("", response_model=ServerMetadata, responses=ERRORS)
async def server_metadata() -> ServerMetadata:
    """Server name, version and the protocol extensions it supports."""
    return ServerMetadata(name="pixelmill", version=__version__, extensions=["binary_tensor_data", "classification", "model_configuration"])


def _metadata(request: Request, engine: Engine) -> ModelMetadata:
    return ModelMetadata(
        name=engine.name,
        versions=repository_of(request).versions(engine.name),
        platform="onnxruntime_onnx",
        inputs=engine.codec.v2_inputs(engine),
        outputs=[TensorSpec(name=engine.bundle.output_name, datatype="FP32", shape=engine.bundle.info.output.shape)],  # the task's output contract
        providers=engine.providers,
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS)
async def model_metadata(name: str, request: Request) -> ModelMetadata:
    """Input and output tensors of the model: UINT8 [-1, H, W, C] in, FP32 [-1, classes] out."""
    return _metadata(request, _model(request, name, None))


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS)
async def model_version_metadata(name: str, version: str, request: Request) -> ModelMetadata:
    """Model metadata for an explicit version."""
    return _metadata(request, _model(request, name, version))


@router.get("/models/{name}/ready", response_model=ReadyResponse, responses=ERRORS)
async def model_ready(name: str, request: Request) -> ReadyResponse:
    """200 when the model can take requests."""
    return ReadyResponse(name=_model(request, name, None).name, ready=True)


@router.get("/models/{name}/versions/{version}/ready", response_model=ReadyResponse, responses=ERRORS)
async def model_version_ready(name: str, version: str, request: Request) -> ReadyResponse:
    """200 when that version of the model can take requests."""
    return ReadyResponse(name=_model(request, name, version).name, ready=True)


@router.get("/models/{name}/config", responses=ERRORS)
async def model_config(name: str, request: Request) -> dict[str, Any]:
    """A Triton-style model configuration (for clients that ask for it)."""
    engine, settings = _model(request, name, None), settings_of(request)
    return {
        "name": engine.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": settings.max_infer_batch,
        "input": engine.codec.v2_config_inputs(engine),
        "output": [{"name": engine.bundle.output_name, "data_type": "TYPE_FP32", "dims": [len(engine.classes)]}],
        "dynamic_batching": {"preferred_batch_size": [settings.max_batch_size], "max_queue_delay_microseconds": int(settings.max_delay_ms * 1000)},
    }


async def _infer(request: Request, name: str, version: Optional[str]) -> Response:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise HTTPException(415, f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed")
    settings = settings_of(request)
    async with serving(request, name, version or None) as choice:
        engine = choice.engine
        header, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
        infer_request = parse_request(header)
        outputs = output_requests(infer_request, engine.bundle.output_name)
        batch = engine.codec.v2_batch(infer_request, binary, engine, settings.max_infer_batch)  # images (N, H, W, C), table rows (N,)
        request.state.images = len(batch)
        probs = await infer(request, choice, batch)  # (N, num_classes)
        body, header_length = encode_response(engine.name, engine.version, infer_request.id, probs, engine.classes, outputs)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)})


@router.post("/models/{name}/infer", response_model=None, responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
async def infer_model(name: str, request: Request) -> Response:
    """Run the model on a UINT8 [N, H, W, C] tensor named after the bundle's input ('image'): its default version, or the one its traffic split picks."""
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", response_model=None, responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
async def infer_version(name: str, version: str, request: Request) -> Response:
    """Inference on an explicit model version."""
    return await _infer(request, name, version)
