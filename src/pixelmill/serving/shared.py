"""The repository state that the worker processes of one server share (``pixelmill serve --workers N``).

A request reaches one worker. A change to what is served (load, unload, a traffic split) is made
by the worker that got it, under a lock on a directory the server's workers share; that worker
then writes the repository's new state there (every name's SPECs, and each version's bundle
path and model hash, default version, weights, shadow, unloaded names) under the next
generation number, and answers once every living sibling has applied it. Each worker watches
the state and applies a newer generation as it appears (the same bundles, verified again); a
worker that starts later (uvicorn replaces one that died) starts from it, not from its SPECs.

Why a directory and polling rather than a library: the workers are siblings under uvicorn's
supervisor with no channel between them. A state file replaced atomically, ``filelock``'s lock
and one ``stat()`` every 50 ms per worker need no broker process, lose nothing when a worker
dies, and let a new worker read the whole state at once (a message bus would replay a log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import anyio
from filelock import FileLock

from pixelmill.runs import pid_alive, write_atomic

log = logging.getLogger(__name__)

STATE_DIR_ENV = "PIXELMILL_SERVE_STATE_DIR"  # set by `pixelmill serve` for its workers, never by a user
POLL_S = 0.05
LOCK_TIMEOUT_S = 300.0  # a load downloads, verifies and warms up: the next change may wait that long
ACK_TIMEOUT_S = 120.0


class SharedState:
    """One worker's view of the shared directory: ``state.json``, ``lock``, ``workers/PID`` and ``acks/PID``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.pid = os.getpid()
        self.state_file = self.folder / "state.json"
        self._seen: tuple[int, int] | None = None
        for sub in ("workers", "acks"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)

    # --- this worker ----------------------------------------------------------------------------

    def join(self) -> None:
        (self.folder / "workers" / str(self.pid)).touch()

    def leave(self) -> None:
        for sub in ("workers", "acks"):
            (self.folder / sub / str(self.pid)).unlink(missing_ok=True)

    def ack(self, generation: int, error: str = "") -> None:
        """Tell the siblings this worker serves ``generation`` (or failed to, and why)."""
        _write_json(self.folder / "acks" / str(self.pid), {"generation": generation, "error": error})

    # --- the state ------------------------------------------------------------------------------

    @asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the directory's lock: one change at a time across the server's workers.

        A new ``FileLock`` each time: its own open file, so two changes in one worker exclude
        each other too, and it may be taken in a worker thread and released in the event loop.
        """
        lock = FileLock(str(self.folder / "lock"), timeout=LOCK_TIMEOUT_S, thread_local=False)
        await anyio.to_thread.run_sync(lock.acquire)
        try:
            yield
        finally:
            lock.release()

    def read(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def publish(self, state: dict[str, Any], generation: int) -> None:
        """Replace the state (hold :meth:`locked`)."""
        _write_json(self.state_file, {**state, "generation": generation})

    def changed(self) -> bool:
        """True when the state file was replaced since the last call (one ``stat``)."""
        try:
            stat = self.state_file.stat()
        except FileNotFoundError:
            return False
        key = (stat.st_ino, stat.st_mtime_ns)
        if key == self._seen:
            return False
        self._seen = key
        return True

    # --- the siblings ---------------------------------------------------------------------------

    def siblings(self) -> list[int]:
        """The other living workers of this server."""
        out = []
        for entry in (self.folder / "workers").iterdir():
            pid = int(entry.name)
            if pid == self.pid:
                continue
            if _alive(pid):
                out.append(pid)
            else:  # died without leaving (SIGKILL, a crash): uvicorn starts another, which joins itself
                entry.unlink(missing_ok=True)
                (self.folder / "acks" / entry.name).unlink(missing_ok=True)
        return out

    async def confirmed(self, generation: int) -> dict[str, Any]:
        """Wait until every living sibling serves ``generation``; what each said (applied, failed: why, pending)."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            pending, failed = [], {}
            living = self.siblings()
            for pid in living:
                try:
                    ack = json.loads((self.folder / "acks" / str(pid)).read_text())
                except (FileNotFoundError, ValueError):
                    ack = {"generation": -1}
                if ack["generation"] < generation:
                    pending.append(pid)
                elif ack.get("error"):
                    failed[str(pid)] = ack["error"]
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        for pid, error in failed.items():
            log.error("worker %s could not apply repository generation %d: %s", pid, generation, error)
        if pending:
            log.error("workers %s did not apply repository generation %d within %.0f s", ", ".join(map(str, pending)), generation, ACK_TIMEOUT_S)
        return {"workers": 1 + len(living), "failed": failed, "pending": pending}


def _alive(pid: int) -> bool:
    if not pid_alive(pid):
        return False
    try:  # a worker that died but is not reaped yet is a zombie: not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data))
