"""Liveness and readiness (the v2 paths Kubernetes probes and Triton clients use)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from pixelmill.serving.routes import ERRORS
from pixelmill.serving.schemas import LiveResponse, ReadyResponse

router = APIRouter(prefix="/v2/health", tags=["health"])


@router.get("/live", response_model=LiveResponse)
async def live() -> LiveResponse:
    """200 while the process answers; needs no token."""
    return LiveResponse(live=True)


@router.get("/ready", response_model=ReadyResponse, responses=ERRORS)
async def ready(request: Request) -> ReadyResponse:
    """200 once every model is loaded and batching, 503 before and during shutdown."""
    repository = getattr(request.app.state, "repository", None)
    if repository is None or not repository.ready:
        raise HTTPException(503, "the model is not ready")
    names = repository.names()
    return ReadyResponse(name=names[0] if len(names) == 1 else None, ready=True)
