"""uvicorn's HTTP protocols plus a deadline on every request head: the slow-loris guard.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but any byte
cancels that timer and nothing re-arms it: a client that connects and sends a header
line now and then, or keeps trickling the rest of a body the server already answered
(say with a 413), holds its connection and file descriptor for as long as it likes.
Here a connection has ``head_timeout_s`` from connecting, and from the end of each
response, to deliver a complete request head; bytes arriving meanwhile do not extend it.
Reading a body is the app's part: BodyLimitMiddleware gives it ``body_timeout_s``.

The guard sits on uvicorn's httptools protocol (its C parser) when httptools is installed,
and on the pure-Python h11 one otherwise; both start a new request cycle when a head is complete.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed
    HttpToolsProtocol = None


class _HeadDeadline:
    """The deadline logic, mixed into one of uvicorn's HTTP protocols (which provides ``cycle``, ``loop``, ``transport``)."""

    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def __init__(self, *args: Any, head_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # a request head arrived: the app has the connection now
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request started: the next head has its deadline
            self._arm()
        else:
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class H11HeadDeadlineProtocol(_HeadDeadline, H11Protocol):
    """``H11Protocol`` that closes a connection which has not sent a complete request head in time."""


if HttpToolsProtocol is not None:

    class HttpToolsHeadDeadlineProtocol(_HeadDeadline, HttpToolsProtocol):
        """``HttpToolsProtocol`` that closes a connection which has not sent a complete request head in time."""

    HeadDeadlineProtocol: type = HttpToolsHeadDeadlineProtocol
else:
    HeadDeadlineProtocol = H11HeadDeadlineProtocol
