"""Several workers, one repository: a change made through one worker is served by every worker, a replaced worker too.

Each keep-alive client below is attached to a known worker process (its connection's socket is
found in the worker's open files), so every assertion says what one worker answers.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _worker_of(client: httpx.Client, server_pid: int, port: int) -> int | None:
    """The worker process holding the server side of ``client``'s one connection."""
    answer = client.get("/v2/health/live")  # opens the connection, which the client keeps
    client_port = answer.extensions["network_stream"].get_extra_info("socket").getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, inode = line.split()[1], line.split()[2], line.split()[9]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
            return next((w for w in _children(server_pid) if inode in _socket_inodes(w)), None)
    return None


def _clients_per_worker(url: str, server_pid: int, wanted: int, exclude: set[int] = frozenset()) -> dict[int, httpx.Client]:
    """Open keep-alive clients until ``wanted`` workers (not in ``exclude``) each hold one."""
    port = int(url.rsplit(":", 1)[1])
    found: dict[int, httpx.Client] = {}
    deadline = time.monotonic() + 60
    while len(found) < wanted:
        assert time.monotonic() < deadline, f"connections reached workers {sorted(found)} only"
        client = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1))
        worker = _worker_of(client, server_pid, port)
        if worker is None or worker in found or worker in exclude:
            client.close()
            continue
        found[worker] = client
    return found


def _versions(client: httpx.Client) -> list[str]:
    return [row["version"] for row in client.post("/v2/repository/index").json() if row["name"] == "other"]


def _files(digit_files: list[Path]) -> list:
    return [("files", (f.name, f.read_bytes(), "image/png")) for f in digit_files[:2]]


def test_a_change_through_one_worker_is_served_by_every_worker(start_server, bundle_dir: Path, digit_files: list[Path]) -> None:
    args = (f"other:7={bundle_dir}", f"other:8={bundle_dir}", "--workers", "2")
    with start_server(model=f"other:6={bundle_dir}", args=args) as srv:
        first, second = _clients_per_worker(srv.url, srv.proc.pid, 2).values()
        assert _versions(first) == _versions(second) == ["6", "7", "8"]

        unloaded = first.post("/v2/repository/models/other/unload", json={"parameters": {"version": "8"}})
        assert unloaded.status_code == 200 and unloaded.json()["workers"] == 2, unloaded.text
        assert _versions(second) == ["6", "7"]  # at once: the answer came after every worker had it
        assert second.post("/models/other/versions/8/predict", files=_files(digit_files)).status_code == 404

        loaded = second.post("/v2/repository/models/other/load")
        assert loaded.status_code == 200 and loaded.json()["loaded"] == ["8"], loaded.text
        assert _versions(first) == ["6", "7", "8"]
        assert first.post("/models/other/versions/8/predict", files=_files(digit_files)).headers["X-Model-Version"] == "8"

        split = first.post("/v2/repository/models/other/traffic", json={"weights": {"7": 50, "8": 50}})
        assert split.status_code == 200, split.text
        assert second.get("/v2/repository/models/other/traffic").json()["weights"] == {"7": 50.0, "8": 50.0}
        served = {second.post("/models/other/predict", files=_files(digit_files), headers={"X-Client-Id": f"c{i}"}).headers["X-Model-Version"] for i in range(40)}
        assert served == {"7", "8"}
        # A refused change changes no worker.
        refused = second.post("/v2/repository/models/other/unload", json={"parameters": {"version": "8"}})
        assert refused.status_code == 409 and _versions(first) == ["6", "7", "8"]

        # A worker that dies is replaced; the new one serves what the others serve, not its SPECs.
        workers = _clients_per_worker(srv.url, srv.proc.pid, 2)
        dead, _ = next(iter(workers.items()))
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(_children(srv.proc.pid) - {dead}) < 2:
            assert time.monotonic() < deadline, "uvicorn did not replace the killed worker"
            time.sleep(0.1)
        (fresh_pid, fresh), = _clients_per_worker(srv.url, srv.proc.pid, 1, exclude=set(workers)).items()
        deadline = time.monotonic() + 60
        while fresh.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the new worker never got ready"
            time.sleep(0.1)
        assert _versions(fresh) == ["6", "7", "8"]
        assert fresh.get("/v2/repository/models/other/traffic").json()["weights"] == {"7": 50.0, "8": 50.0}
        for client in (first, second, fresh, *workers.values()):
            client.close()
