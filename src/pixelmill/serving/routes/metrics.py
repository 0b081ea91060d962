"""``GET /metrics`` in the Prometheus text format, from the app's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pixelmill.serving.routes import ERRORS

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={**ERRORS, 200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}})
async def metrics(request: Request) -> Response:
    """Requests, latencies (queue, inference, total), batch sizes, in-flight requests, model info."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
