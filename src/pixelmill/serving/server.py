"""``serve(settings)``: resolve and verify the bundle, then run uvicorn (one or more workers)."""

from __future__ import annotations

import os
from functools import partial

from pixelmill.serving.logs import logging_config
from pixelmill.serving.repository import check_plan
from pixelmill.serving.settings import ServeSettings, settings_env


def serve(settings: ServeSettings) -> None:
    """Serve until interrupted. A bad bundle, two models under one name and version, a traffic
    split to a version that is not served, an unknown execution provider: each fails here
    (BundleError, ConfigError), before any port is bound.

    Workers get the SPECs as given, so ``models:/NAME@ALIAS`` is resolved by each at its start
    (and again when SIGHUP makes uvicorn restart them).
    """
    import uvicorn

    from pixelmill.serving.protocol import HeadDeadlineProtocol

    settings.provider_list  # noqa: B018 - an unknown provider name is a ConfigError now, not in a worker
    check_plan(settings)
    options = dict(
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level),
        access_log=False,  # RequestContextMiddleware writes a structured one
        server_header=False,
        timeout_graceful_shutdown=10,
        http=partial(HeadDeadlineProtocol, head_timeout_s=settings.header_timeout_s),  # slow-loris guard
    )
    if settings.workers == 1:
        from pixelmill.serving.app import create_app

        uvicorn.run(create_app(settings), **options)
        return
    os.environ.update(settings_env(settings))  # workers are new processes: they read PIXELMILL_*
    uvicorn.run("pixelmill.serving.app:app_from_env", factory=True, workers=settings.workers, **options)
