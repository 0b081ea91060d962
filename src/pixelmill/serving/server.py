"""``serve(settings)``: resolve and verify the bundle, then run uvicorn (one or more workers)."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from functools import partial

from pixelmill.serving.logs import logging_config
from pixelmill.serving.repository import check_plan
from pixelmill.serving.settings import ServeSettings, settings_env
from pixelmill.serving.shared import STATE_DIR_ENV

log = logging.getLogger(__name__)


def serve(settings: ServeSettings) -> None:
    """Serve until interrupted. A bad bundle, two models under one name and version, a traffic
    split to a version that is not served, an unknown execution provider: each fails here
    (BundleError, ConfigError), before any port is bound.

    With several workers, the first to start resolves the SPECs and shares what it serves with
    the others (:mod:`pixelmill.serving.shared`); SIGHUP goes to one worker, which reloads.
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
    with tempfile.TemporaryDirectory(prefix="pixelmill-serve-") as shared:
        os.environ[STATE_DIR_ENV] = shared  # where the workers share what is served (pixelmill.serving.shared)
        config = uvicorn.Config("pixelmill.serving.app:app_from_env", factory=True, workers=settings.workers, **options)
        try:
            _supervisor_class()(config, sockets=[config.bind_socket()]).run()
        except KeyboardInterrupt:
            pass


def _supervisor_class() -> type:
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        """uvicorn's worker supervisor, but SIGHUP reloads the models instead of restarting the workers.

        Restarted workers would start from the state the workers share, not resolve
        ``models:/NAME@ALIAS`` again; so one living worker gets the SIGHUP, reloads every name
        as a single-process server does, and the others take the result from it.
        """

        def handle_hup(self) -> None:
            for process in self.processes:
                if process.pid is not None and process.is_alive(timeout=1):
                    log.info("SIGHUP: worker %s loads every model again and shares the result", process.pid)
                    os.kill(process.pid, signal.SIGHUP)
                    return

    return Supervisor
