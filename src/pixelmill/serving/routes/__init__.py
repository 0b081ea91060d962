"""One router per resource: predict (native API), explain, v2 (Open Inference Protocol), health, metrics."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import HTTPException, Request

from pixelmill.serving.engine import Engine
from pixelmill.serving.repository import Choice, Repository
from pixelmill.serving.schemas import ErrorResponse
from pixelmill.serving.settings import ServeSettings

# Documented error responses (all bodies are {"error": "..."}).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed request",
        401: "Missing or invalid bearer token",
        404: "Unknown model",
        408: "Request body not received within the body timeout",
        413: "Body, image, file count or batch over a limit",
        415: "Not an image / unsupported content type",
        422: "Invalid or corrupt input",
        429: "Rate limit exceeded",
        503: "Model not ready or overloaded",
    }.items()
}


# The request body of /predict and /explain as OpenAPI shows it (the routes read it themselves: multipart or JSON).
IMAGES_BODY: dict[str, Any] = {
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


def repository_of(request: Request) -> Repository:
    """The app's model repository, or 503 while it is not serving."""
    repository = getattr(request.app.state, "repository", None)
    if repository is None:
        raise HTTPException(503, "the model is not ready")
    return repository


def engine_of(request: Request, name: str | None = None, version: str | None = None) -> Engine:
    """A served version for a read-only route (metadata, readiness): named, else the only name's default."""
    repository = repository_of(request)
    engine = repository.engine(name or repository.only_name(), version)
    if not engine.ready:
        raise HTTPException(503, f"model '{engine.name}' version {engine.version} is not ready")
    return engine


@asynccontextmanager
async def serving(request: Request, name: str | None = None, version: str | None = None) -> AsyncIterator[Choice]:
    """Where an inference request goes (the version asked for, else the traffic split), held until it is answered.

    The answer's ``X-Model-Name`` and ``X-Model-Version`` headers name the version that produced it.
    """
    choice = repository_of(request).route(name, version, request.headers)
    engine = choice.engine
    with engine.lease():
        request.state.served = (engine.name, engine.version)
        metrics = request.app.state.metrics
        yield choice
        metrics.model_requests.labels(engine.name, engine.version, "served").inc()


async def infer(request: Request, choice: Choice, batch: Any) -> Any:
    """The served version's outputs for ``batch``; in shadow mode a copy goes to the shadow version too."""
    outputs = await choice.engine.infer(batch)
    if choice.shadow is not None:
        request.app.state.metrics.model_requests.labels(choice.shadow.name, choice.shadow.version, "shadow").inc()
        repository_of(request).mirror(choice, batch, outputs, getattr(request.state, "request_id", ""))
    return outputs


def settings_of(request: Request) -> ServeSettings:
    return request.app.state.settings
