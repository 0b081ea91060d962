"""One router per resource: predict (native API), explain, v2 (Open Inference Protocol), health, metrics."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request

from pixelmill.serving.engine import Engine
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


def engine_of(request: Request) -> Engine:
    """The app's engine, or 503 while it is not serving."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready:
        raise HTTPException(503, "the model is not ready")
    return engine


def settings_of(request: Request) -> ServeSettings:
    return request.app.state.settings
