"""``create_app(settings)``: the FastAPI app. The ONNX session is opened in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
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
from pixelmill.serving.engine import EngineStopped, Overloaded
from pixelmill.serving.middleware import LIVENESS, BearerAuthMiddleware, BodyLimitMiddleware, RateLimitMiddleware, RequestContextMiddleware
from pixelmill.serving.repository import Repository, RepositoryError
from pixelmill.serving.routes import explain, health, metrics, predict, v2
from pixelmill.serving.routes import repository as repository_routes
from pixelmill.serving.settings import ServeSettings, available_cpus
from pixelmill.serving.shared import STATE_DIR_ENV, SharedState
from pixelmill.serving.telemetry import ServingMetrics

log = logging.getLogger(__name__)


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

    @app.exception_handler(RepositoryError)
    async def repository_error(request: Request, exc: RepositoryError) -> JSONResponse:
        return _error(exc.status, str(exc))

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


def _reload_on_sighup(repository: Repository) -> bool:
    """SIGHUP loads every served name again (a moved ``models:/NAME@ALIAS`` brings its new version in).

    With several workers, the server's supervisor passes its SIGHUP to one worker, which
    reloads and shares the result with the others (:mod:`pixelmill.serving.shared`).
    """
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task] = set()

    def hangup() -> None:
        log.info("SIGHUP: loading every model again")
        task = loop.create_task(repository.reload_all())
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, hangup)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (a test client), or no SIGHUP here
        return False
    return True


def create_app(settings: ServeSettings, shared_dir: str | None = None) -> FastAPI:
    """Build the app: routes, limits, auth, rate limit, metrics. The model loads when the app starts.

    ``shared_dir``: the folder where the workers of one server share their repository state.
    """
    telemetry = ServingMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repository = Repository(settings, telemetry)
        try:
            await (repository.start() if shared_dir is None else repository.start_shared(SharedState(shared_dir)))
        except BaseException:
            await repository.stop()
            raise
        app.state.repository = repository
        app.state.decode_limiter = anyio.CapacityLimiter(available_cpus())
        hangup = _reload_on_sighup(repository)
        try:
            yield
        finally:
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            app.state.repository = None
            await repository.stop()

    app = FastAPI(
        title="pixelmill",
        version=__version__,
        description="Image classification on ONNX Runtime: a native API (`/predict`, `/explain`, `/model`; "
        "`/models/{name}/...` when several models are served) and the Open Inference Protocol v2 (`/v2/...`, Triton/KServe "
        "clients, with Triton's repository API to load and unload models).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = telemetry
    app.state.repository = None
    _install_error_handlers(app)
    for router in (predict.router, explain.router, v2.router, repository_routes.router, health.router, metrics.router):
        app.include_router(router)
    # Added innermost first: a request meets context -> rate limit -> auth -> body limit -> routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    token, admin = (secret.get_secret_value() if secret is not None else "" for secret in (settings.api_token, settings.admin_token))
    if token or admin:
        app.add_middleware(BearerAuthMiddleware, token=token or None, admin_token=admin or None)
        _declare_bearer_auth(app)
    if settings.rate_limit > 0:
        app.add_middleware(RateLimitMiddleware, rate=settings.rate_limit, burst=settings.rate_burst)
    app.add_middleware(RequestContextMiddleware, metrics=telemetry)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker serving: every worker builds its app from PIXELMILL_* variables."""
    return create_app(ServeSettings(), os.environ.get(STATE_DIR_ENV))
