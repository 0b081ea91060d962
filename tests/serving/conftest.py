"""Serving fixtures: a real bundle exported from the shared run, and real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

# The limits every test of the shared server relies on (small, so tests can cross them cheaply).
LIMITS = {
    "PIXELMILL_MAX_BODY_BYTES": str(1 << 20),
    "PIXELMILL_MAX_PIXELS": "1000000",
    "PIXELMILL_MAX_FILES": "8",
    "PIXELMILL_MAX_INFER_BATCH": "64",
    "PIXELMILL_MAX_BATCH_SIZE": "32",
    "PIXELMILL_MAX_DELAY_MS": "10",
}


@dataclass
class Server:
    """A running ``pixelmill serve`` process."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_records(self) -> list[dict]:
        """The JSON lines the server wrote so far."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return records


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_") or k == "PIXELMILL_CACHE_DIR"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def serve_process(model: str, log_dir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Iterator[Server]:
    """Start ``python -m pixelmill.cli serve MODEL`` on a free port; wait until ready; stop it at the end."""
    port = _free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "pixelmill.cli", "serve", model, "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_clean_env(env or {}))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v2/health/live", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start within 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Server(url=url, proc=proc, log_path=log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def bundle_dir(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real ``pixelmill export`` of the shared run (the run dir itself stays untouched)."""
    from pixelmill.export import export_run

    return export_run(trained_run, out=tmp_path_factory.mktemp("serving-bundle") / "bundle").path


@pytest.fixture(scope="session")
def bundle_name(bundle_dir: Path) -> str:
    return json.loads((bundle_dir / "bundle.json").read_text())["name"]


@pytest.fixture(scope="session")
def start_server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., object]:
    """``with start_server(env={...}, args=(...), model=...) as server:`` for tests that need their own settings."""
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(env: dict[str, str] | None = None, args: tuple[str, ...] = (), model: str | None = None):
        return serve_process(model or str(bundle_dir), log_dir, env, args)

    return start


@pytest.fixture(scope="session")
def server(start_server) -> Iterator[Server]:
    """The shared server: no token, no rate limit, the small LIMITS above."""
    with start_server(env=LIMITS) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="session")
def digit_files(digits_root: Path) -> list[Path]:
    """Twelve real digit PNGs from the test split, two or more classes."""
    files = sorted((digits_root / "test").rglob("*.png"))
    step = max(1, len(files) // 12)
    return files[::step][:12]
