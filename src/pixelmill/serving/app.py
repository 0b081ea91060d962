"""``create_app(settings)``: the FastAPI app. The ONNX session is opened in the lifespan, never at import."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from pixelmill import __version__
from pixelmill.serving.engine import Engine, EngineStopped, Overloaded
from pixelmill.serving.middleware import LIVENESS, BearerAuthMiddleware, BodyLimitMiddleware, RateLimitMiddleware, RequestContextMiddleware
from pixelmill.serving.routes import explain, health, metrics, predict, v2
from pixelmill.serving.settings import ServeSettings, available_cpus
from pixelmill.serving.telemetry import ServingMetrics


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error body is ``{"error": "..."}``."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ()))) or 'request'}: {e.get('msg')}" for e in exc.errors()[:5])
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(EngineStopped)
    async def stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "1"})


def _declare_bearer_auth(app: FastAPI, exempt: frozenset[str] = frozenset({LIVENESS})) -> None:
    """Show the bearer token in ``/openapi.json`` (and the Authorize button of ``/docs``).

    Only declared here: ``BearerAuthMiddleware`` enforces it, on every path (``/docs``,
    ``/openapi.json`` and unknown paths too) with its own 401 body. The schema gets FastAPI's
    ``HTTPBearer`` security scheme, required by every operation but ``exempt`` (liveness).
    """
    bearer = HTTPBearer(description="The server's `PIXELMILL_API_TOKEN`: `Authorization: Bearer <token>`.", auto_error=False)
    build = app.openapi  # FastAPI's generator, which caches the schema on app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes[bearer.scheme_name] = jsonable_encoder(bearer.model, by_alias=True, exclude_none=True)
            for path, item in schema.get("paths", {}).items():
                if path not in exempt:
                    for operation in item.values():
                        operation["security"] = [{bearer.scheme_name: []}]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the app: routes, limits, auth, rate limit, metrics. The model loads when the app starts."""
    telemetry = ServingMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine.from_settings(settings, telemetry)
        await engine.start()
        telemetry.model_info.info(
            {
                "name": engine.bundle.name,
                "version": engine.version,
                "model_name": str(engine.bundle.meta.get("model_name", "")),
                "classes": str(len(engine.classes)),
                "input_shape": "x".join(map(str, engine.input_shape)),
                "ort_intra_threads": str(settings.ort_intra_threads),
            }
        )
        app.state.engine = engine
        app.state.decode_limiter = anyio.CapacityLimiter(available_cpus())
        try:
            yield
        finally:
            app.state.engine = None
            await engine.stop()

    app = FastAPI(
        title="pixelmill",
        version=__version__,
        description="Image classification on ONNX Runtime: a native API (`/predict`, `/explain`, `/model`) and the "
        "Open Inference Protocol v2 (`/v2/...`, Triton/KServe clients).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = telemetry
    app.state.engine = None
    _install_error_handlers(app)
    for router in (predict.router, explain.router, v2.router, health.router, metrics.router):
        app.include_router(router)
    # Added innermost first: a request meets context -> rate limit -> auth -> body limit -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    if settings.api_token is not None and settings.api_token.get_secret_value():
        app.add_middleware(BearerAuthMiddleware, token=settings.api_token.get_secret_value())
        _declare_bearer_auth(app)
    if settings.rate_limit > 0:
        app.add_middleware(RateLimitMiddleware, rate=settings.rate_limit, burst=settings.rate_burst)
    app.add_middleware(RequestContextMiddleware, metrics=telemetry)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker serving: every worker builds its app from PIXELMILL_* variables."""
    return create_app(ServeSettings())
