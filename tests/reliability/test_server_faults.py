"""Server faults against a real ``pixelmill serve`` (uvicorn on 127.0.0.1): fuzzed requests, a soak,
uploads abandoned mid-body, slow-loris bodies and heads, tampered bundles.

Every test is a row of the reliability table (``make reliability``). Every load is bounded in
count and in time and stops by itself; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Server, clean_env, free_port

BODY_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 2.0
MAX_BODY = 1 << 20
FAULT_ENV = {
    "PIXELMILL_MAX_BODY_BYTES": str(MAX_BODY),
    "PIXELMILL_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "PIXELMILL_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "PIXELMILL_MAX_DELAY_MS": "10",
}
SOAK_SECONDS = float(os.environ.get("PIXELMILL_SOAK_SECONDS", "15"))
SOAK_WARMUP = (5.0, 1500, 20.0)  # at least 5 s and 1,500 answers (allocators and arenas settle), at most 20 s
SOAK_CLIENTS = 32
RSS_GROWTH_LIMIT = 0.10

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS and fds from /proc")


# --- helpers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_server(start_server) -> Iterator[Server]:
    """One server for this module: 1 MiB bodies, 2 s body and head deadlines."""
    with start_server(env=FAULT_ENV) as srv:
        yield srv


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for_fds(pid: int, at_most: int, timeout: float) -> int:
    """Poll until the process holds at most ``at_most`` fds (or ``timeout`` passes); return the last count."""
    deadline = time.monotonic() + timeout
    count = open_fds(pid)
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
        count = open_fds(pid)
    return count


def connect(server: Server) -> socket.socket:
    url = urlparse(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(raw: bytes) -> int | None:
    """The status code of a raw HTTP/1.1 response, or None if there is none."""
    if not raw.startswith(b"HTTP/1.1 "):
        return None
    return int(raw[9:12])


def server_errors(url: str) -> float:
    """Requests the server itself counted with a 5xx status."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "pixelmill_http_requests_total" and sample.labels["status"].startswith("5"):
                total += sample.value
    return total


def v2_binary(bundle_name: str, n: int = 1) -> tuple[str, bytes, dict[str, str]]:
    """A Triton binary-tensor infer request: (path, body, headers)."""
    header = json.dumps({"inputs": [{"name": "image", "shape": [n, 32, 32, 1], "datatype": "UINT8", "parameters": {"binary_data_size": n * 1024}}]})
    return f"/v2/models/{bundle_name}/infer", header.encode() + bytes(n * 1024), {"Inference-Header-Content-Length": str(len(header))}


@dataclass
class Probe:
    """Normal requests sent one after another while something else abuses the server."""

    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextmanager
def normal_traffic(server: Server, png: bytes, pause_s: float = 0.05, limit_s: float = 120.0) -> Iterator[Probe]:
    """A client classifying ``png`` every ``pause_s`` until the block ends (or ``limit_s`` passes).

    The block starts once the first request has been answered, so it runs alongside the whole block.
    """
    probe, stop, first = Probe(), threading.Event(), threading.Event()

    def run() -> None:
        deadline = time.monotonic() + limit_s
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set() and time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    response = http.post("/predict", files=[("files", ("probe.png", png, "image/png"))])
                    probe.statuses[response.status_code] += 1
                    probe.latencies.append(time.perf_counter() - start)
                except httpx.HTTPError as exc:
                    probe.errors.append(repr(exc))
                first.set()
                stop.wait(pause_s)

    thread = threading.Thread(target=run, name="normal-traffic")
    thread.start()
    first.wait(timeout=30)
    try:
        yield probe
    finally:
        stop.set()
        thread.join(timeout=60)


def assert_served_quickly(probe: Probe, at_least: int, within_s: float = 2.0) -> None:
    assert probe.errors == [], probe.errors[:3]
    assert probe.latencies, "no normal request was answered"
    assert set(probe.statuses) == {200}, probe.statuses
    assert sum(probe.statuses.values()) >= at_least, probe.statuses
    assert max(probe.latencies) < within_s, f"slowest normal request took {max(probe.latencies):.2f} s"


# --- generated requests -------------------------------------------------------------------------------


