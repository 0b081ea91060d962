"""A private PostgreSQL server for the scale-out tests: its own cluster in a temporary folder on 127.0.0.1.

Hand-written, not pytest-postgresql: that plugin runs ``pg_ctl`` as the test process's own user,
and PostgreSQL refuses to run as root, which is how these tests run on our machines and in CI.
Here the server runs as an unprivileged user (``nobody``) when the tests are root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from helpers import free_port, stop_process_group

SERVER_USER = "nobody"  # exists on every Debian/Ubuntu system; needs no useradd


def _bin_dir() -> Path | None:
    """The PostgreSQL server's binaries: on PATH, else the newest of Debian's /usr/lib/postgresql/<major>/bin (off PATH)."""
    on_path = [Path(found).resolve().parent] if (found := shutil.which("initdb")) else []
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    for folder in [*on_path, *map(Path, reversed(debian))]:
        if all((folder / name).is_file() for name in ("initdb", "postgres", "pg_isready")):
            return folder
    return None


def _as_server_user() -> dict:
    """Popen arguments that drop root to SERVER_USER (initdb and postgres refuse to run as root)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(SERVER_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "env": {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8"}}


@dataclass
class Postgres:
    """A running private server; ``database(name)`` makes an empty database and gives its URL."""

    port: int
    user: str = "postgres"
    host: str = "127.0.0.1"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def database(self, name: str) -> str:
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction.
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _wait_ready(bin_dir: Path, proc: subprocess.Popen, port: int, log: Path, timeout_s: float = 60) -> None:
    """Until ``pg_isready`` answers 0 (accepting connections); fail early if the server exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        ready = subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"], check=False)
        if ready.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"postgres did not accept connections within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL cluster on 127.0.0.1 (trust auth, user ``postgres``), removed after the session."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres, pg_isready) not found: `make postgres` installs Debian's postgresql")
    # Not under pytest's basetemp: that folder is private to root, and the server runs as SERVER_USER.
    root = Path(tempfile.mkdtemp(prefix="pixelmill-pg-"))
    drop = _as_server_user()
    if drop:
        os.chown(root, drop["user"], drop["group"])
    data, log = root / "data", root / "server.log"
    proc = None
    try:
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"],
            capture_output=True, text=True, check=False, **drop,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"unix_socket_directories={root}", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **drop,
            )
        _wait_ready(bin_dir, proc, port, log)
        yield Postgres(port=port)
    finally:
        if proc is not None:
            stop_process_group(proc, signal.SIGINT)  # postgres: fast shutdown
        shutil.rmtree(root, ignore_errors=True)
