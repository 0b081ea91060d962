"""Triton's model repository API (index, load, unload) and pixelmill's traffic route, under ``/v2/repository``.

``tritonclient``'s ``get_model_repository_index``, ``load_model`` and ``unload_model`` work
unchanged. ``load`` resolves the name's sources again (a moved ``models:/NAME@ALIAS`` brings its
new version in, checked and warmed up before it takes traffic); ``unload`` takes an optional
``parameters.version``. ``.../traffic`` reads or sets a name's split by weight and its shadow.
With an admin token set (``PIXELMILL_ADMIN_TOKEN``) every route here needs it.

With several workers, the worker a change reaches makes it, shares the new state with the
others and answers once every one serves it (``"workers"`` in the answer counts them).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field, ValidationError

from pixelmill.serving.routes import ERRORS, repository_of

router = APIRouter(prefix="/v2/repository", tags=["repository"])

_RESPONSES = {**ERRORS, 409: {"description": "Refused: traffic is split to what would leave"}}


class IndexEntry(BaseModel):
    name: str
    version: Optional[str] = None
    state: str = Field(description="READY or UNAVAILABLE")
    reason: str = ""


class Traffic(BaseModel):
    """A name's traffic: weights by version (summing to 100; empty: all to the default version) and an optional shadow version."""

    weights: dict[str, float] = {}
    shadow: Optional[str] = None


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise HTTPException(400, "the body is not JSON; send {} or {\"parameters\": {...}}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


@router.post("/index", response_model=list[IndexEntry], responses=ERRORS)
async def index(request: Request) -> list[IndexEntry]:
    """Every model name and version, READY or UNAVAILABLE (unloaded) with the reason; ``{"ready": true}`` lists the ready ones only."""
    body = await _body(request)
    rows = [IndexEntry(**row) for row in repository_of(request).index()]
    return [row for row in rows if row.state == "READY"] if body.get("ready") else rows


@router.post("/models/{name}/load", responses=_RESPONSES)
async def load(name: str, request: Request) -> dict[str, Any]:
    """Load a name again from its sources: new versions take traffic once verified and warmed up; a failure leaves the old ones serving."""
    await _body(request)  # tritonclient sends its own parameters (config, files): pixelmill loads from the sources it was given
    return await repository_of(request).load(name)


@router.post("/models/{name}/unload", responses=_RESPONSES)
async def unload(name: str, request: Request) -> dict[str, Any]:
    """Stop serving a name, or one version (``{"parameters": {"version": "2"}}``), once its in-flight requests are answered."""
    parameters = (await _body(request)).get("parameters") or {}
    version = parameters.get("version") if isinstance(parameters, dict) else None
    return await repository_of(request).unload(name, None if version is None else str(version))


@router.get("/models/{name}/traffic", responses=ERRORS)
async def get_traffic(name: str, request: Request) -> dict[str, Any]:
    """The name's default version, versions, traffic weights, shadow version and sticky header."""
    return repository_of(request).traffic(name)


@router.post("/models/{name}/traffic", responses=_RESPONSES)
async def set_traffic(name: str, request: Request) -> dict[str, Any]:
    """Split the name's traffic by weight (``{"weights": {"1": 90, "2": 10}}``) and/or shadow a version (``{"shadow": "2"}``); ``{}`` sends all to the default."""
    try:
        traffic = Traffic.model_validate(await _body(request))
    except ValidationError as exc:
        raise HTTPException(422, "invalid traffic: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])) from None
    return await repository_of(request).set_traffic(name, traffic.weights, traffic.shadow)
