"""Serving fixtures: the shared real uvicorn server on 127.0.0.1 with small limits, and a client for it.

The bundle, ``start_server`` and ``digit_files`` live in tests/conftest.py (the reliability tests use them too).
"""

from __future__ import annotations

from typing import Iterator

import httpx
import pytest

from helpers import Server

# The limits every test of the shared server relies on (small, so tests can cross them cheaply).
LIMITS = {
    "PIXELMILL_MAX_BODY_BYTES": str(1 << 20),
    "PIXELMILL_MAX_PIXELS": "1000000",
    "PIXELMILL_MAX_FILES": "8",
    "PIXELMILL_MAX_INFER_BATCH": "64",
    "PIXELMILL_MAX_BATCH_SIZE": "32",
    "PIXELMILL_MAX_DELAY_MS": "10",
}


@pytest.fixture(scope="session")
def server(start_server) -> Iterator[Server]:
    """The shared server: no token, no rate limit, the small LIMITS above."""
    with start_server(env=LIMITS) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
