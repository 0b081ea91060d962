"""Bearer token and per-client rate limit, each on its own real uvicorn process."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def auth_server(start_server):
    with start_server(env={"PIXELMILL_API_TOKEN": TOKEN}) as srv:
        yield srv


@pytest.fixture(scope="module")
def limited_server(start_server):
    with start_server(env={"PIXELMILL_RATE_LIMIT": "1", "PIXELMILL_RATE_BURST": "3"}) as srv:
        yield srv


def _all_routes(url: str, bundle_name: str) -> list[tuple[str, str]]:
    schema = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    routes = [
        (method.upper(), path.replace("{name}", bundle_name).replace("{version}", "1"))
        for path, item in schema["paths"].items()
        for method in item
    ]
    return routes + [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/nope")]


def test_missing_or_wrong_token_is_401_everywhere_but_liveness(auth_server, bundle_name: str) -> None:
    routes = _all_routes(auth_server.url, bundle_name)
    assert len(routes) >= 15
    with httpx.Client(base_url=auth_server.url) as http:
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
                response = http.request(method, path, headers=headers)
                if path == "/v2/health/live":
                    assert response.status_code == 200
                else:
                    assert response.status_code == 401, (method, path, headers)
                    assert response.json() == {"error": "missing or invalid bearer token"}
                    assert response.headers["www-authenticate"] == "Bearer"


def test_the_right_token_is_served(auth_server, bundle_name: str, digit_files: list[Path]) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=auth_server.url, headers=headers) as http:
        assert http.get("/model").status_code == 200
        assert http.get("/metrics").status_code == 200
        assert http.get("/docs").status_code == 200
        files = [("files", ("a.png", digit_files[0].read_bytes(), "image/png"))]
        assert http.post("/predict", files=files).status_code == 200


def test_openapi_declares_the_bearer_scheme_when_a_token_is_set(auth_server) -> None:
    from pixelmill.serving.app import create_app
    from pixelmill.serving.settings import ServeSettings

    schema = httpx.get(f"{auth_server.url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    schemes = schema["components"]["securitySchemes"]
    [(name, scheme)] = [(n, s) for n, s in schemes.items() if s.get("type") == "http" and s.get("scheme") == "bearer"]
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            expected = [] if path == "/v2/health/live" else [{name: []}]
            assert operation.get("security", []) == expected, (method, path)
    assert "securitySchemes" not in create_app(ServeSettings(model="unused")).openapi().get("components", {})  # no token: none


def test_tritonclient_sends_the_token(auth_server, bundle_name: str) -> None:
    tritonclient_http = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    triton = tritonclient_http.InferenceServerClient(url=auth_server.url.removeprefix("http://"))
    try:
        assert triton.get_model_metadata(bundle_name, headers={"Authorization": f"Bearer {TOKEN}"})["name"] == bundle_name
        with pytest.raises(InferenceServerException, match="bearer token"):
            triton.get_model_metadata(bundle_name)
    finally:
        triton.close()


def test_rate_limit_is_429_with_retry_after_per_client(limited_server) -> None:
    with httpx.Client(base_url=limited_server.url) as http:
        statuses = [http.get("/model").status_code for _ in range(6)]
        assert statuses[:3] == [200, 200, 200]  # the burst
        assert 429 in statuses[3:]
        limited = http.get("/model")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1 and "rate limit" in limited.json()["error"]
        assert http.get("/v2/health/live").status_code == 200  # probes are never limited
        assert http.get("/v2/health/ready").status_code == 200
        time.sleep(1.2)  # one token per second refills
        assert http.get("/model").status_code == 200