@pytest.mark.reliability("server: 500+ generated requests (schemathesis), no 5xx")
def test_generated_requests_never_get_a_server_error(fault_server: Server, bundle_name: str) -> None:
    """Valid and invalid requests for every operation of the served OpenAPI schema; half of them name the real model.

    Hypothesis drives schemathesis' strategies directly (``schemathesis.pytest.from_fixture``
    crashes under pytest 9), as tests/serving/test_schemathesis.py does.
    """
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{fault_server.url}/openapi.json")
    raw = httpx.get(f"{fault_server.url}/openapi.json").json()
    sent: Counter = Counter()
    for path, item in raw["paths"].items():
        for method, operation in item.items():
            modes = [GenerationMode.POSITIVE]
            if "requestBody" in operation or any(p["in"] == "query" for p in operation.get("parameters", [])):
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                label = f"{method.upper()} {path} {mode.value}"

                @given(case=schema[path][method.upper()].as_strategy(generation_mode=mode), real_model=st.booleans())
                @settings(
                    max_examples=60,
                    deadline=None,  # the CPUs are shared: time is bounded by the request timeout instead
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=list(HealthCheck),
                    database=None,
                )
                def check(case, real_model: bool) -> None:
                    # Past the 404, so the body reaches the parsers; but never unload the model the other requests need.
                    if real_model and case.path_parameters and not path.endswith("/unload"):  # noqa: B023
                        case.path_parameters = {**case.path_parameters, "name": bundle_name}
                        if "version" in case.path_parameters:
                            case.path_parameters["version"] = "1"
                    sent[label] += 1  # noqa: B023 (check() runs inside this iteration)
                    case.call_and_validate(checks=[not_a_server_error], timeout=15)

                check()
    total = sum(sent.values())
    print(f"\nschemathesis: {total} requests over {len(sent)} operation/mode pairs: {dict(sent)}")
    assert total >= 500, sent
    assert server_errors(fault_server.url) == 0
    assert not [r for r in fault_server.log_records() if r.get("level") == "error"]


# --- soak -------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """``clients`` threads, each sending ``send(http, i)`` in a loop until ``stop_at`` (which may be moved)."""

    url: str
    clients: int
    send: Callable[[httpx.Client, int], httpx.Response]
    stop_at: float
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"load-{i}") for i in range(self.clients)]
        for t in self._threads:
            t.start()

    def answered(self) -> int:
        with self._lock:
            return sum(self.statuses.values())

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=max(1.0, self.stop_at - time.monotonic()) + 60)
        assert not any(t.is_alive() for t in self._threads), "a load client did not stop"

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while time.monotonic() < self.stop_at:
                try:
                    status = self.send(http, i).status_code
                    with self._lock:
                        self.statuses[status] += 1
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(repr(exc))


def _mixed_requests(digit_files: list[Path], bundle_name: str) -> Callable[[httpx.Client, int], httpx.Response]:
    """Client ``i`` sends one of four kinds: multipart, base64 JSON, v2 binary, v2 JSON."""
    png = digit_files[0].read_bytes()
    b64 = base64.b64encode(digit_files[1].read_bytes()).decode()
    v2_path, v2_body, v2_headers = v2_binary(bundle_name)
    v2_json = {"inputs": [{"name": "image", "shape": [1, 32, 32, 1], "datatype": "UINT8", "data": [7] * 1024}]}
    kinds = [
        lambda http: http.post("/predict", files=[("files", ("d.png", png, "image/png"))]),
        lambda http: http.post("/predict", json={"instances": [b64]}),
        lambda http: http.post(v2_path, content=v2_body, headers=v2_headers),
        lambda http: http.post(v2_path, json=v2_json),
    ]
    return lambda http, i: kinds[i % len(kinds)](http)


@pytest.mark.slow
@pytest.mark.reliability("server: soak at 32 clients, zero errors, RSS growth < 10%")
def test_soak_32_clients_zero_errors_and_flat_memory(fault_server: Server, digit_files: list[Path], bundle_name: str) -> None:
    """32 concurrent clients for PIXELMILL_SOAK_SECONDS after a warm-up; RSS is read before and after."""
    warm_s, warm_answers, warm_max_s = SOAK_WARMUP
    start = time.monotonic()
    load = Load(fault_server.url, SOAK_CLIENTS, _mixed_requests(digit_files, bundle_name), stop_at=start + warm_max_s + SOAK_SECONDS)
    load.start()
    while time.monotonic() < start + warm_max_s and not (time.monotonic() >= start + warm_s and load.answered() >= warm_answers):
        time.sleep(0.1)
    rss_before, warm_requests, warmed = rss_mib(fault_server.proc.pid), load.answered(), time.monotonic() - start
    load.stop_at = time.monotonic() + SOAK_SECONDS
    load.join()
    rss_after = rss_mib(fault_server.proc.pid)
    soaked = sum(load.statuses.values()) - warm_requests
    growth = rss_after / rss_before - 1.0
    print(
        f"\nsoak: {SOAK_CLIENTS} clients, {SOAK_SECONDS:g} s after a {warmed:.1f} s warm-up ({warm_requests} requests): "
        f"{soaked} requests ({soaked / SOAK_SECONDS:.0f}/s), {len(load.failures)} errors, "
        f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB ({growth:+.1%})"
    )
    assert load.failures == [], load.failures[:5]
    assert set(load.statuses) == {200}, load.statuses
    assert soaked >= SOAK_CLIENTS * 2, load.statuses
    assert growth < RSS_GROWTH_LIMIT
    assert server_errors(fault_server.url) == 0


