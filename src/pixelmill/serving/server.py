"""``serve(settings)``: resolve and verify the bundle, then run uvicorn (one or more workers)."""

from __future__ import annotations

import os
from functools import partial

from pixelmill.serving.engine import load_bundle
from pixelmill.serving.logs import logging_config
from pixelmill.serving.settings import ServeSettings, settings_env


def serve(settings: ServeSettings) -> None:
    """Serve until interrupted. A bad bundle fails here (BundleError), before any port is bound.

    A ``models:/`` URI is resolved once, so every worker loads the same local bundle.
    """
    import uvicorn

    from pixelmill.serving.protocol import HeadDeadlineProtocol

    bundle = load_bundle(settings.model, settings.tracking_uri)
    settings = settings.model_copy(update={"model": str(bundle.path)})
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
