"""Requests generated from the served OpenAPI schema (valid and invalid ones) never get a 5xx."""

from __future__ import annotations

from datetime import timedelta

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from pixelmill.serving.app import create_app  # noqa: E402
from pixelmill.serving.settings import ServeSettings  # noqa: E402

MAX_EXAMPLES = 25  # per operation and mode: ~600 requests in all


def _cases() -> list:
    """(method, path, mode) known at collection time from the app itself (building it loads no model).

    Invalid requests only exist for operations with a body or a query parameter (any string
    is a valid path segment), so only those get the negative mode too.
    """
    cases = []
    for path, item in create_app(ServeSettings(model="unused")).openapi()["paths"].items():
        for method, operation in item.items():
            modes = [GenerationMode.POSITIVE]
            if "requestBody" in operation or any(p["in"] == "query" for p in operation.get("parameters", [])):
                modes.append(GenerationMode.NEGATIVE)
            cases += [pytest.param(method.upper(), path, mode, id=f"{method.upper()} {path} {mode}") for mode in modes]
    return cases


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), _cases())
def test_no_generated_request_gets_a_server_error(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=timedelta(seconds=5),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case) -> None:
        case.call_and_validate(checks=[not_a_server_error], timeout=15)

    check()