# --- clients that hang up mid-upload ---------------------------------------------------------------------


def _half_uploads(server: Server, png: bytes, bundle_name: str) -> list[tuple[bytes, bytes]]:
    """(head, first half of the body) of three kinds of upload that declare ~800 kB (under the 1 MiB limit)."""
    size = 800_000
    boundary = "pixelmill-abandon"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
    multipart = part + png + b"\x00" * (size - len(part) - len(png))
    as_json = b'{"instances": ["' + b"A" * (size - 20) + b'"]}'
    v2_path, v2_body, v2_headers = v2_binary(bundle_name, n=size // 1024 - 1)
    bodies = [
        ("/predict", multipart, {"Content-Type": f"multipart/form-data; boundary={boundary}"}),
        ("/predict", as_json, {"Content-Type": "application/json"}),
        (v2_path, v2_body, {"Content-Type": "application/json", **v2_headers}),
    ]
    return [(head("POST", path, {**headers, "Content-Length": str(len(body))}), body[: len(body) // 2]) for path, body, headers in bodies]


def _abandon(server: Server, uploads: list[tuple[bytes, bytes]], count: int, offset: int, pause_s: float = 0.0) -> None:
    """``count`` connections that each send a head and half the body, then close."""
    for i in range(count):
        start, half = uploads[(offset + i) % len(uploads)]
        with connect(server) as sock:
            sock.sendall(start + half)
        time.sleep(pause_s)


@pytest.mark.reliability("server: 200 uploads abandoned mid-body, no leak, others served")
def test_uploads_abandoned_mid_body_leak_nothing_and_block_no_one(fault_server: Server, digit_files: list[Path], bundle_name: str) -> None:
    png = digit_files[0].read_bytes()
    uploads = _half_uploads(fault_server, png, bundle_name)
    pid = fault_server.proc.pid
    records_before = len(fault_server.log_records())
    _abandon(fault_server, uploads, 30, 0)  # warm-up: buffers and parsers reach their steady size
    time.sleep(0.5)
    rss_before, fds_before = rss_mib(pid), open_fds(pid)
    threads, per_thread = 4, 50
    start = time.perf_counter()
    with normal_traffic(fault_server, png, pause_s=0.0) as probe:
        probe_before = sum(probe.statuses.values())
        abusers = [threading.Thread(target=_abandon, args=(fault_server, uploads, per_thread, k, 0.05)) for k in range(threads)]
        for t in abusers:
            t.start()
        for t in abusers:
            t.join(timeout=120)
        elapsed = time.perf_counter() - start
        during = sum(probe.statuses.values()) - probe_before
    assert not any(t.is_alive() for t in abusers)
    fds_after = wait_for_fds(pid, fds_before + 2, timeout=5)
    rss_after = rss_mib(pid)
    abandoned = 30 + threads * per_thread
    deadline = time.monotonic() + 5
    while True:  # the last hang-ups may still be on their way into the log
        records = fault_server.log_records()[records_before:]
        closed = [r for r in records if r.get("message") == "request" and r.get("status") == 499]
        if len(closed) >= abandoned or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    growth = rss_after / rss_before - 1.0
    print(
        f"\nabandoned uploads: {abandoned} ({threads * per_thread} in {elapsed:.1f} s from {threads} threads, "
        f"{threads * per_thread * len(uploads[0][1]) / 2**20:.0f} MiB half-bodies); logged as 499: {len(closed)}; "
        f"RSS {rss_before:.1f} -> {rss_after:.1f} MiB ({growth:+.1%}); fds {fds_before} -> {fds_after}; "
        f"normal requests meanwhile: {during}, slowest {max(probe.latencies, default=0) * 1000:.0f} ms"
    )
    assert_served_quickly(probe, at_least=1)
    assert during >= 3, f"only {during} normal requests were answered during {elapsed:.1f} s of abuse"
    assert growth < RSS_GROWTH_LIMIT
    assert fds_after <= fds_before + 2
    # A hang-up is the client's doing: 499 in the log, never a 5xx or a traceback.
    assert len(closed) == abandoned
    assert not [r for r in records if r.get("level") == "error" or r.get("outcome") == "error"]
    assert server_errors(fault_server.url) == 0


# --- slow loris ------------------------------------------------------------------------------------------


@dataclass
class SlowClient:
    sock: socket.socket
    opened: float
    drip: bytes
    answer: bytes = b""
    closed_after: float | None = None


def _drip_until_closed(clients: list[SlowClient], interval_s: float, limit_s: float) -> None:
    """Send each client's next byte every ``interval_s`` and read whatever comes back, until every
    connection is closed by the server (or ``limit_s`` passes)."""
    deadline = time.monotonic() + limit_s
    open_ = {c.sock: c for c in clients}
    next_drip = time.monotonic()
    while open_ and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_drip:
            for c in list(open_.values()):
                try:
                    c.sock.send(c.drip)
                except OSError:
                    pass  # closed by the server; the read below notices
            next_drip = now + interval_s
        readable, _, _ = select.select(list(open_), [], [], max(0.0, min(next_drip, deadline) - time.monotonic()))
        for sock in readable:
            c = open_[sock]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            c.answer += data
            if not data:
                c.closed_after = time.monotonic() - c.opened
                del open_[sock]
    for c in clients:
        c.sock.close()


@pytest.mark.reliability("server: slow-loris bodies get 408 at the body deadline, others served")
def test_slow_bodies_get_408_at_the_deadline_without_blocking_others(fault_server: Server, digit_files: list[Path], bundle_name: str) -> None:
    """16 clients send a declared 1,000-byte body at 4 bytes/s: each gets 408 and a closed connection after ~2 s."""
    png = digit_files[0].read_bytes()
    pid = fault_server.proc.pid
    v2_path = f"/v2/models/{bundle_name}/infer"
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="slow.png"\r\nContent-Type: image/png\r\n\r\n'
    targets = [  # (path, headers, the body's first bytes): valid so far, so only the clock can stop them
        ("/predict", {"Content-Type": "multipart/form-data; boundary=b"}, part),
        ("/predict", {"Content-Type": "application/json"}, b'{"instances": ["'),
        (v2_path, {"Content-Type": "application/json"}, b'{"inputs": [{"name": "image", "data": ['),
        ("/nope", {"Content-Type": "application/json"}, b""),  # a 404 that never reads the body: the next head's deadline closes it
    ]
    fds_before = open_fds(pid)
    clients = []
    with normal_traffic(fault_server, png) as probe:
        for i in range(16):
            path, headers, prefix = targets[i % len(targets)]
            sock = connect(fault_server)
            sock.sendall(head("POST", path, {**headers, "Content-Length": "1000"}) + prefix)
            clients.append(SlowClient(sock, time.monotonic(), b"1" if path == v2_path else b"A"))
        time.sleep(0.5)
        fds_held = open_fds(pid)
        _drip_until_closed(clients, interval_s=0.25, limit_s=BODY_TIMEOUT_S + HEADER_TIMEOUT_S + 10)
    fds_after = wait_for_fds(pid, fds_before + 2, timeout=5)
    statuses = Counter(status_of(c.answer) for c in clients)
    closed = [c.closed_after for c in clients if c.closed_after is not None]
    print(
        f"\nslow bodies: 16 connections at 4 B/s; answers {dict(statuses)}; closed after "
        f"{min(closed):.2f}-{max(closed):.2f} s; server fds {fds_before} -> {fds_held} (held) -> {fds_after}; "
        f"normal requests meanwhile: {sum(probe.statuses.values())}, slowest {max(probe.latencies, default=0) * 1000:.0f} ms"
    )
    assert len(closed) == len(clients), "a slow connection was still open when the test gave up"
    for i, c in enumerate(clients):
        path = targets[i % len(targets)][0]
        if path == "/nope":  # answered 404 at once; closed once the head deadline of the next request passes
            assert status_of(c.answer) == 404 and HEADER_TIMEOUT_S - 0.1 < c.closed_after < HEADER_TIMEOUT_S + 1.5
        else:
            assert status_of(c.answer) == 408, c.answer[:300]
            assert b'"error": "request body not received within 2 s' in c.answer
            assert BODY_TIMEOUT_S - 0.1 < c.closed_after < BODY_TIMEOUT_S + 1.5
    assert fds_held >= fds_before + 16
    assert fds_after <= fds_before + 2
    assert_served_quickly(probe, at_least=10)
    assert server_errors(fault_server.url) == 0


@pytest.mark.reliability("server: slow-loris heads closed at the head deadline, others served")
def test_silent_or_trickling_connections_are_closed_at_the_head_deadline(fault_server: Server, digit_files: list[Path]) -> None:
    """Silent connections, heads sent a byte at a time, and bodies trickled after a 413: all closed after ~2 s."""
    png = digit_files[0].read_bytes()
    pid = fault_server.proc.pid
    fds_before = open_fds(pid)
    clients = []
    with normal_traffic(fault_server, png) as probe:
        for i in range(12):
            sock = connect(fault_server)
            kind = i % 3
            if kind == 0:  # connects and says nothing
                clients.append(SlowClient(sock, time.monotonic(), b""))
            elif kind == 1:  # a head that never ends
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                clients.append(SlowClient(sock, time.monotonic(), b"X"))
            else:  # refused with 413 at once, then keeps trickling the body nobody reads
                sock.sendall(head("POST", "/predict", {"Content-Type": "application/json", "Content-Length": str(10 * MAX_BODY)}))
                clients.append(SlowClient(sock, time.monotonic(), b"y"))
        time.sleep(0.5)
        fds_held = open_fds(pid)
        _drip_until_closed(clients, interval_s=0.25, limit_s=HEADER_TIMEOUT_S + 10)
    fds_after = wait_for_fds(pid, fds_before + 2, timeout=5)
    closed = [c.closed_after for c in clients if c.closed_after is not None]
    print(
        f"\nslow heads: 12 connections (silent, 4 B/s head, 4 B/s after a 413); closed after "
        f"{min(closed):.2f}-{max(closed):.2f} s; server fds {fds_before} -> {fds_held} (held) -> {fds_after}; "
        f"normal requests meanwhile: {sum(probe.statuses.values())}, slowest {max(probe.latencies, default=0) * 1000:.0f} ms"
    )
    assert len(closed) == len(clients), "a slow connection was still open when the test gave up"
    assert all(HEADER_TIMEOUT_S - 0.1 < t < HEADER_TIMEOUT_S + 1.5 for t in closed), closed
    assert [status_of(c.answer) for c in clients[2::3]] == [413] * 4
    assert all(c.answer == b"" for c in clients[0::3] + clients[1::3])
    assert fds_held >= fds_before + 12
    assert fds_after <= fds_before + 2
    assert_served_quickly(probe, at_least=10)


# --- tampered bundles ------------------------------------------------------------------------------------


def _tamper(bundle: Path, how: str) -> None:
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    if how == "one byte flipped":
        data[len(data) // 2] ^= 0x01
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "bytes appended":
        data += b"\x00" * 16
    elif how == "zeroed, same size":
        data = bytearray(len(data))
    elif how == "hash in bundle.json edited":
        meta = json.loads((bundle / "bundle.json").read_text())
        meta["files"]["model.onnx"] = "0" * 64
        (bundle / "bundle.json").write_text(json.dumps(meta))
        return
    model.write_bytes(bytes(data))


@pytest.mark.reliability("server: tampered bundle refused at start by sha256, exit 2, one line")
@pytest.mark.parametrize("how", ["one byte flipped", "truncated", "bytes appended", "zeroed, same size", "hash in bundle.json edited"])
def test_tampered_bundle_is_refused_at_start(bundle_dir: Path, tmp_path: Path, how: str) -> None:
    bundle = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    _tamper(bundle, how)
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "pixelmill.cli", "serve", str(bundle), "--port", str(port)],
        capture_output=True, text=True, timeout=120, env=clean_env({}),
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1, lines
    expected = "bundle.json was edited after export" if how == "hash in bundle.json edited" else "model.onnx is tampered"
    assert lines[0].startswith("error:") and expected in lines[0], lines[0]
    with socket.socket() as sock:  # refused before binding: the port is still free
        sock.bind(("127.0.0.1", port))
