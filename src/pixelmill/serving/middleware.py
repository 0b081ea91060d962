"""Pure ASGI middleware: request context (id, access log, metrics), rate limit, bearer token, body limit.

Pure ASGI rather than ``BaseHTTPMiddleware`` so the body limit can count bytes while they
stream in, and so nothing buffers a response.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from pixelmill.serving.telemetry import ServingMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

access_log = logging.getLogger("pixelmill.serving.access")
log = logging.getLogger(__name__)

LIVENESS = "/v2/health/live"
MANAGEMENT = "/v2/repository"  # the paths that change what is served
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer": logged, never sent
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Send a complete ``{"error": message}`` JSON response."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v2/models/{name}/infer``), bounded label cardinality."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return route.path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", []):
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return getattr(candidate, "path", "unmatched")
    return "unmatched"


def _outcome(status: int) -> str:
    if status == CLIENT_CLOSED:
        return "client_closed"
    return "ok" if status < 400 else ("rejected" if status < 500 else "error")


class RequestContextMiddleware:
    """X-Request-ID (echoed when sane, else generated), X-Model-Name/-Version of the answering model, JSON access log, request metrics.

    The log holds method, path, route, status, latency and outcome: never bodies or images.
    A client that hung up mid-body is recorded as 499 ``client_closed``, not as a server error.
    """

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = Headers(scope=scope).get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                served = scope["state"].get("served")  # (name, version) of the model version that answered
                if served is not None:
                    headers["X-Model-Name"], headers["X-Model-Version"] = served
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # hung up mid-body: nobody to answer, nothing wrong with the server
            status = status or CLIENT_CLOSED
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope["method"], scope["path"], request_id)
            if status is not None:
                raise
            await send_error(send_with_id, 500, f"internal server error (request id {request_id})")
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, request_id, status or 500, time.perf_counter() - start)

    def _record(self, scope: Scope, request_id: str, status: int, latency: float) -> None:
        route = route_template(scope)
        self.metrics.requests.labels(route, scope["method"], str(status)).inc()
        self.metrics.latency.labels(route).observe(latency)
        client = scope.get("client")
        fields = {
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "latency_ms": round(latency * 1000.0, 3),
            "outcome": _outcome(status),
            "client": client[0] if client else None,
        }
        images = scope.get("state", {}).get("images")
        if images is not None:
            fields["images"] = images
        served = scope.get("state", {}).get("served")
        if served is not None:
            fields["model"], fields["version"] = served
        access_log.info("request", extra={"fields": fields})


class TokenBuckets:
    """One token bucket per client key, in memory, least recently seen evicted past ``max_clients``."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, last time)

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token: 0.0 if allowed, else the seconds until a token is available."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


class RateLimitMiddleware:
    """429 with Retry-After once a client (by address) exceeds ``rate`` requests/s beyond ``burst``."""

    def __init__(self, app: ASGIApp, rate: float, burst: int, exempt_prefix: str = "/v2/health/") -> None:
        self.app = app
        self.buckets = TokenBuckets(rate, burst)
        self.exempt_prefix = exempt_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(self.exempt_prefix):
            client = scope.get("client")
            wait = self.buckets.take(client[0] if client else "unknown")
            if wait > 0:
                retry = max(1, math.ceil(wait))
                await send_error(send, 429, f"rate limit exceeded; retry in {retry} s", {"Retry-After": str(retry)})
                return
        await self.app(scope, receive, send)


class BearerAuthMiddleware:
    """401 unless ``Authorization: Bearer <token>`` matches; liveness stays open for probes.

    Enforced here, for every path (routes, ``/docs``, ``/openapi.json``, unknown paths) with one
    ``{"error": ...}`` body; ``/openapi.json`` declares it as an HTTP bearer scheme (``app.py``).
    With an admin token, the management paths (``/v2/repository/...``: load, unload, traffic)
    take that token and no other; without one they take the API token like every route.
    """

    def __init__(
        self, app: ASGIApp, token: str | None, admin_token: str | None = None, exempt: frozenset[str] = frozenset({LIVENESS})
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.admin_token = admin_token.encode() if admin_token else None
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.exempt:
            admin = self.admin_token is not None and scope["path"].startswith(MANAGEMENT)
            needed = self.admin_token if admin else self.token
            if needed is not None:
                scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), needed):
                    which = "admin token (PIXELMILL_ADMIN_TOKEN)" if admin else "bearer token"
                    await send_error(send, 401, f"missing or invalid {which}", {"WWW-Authenticate": "Bearer"})
                    return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class BodyLimitMiddleware:
    """Guards the request body: 413 past ``max_bytes``, 408 past ``timeout_s``, silence when the client hangs up.

    Size: 413 at once from Content-Length, else as soon as the stream passes the limit.
    Time: the whole body must arrive within ``timeout_s`` of the app's first read, or the
    answer is 408 with ``Connection: close``; uvicorn has no body-read timeout of its own,
    so without this a client sending a byte a second would hold a connection and a task
    for as long as it likes (slow loris).
    Either way, whatever the app was doing with the body is dropped and replaced by the
    4xx, so no parser downstream sees more than ``max_bytes``. After a 413 uvicorn discards
    the rest of an unread body instead of resetting the connection, so the client gets to
    read the 413.
    Disconnect: a client that hangs up before its body is complete gets no answer (nobody
    would read it); ``ClientDisconnect`` goes up for RequestContextMiddleware to record.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body exceeds the limit of {self.max_bytes} bytes"
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                await send_error(send, 400, f"invalid Content-Length {length[:40]!r}")
                return
            if int(length) > self.max_bytes:
                await send_error(send, 413, too_large)
                return
        received = 0
        deadline: float | None = None
        body_done = False
        failure: type[Exception] | None = None  # _BodyTooLarge, _BodyTooSlow or ClientDisconnect
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, deadline, body_done, failure
            if failure is not None:
                raise failure()
            if body_done:  # after the body only http.disconnect can come: no deadline on waiting for it
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + self.timeout_s
            try:
                with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                failure = _BodyTooSlow
                raise _BodyTooSlow() from None
            if message["type"] == "http.disconnect":
                failure = ClientDisconnect  # the app sees the message; whatever it answers is dropped
            elif message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    failure = _BodyTooLarge
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if failure is not None:  # the app answered the aborted read (e.g. a 400): ours replaces it
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if failure is None:
                raise
        if failure is None or started:
            return
        if failure is _BodyTooLarge:
            await send_error(send, 413, too_large)
        elif failure is _BodyTooSlow:
            message = f"request body not received within {self.timeout_s:g} s; send it faster or in smaller requests"
            await send_error(send, 408, message, {"Connection": "close"})  # close: the slow client holds nothing more
        else:
            raise ClientDisconnect()
