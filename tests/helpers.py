"""Plain helpers shared by test modules (importable: tests/ is on pytest's pythonpath)."""

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


def _quick_cpu_run(output_dir: Path, epochs: int) -> list[str]:
    """The small CNN at 32x32, batches of 32, deterministic, quiet, CSV-tracked, in ``output_dir``."""
    return [
        "data.image_size=32",
        "data.batch_size=32",
        f"trainer.max_epochs={epochs}",
        "trainer.progress_bar=false",
        "trainer.deterministic=true",
        "optim.lr=0.003",
        "logger=[csv]",
        f"output_dir={output_dir}",
    ]


def fast_train_overrides(data_path: Path, output_dir: Path, *extra: str, epochs: int = 2) -> list[str]:
    """Overrides for a quick deterministic CPU run of the small CNN on 32x32 grayscale digits."""
    return [
        f"data.path={data_path}",
        "model.in_chans=1",
        "trainer.limit_train_batches=8",
        "trainer.limit_val_batches=2",
        *_quick_cpu_run(output_dir, epochs),
        *extra,
    ]


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
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the last line, still being written
                    pass
        return records

    def wait_for_log(self, done: Callable[[list[dict]], bool], timeout_s: float = 30.0) -> list[dict]:
        """The log records once ``done(records)`` holds (the server logs a request after answering it), or at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = self.log_records()
            if done(records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without PIXELMILL_* settings (but the cache dirs), plus ``extra``."""
    from pixelmill.caches import IMAGE_CACHE_ENV, LEGACY_CACHE_ENV, MODEL_CACHE_ENV, SCAN_CACHE_ENV

    keep = {IMAGE_CACHE_ENV, MODEL_CACHE_ENV, LEGACY_CACHE_ENV, SCAN_CACHE_ENV}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_") or k in keep}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@contextmanager
def serve_process(model: str, log_dir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Iterator[Server]:
    """Start ``python -m pixelmill.cli serve MODEL`` on a free 127.0.0.1 port; wait until live; stop it at the end."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "pixelmill.cli", "serve", model, "--port", str(port), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env(env or {}))
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


def multilabel_overrides(manifest: Path, output_dir: Path, *extra: str, epochs: int = 2) -> list[str]:
    """A quick deterministic CPU run of the small CNN on 32x32 multidigits canvases."""
    return ["data.kind=multilabel", f"data.path={manifest}", *_quick_cpu_run(output_dir, epochs), *extra]


def _open_together(barrier, url: str) -> None:
    import optuna

    from pixelmill.tuning import _open_study

    barrier.wait()
    _open_study(url, "race", "maximize", optuna.pruners.NopPruner(), heartbeat=30)


def assert_two_workers_open_one_new_study(url: str) -> None:
    """Two forked workers race to create the tables of a new study at ``url``; both must open it, and there is one study."""
    import multiprocessing

    import optuna

    fork = multiprocessing.get_context("fork")
    barrier = fork.Barrier(2)
    workers = [fork.Process(target=_open_together, args=(barrier, url)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0], f"{url}: a worker could not open the new study"
    assert len(optuna.get_all_study_summaries(url)) == 1


def stop_process_group(proc: subprocess.Popen, first: int = signal.SIGTERM) -> None:
    """Send ``first`` to the process group (a server and its workers), wait up to 30 s, then SIGKILL what is left."""
    import contextlib

    if proc.poll() is None:
        os.killpg(proc.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
