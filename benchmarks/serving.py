"""Claim: ``pixelmill serve`` comes close to in-process ONNX Runtime and far outruns ``mlflow models serve``.

One bundle (small CNN at 224 px, briefly trained and exported). Clients send one JPEG photo
(224x224, already at the model's size, as a serving client would) per request to
``POST /predict`` as multipart, from 1, 8 and 32 concurrent connections (aiohttp, keep-alive,
in this process), for a fixed time each; dynamic batching on (the defaults: up to 32 images,
5 ms) and off (``PIXELMILL_MAX_BATCH_SIZE=1``).

- The limit: the same bundle in-process (``OnnxClassifier``): decode the same JPEG bytes,
  prepare, run in batches of 32 - everything the server does per image but HTTP. The ceiling:
  the same in as many processes as CPUs at once, one ONNX Runtime thread each (the layout that
  wastes the least): no server can answer more images per second on this machine.
- MLflow: the same run registered with ``pixelmill registry register`` and served by
  ``mlflow models serve -m models:/NAME/1 --env-manager local``. Its ONNX flavour takes
  tensors, not image files, so each request carries the already-prepared (1, 224, 224, 3)
  uint8 tensor as JSON ``{"inputs": {"image": ...}}`` - the client does the decoding for it.

- LitServe (``benchmarks/_litserve_peer.py``, the ``bench`` extra): the same bundle behind
  ``litserve.LitServer``, doing the same work per request (the multipart upload decoded and
  prepared by pixelmill's own ``decode_image``, top-k JSON) with the same batching (32
  images, 5 ms). Each runs as its user would on this CPU: ``pixelmill serve --workers N``
  (N = available CPUs, one ONNX Runtime thread each, as the README recommends), and LitServe
  in its default layout (one inference worker, ONNX Runtime on all CPUs) and with N inference
  workers of one thread each. They run side by side at 32 clients and take turns in rounds;
  those not being measured are paused (SIGSTOP), so none pays for another's idle work
  (LitServe's batching loop polls its queue every millisecond). The claim is the median
  round's ratio to the faster LitServe of that round. The full run repeats the comparison
  with the small CNN at 64 px (no target), where inference is cheap and each server's own
  work per request (HTTP, multipart, batching, answers) decides.
- Memory: RSS of the ``pixelmill serve`` process and its children serving the bundle once,
  and under four names (``pixelmill serve a=BUNDLE b=BUNDLE c=BUNDLE d=BUNDLE``), each model
  warmed up with a few requests first.

All load goes to 127.0.0.1, bounded in time and request count; servers are stopped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, header, interleave, median, parse_args, pixelmill_bin, quiet  # noqa: E402
from _fixtures import cached_bundle, train_and_export  # noqa: E402
from _photos import photo_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payloads(size: int, n: int = 16) -> list[bytes]:
    """``n`` different photos as size x size JPEG bytes."""
    from PIL import Image

    out = []
    for p in sorted(photo_dir(64).rglob("*.jpg"))[:n]:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _warm_runner(bundle: Path, images: list[bytes], threads: int | None = None):
    """``run(seconds)`` -> images/s of decode + prepare + ``OnnxClassifier.run`` in batches of 32, no HTTP (warmed up)."""
    from PIL import Image

    from pixelmill.export.bundle import read_bundle
    from pixelmill.tasks.image_classification.runtime import OnnxClassifier

    clf = OnnxClassifier(read_bundle(bundle), intra_op_threads=threads)
    batch = [images[i % len(images)] for i in range(32)]

    def one_batch() -> None:
        clf.run(np.stack([clf.prepare(Image.open(io.BytesIO(b))) for b in batch]))

    def run(seconds: float) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            one_batch()
            done += len(batch)
        return done / (time.perf_counter() - start)

    one_batch()
    return run


def in_process_limit(bundle: Path, images: list[bytes], seconds: float) -> float:
    """Images/s of decode + prepare + ``OnnxClassifier.run`` in batches of 32, no HTTP."""
    return _warm_runner(bundle, images)(seconds)


def _ceiling_process(bundle: Path, images: list[bytes], conn) -> None:
    """A ceiling process: warm up, then per request ``seconds`` of :func:`in_process_limit`'s loop on one thread."""
    run = _warm_runner(bundle, images, threads=1)
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        conn.send(run(seconds))


@contextlib.contextmanager
def in_process_ceiling(bundle: Path, images: list[bytes], processes: int):
    """``measure(seconds)``: images/s of ``processes`` processes at once, each decoding, preparing and running batches
    of 32 on one ONNX Runtime thread: the most any server could answer on this CPU (one thread per core wastes least)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(processes)]
    procs = [ctx.Process(target=_ceiling_process, args=(bundle, images, child), daemon=True) for _, child in pipes]
    for proc in procs:
        proc.start()
    for conn, _ in pipes:
        assert conn.recv() == "ready"

    def measure(seconds: float) -> float:
        for conn, _ in pipes:
            conn.send(seconds)
        return sum(conn.recv() for conn, _ in pipes)

    try:
        yield measure
    finally:
        for conn, _ in pipes:
            conn.send(None)
        for proc in procs:
            proc.join(timeout=30)


def tree_rss(pid: int) -> int:
    """Bytes of RSS of process ``pid`` and all its descendants (pages that forked processes share count in each)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Server:
    """A server subprocess on 127.0.0.1, stopped (SIGTERM, then SIGKILL) on exit.

    ``group=True`` starts it in a process group of its own: :meth:`pause` and :meth:`resume`
    then stop and continue all its processes, and whatever of the group outlives the server
    process is killed on exit.
    """

    def __init__(self, cmd: list[str], ready_url: str, env: dict[str, str] | None = None, timeout: float = 120.0, group: bool = False):
        self.cmd, self.ready_url, self.timeout, self.group = cmd, ready_url, timeout, group
        self.env = {**os.environ, **(env or {})}
        self.log = tempfile.TemporaryFile()

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def rss(self) -> int:
        """Bytes of RSS of the server process and its children."""
        return tree_rss(self.proc.pid)

    def __enter__(self) -> Server:
        import httpx

        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=self.group)
        start = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.cmd[:3]} exited: {self.log.read().decode(errors='replace')[-800:]}")
            if time.perf_counter() - start > self.timeout:
                self.__exit__()
                raise RuntimeError(f"{self.cmd[:3]} not ready after {self.timeout:.0f} s")
            try:
                if httpx.get(self.ready_url, timeout=2.0).status_code == 200:
                    self.ready_s = time.perf_counter() - start
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.group:
            try:
                self.resume()
            except ProcessLookupError:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.group:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its children, had any outlived it
            except ProcessLookupError:
                pass
        self.log.close()


async def _load(url: str, make_body, clients: int, seconds: float, max_requests: int) -> tuple[int, float, list[float]]:
    """(requests, elapsed seconds, latencies) of ``clients`` connections posting back to back."""
    import aiohttp

    latencies: list[float] = []
    failures: list[str] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < stop and len(latencies) < max_requests and not failures:
                kwargs = make_body(i)
                t0 = time.perf_counter()
                async with session.post(url, **kwargs) as resp:
                    await resp.read()
                    if resp.status != 200:
                        failures.append(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                        return
                latencies.append(time.perf_counter() - t0)
                i += clients

        for i in range(min(clients, 4)):  # warm-up: connections, first-request paths
            async with session.post(url, **make_body(i)) as resp:
                await resp.read()
        start = time.perf_counter()
        stop = start + seconds
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(failures[0])
    return len(latencies), elapsed, latencies


def load(report: Report, label: str, url: str, make_body, clients: int, seconds: float, max_requests: int) -> float:
    """Run one load level; record requests/s and p50/p99 latency; return requests/s."""
    n, elapsed, lat = asyncio.run(_load(url, make_body, clients, seconds, max_requests))
    rps = n / elapsed
    p50, p99 = np.percentile(lat, 50) * 1000, np.percentile(lat, 99) * 1000
    report.figure(f"{label}, {clients} clients", rps, "requests/s", p50_ms=round(float(p50), 1), p99_ms=round(float(p99), 1), requests=n)
    return rps


def multipart(images: list[bytes]):
    """Request ``i``'s body: image ``i`` (round robin) as a multipart file in the field ``files``, as ``/predict`` takes it."""

    def body(i: int) -> dict:
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("files", images[i % len(images)], filename=f"{i}.jpg", content_type="image/jpeg")
        return {"data": form}

    return body


def pixelmill_levels(report: Report, bundle: Path, images: list[bytes], levels: list[int], seconds: float, batching: bool) -> dict[int, float]:
    port = free_port()
    env = {} if batching else {"PIXELMILL_MAX_BATCH_SIZE": "1", "PIXELMILL_MAX_DELAY_MS": "0"}
    env["PIXELMILL_LOG_LEVEL"] = "warning"
    cmd = [pixelmill_bin(), "serve", str(bundle), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    label = f"pixelmill serve, batching {'on' if batching else 'off'}"
    out = {}
    with Server(cmd, f"{url}/v2/health/ready", env) as server:
        report.figure(f"{label}: start to ready", server.ready_s, "s")
        for clients in levels:
            out[clients] = load(report, label, f"{url}/predict", multipart(images), clients, seconds, max_requests=20_000)
    return out


CEILING = "no-HTTP ceiling"


def litserve_level(
    report: Report, bundle: Path, images: list[bytes], clients: int, seconds: float, rounds: int, target: float | None = 1.2, label: str = ""
) -> float | None:
    """Median over ``rounds`` of pixelmill serve / LitServe requests/s at ``clients`` connections; None without LitServe.

    Each server runs in both layouts its user could pick on this CPU: one process with ONNX
    Runtime on every CPU (pixelmill's default; LitServe's default of one inference worker), and N
    processes of one ONNX Runtime thread each (N = the available CPUs: ``pixelmill serve
    --workers N``; LitServe ``workers_per_device=N``); each round's ratio is the faster pixelmill
    over the faster LitServe. The no-HTTP ceiling (:func:`in_process_ceiling`) takes its turn in
    the same rounds: the ceiling over the faster LitServe is the most any server could lead by.
    Every server runs the whole time; after an unrecorded warm-up each side gets ``seconds`` of
    load per round (the order alternates) while the others are paused.
    """
    try:
        import litserve  # noqa: F401
    except ImportError:
        report.note("LitServe is not installed (pip install -e '.[bench]'): the LitServe comparison did not run")
        return None
    from pixelmill.serving.settings import available_cpus

    workers = available_cpus()
    peer = str(Path(__file__).resolve().with_name("_litserve_peer.py"))
    commands = {  # name -> (command for a port, readiness path)
        "pixelmill serve": (lambda port: [pixelmill_bin(), "serve", str(bundle), "--port", str(port)], "/v2/health/ready"),
        "LitServe": (lambda port: [sys.executable, peer, str(bundle), str(port)], "/health"),
    }
    if workers > 1:
        commands[f"pixelmill serve --workers {workers}"] = (
            lambda port: [pixelmill_bin(), "serve", str(bundle), "--port", str(port), "--workers", str(workers)], "/v2/health/ready"
        )
        commands[f"LitServe, {workers} workers"] = (lambda port: [sys.executable, peer, str(bundle), str(port), str(workers)], "/health")
    body = multipart(images)
    latencies: dict[str, list[float]] = {name: [] for name in commands}
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, (command, ready) in commands.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            server = stack.enter_context(Server(command(port), url + ready, {"PIXELMILL_LOG_LEVEL": "warning"}, group=True))
            report.figure(f"{name}: start to ready", server.ready_s, "s")
            server.pause()
            servers[name] = (server, f"{url}/predict")

        def side(name: str, duration: float):
            def measure() -> list[float]:
                server, url = servers[name]
                server.resume()
                try:
                    n, elapsed, lat = asyncio.run(_load(url, body, clients, duration, max_requests=20_000))
                finally:
                    server.pause()
                latencies[name] += lat
                return [n / elapsed]

            return measure

        for name in servers:  # unrecorded: full batches once, so every session has grown its buffers to 32 images
            side(name, min(seconds, 1.0))()
            latencies[name].clear()
        sides = {name: side(name, seconds) for name in servers}
        ceiling = stack.enter_context(in_process_ceiling(bundle, images, workers))
        sides[CEILING] = lambda: [ceiling(seconds)]
        rps = interleave(sides, rounds)
        for name, (server, _) in servers.items():
            report.figure(f"{name}: RSS after the rounds, all its processes", server.rss() / 2**20, "MiB")
    for side_name, values in rps.items():
        lat = np.asarray(latencies.get(side_name) or [0.0]) * 1000
        report.figure(
            f"{side_name}{label} (alternating with the others), {clients} clients", median(values), "images/s" if side_name == CEILING else "requests/s",
            p50_ms=round(float(np.percentile(lat, 50)), 1), p99_ms=round(float(np.percentile(lat, 99)), 1), rounds=rounds, per_round="/".join(f"{v:.0f}" for v in values),
        )

    def best(prefix: str) -> list[float]:
        return [max(round_) for round_ in zip(*(values for name, values in rps.items() if name.startswith(prefix)))]

    ratios = [pm / ls for pm, ls in zip(best("pixelmill"), best("LitServe"))]
    report.figure(
        f"serving {clients} clients{label}: the no-HTTP ceiling / the faster LitServe (the most any server could lead by, median round)",
        median([c / ls for c, ls in zip(rps[CEILING], best("LitServe"))]), "x",
        note=f"ceiling: {workers} processes at once, one ONNX Runtime thread each, decode + prepare + run, batches of 32",
    )
    name = f"serving {clients} clients{label}: pixelmill / LitServe requests/s (median round)"
    note = f"per round {min(ratios):.2f}-{max(ratios):.2f}; each side's faster layout of the round; same bundle, work and batching (32 images, 5 ms)"
    if target is None:
        report.figure(name, median(ratios), "x", note=note)
    else:
        report.ratio(name, median(ratios), target, note=note)
    return median(ratios)


def memory_per_model(report: Report, bundle: Path, images: list[bytes], warmup: int = 4) -> None:
    """RSS of ``pixelmill serve`` (process and children) serving the bundle once, then under four names."""
    import httpx

    names = ["a", "b", "c", "d"]
    rss = {}
    for count, specs, routes in (
        (1, [str(bundle)], ["/predict"]),
        (4, [f"{name}={bundle}" for name in names], [f"/models/{name}/predict" for name in names]),
    ):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [pixelmill_bin(), "serve", *specs, "--port", str(port)]
        try:
            with Server(cmd, f"{url}/v2/health/ready", {"PIXELMILL_LOG_LEVEL": "warning"}, timeout=60) as server:
                with httpx.Client(timeout=30) as client:
                    for route in routes:
                        for i in range(warmup):
                            resp = client.post(f"{url}{route}", files={"files": (f"{i}.jpg", images[i % len(images)], "image/jpeg")})
                            if resp.status_code != 200:
                                raise RuntimeError(f"POST {route}: HTTP {resp.status_code}: {resp.text[:200]}")
                rss[count] = server.rss() / 2**20
        except RuntimeError as exc:
            report.note(f"`pixelmill serve` with {count} model(s) ({' '.join(['pixelmill', 'serve', *(s.replace(str(bundle), 'BUNDLE') for s in specs)])}) "
                        f"did not serve: {str(exc).splitlines()[-1][:300]}; no memory row")
            return
        report.figure(f"`pixelmill serve` RSS, {count} model{'s' if count > 1 else ''}, after {warmup} requests to each", rss[count], "MiB")
    report.figure("`pixelmill serve` RSS per model beyond the first", (rss[4] - rss[1]) / 3, "MiB")
    report.figure("`pixelmill serve` RSS, 4 models / 1 model (4 single-model servers: 4)", rss[4] / rss[1], "x")


def mlflow_level(report: Report, bundle: Path, images: list[bytes], work: Path, clients: int, seconds: float) -> float:
    """requests/s of ``mlflow models serve`` on the same run, registered in a throw-away store."""
    from PIL import Image

    from pixelmill.export.bundle import read_bundle
    from pixelmill.inference import prepare_image

    b = read_bundle(bundle)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    subprocess.run(
        [pixelmill_bin(), "registry", "register", b.meta["run"]["run_dir"], "--name", "bench", "--tracking-uri", uri,
         "--artifact-location", str(work / "mlartifacts")],
        check=True, capture_output=True,
    )
    bodies = []
    for raw in images[:4]:
        arr = prepare_image(Image.open(io.BytesIO(raw)), b.preprocessing)[None]  # (1, H, W, C) uint8
        bodies.append(json.dumps({"inputs": {b.input_name: arr.tolist()}}).encode())
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", "models:/bench/1", "--env-manager", "local",
           "-p", str(port), "-h", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}"
    # MLflow starts `uvicorn` by name: the venv's bin/ must be on PATH.
    env = {"MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with Server(cmd, f"{url}/ping", env, timeout=180) as server:
        report.figure("mlflow models serve: start to ready", server.ready_s, "s")
        headers = {"Content-Type": "application/json"}
        return load(report, "mlflow models serve (JSON tensor)", f"{url}/invocations",
                    lambda i: {"data": bodies[i % len(bodies)], "headers": headers}, clients, seconds, max_requests=5_000)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    header("serving", args.quick)
    quiet()
    report = Report("serving", args.quick)
    with tempfile.TemporaryDirectory(prefix="pixelmill-bench-serve-") as tmp:
        work = Path(tmp)
        if args.quick:
            bundle, levels, seconds = cached_bundle("small_cnn", 64), [1, 8], 1.0
        else:
            bundle, levels, seconds = train_and_export("small_cnn", 224, work, args.overrides), [1, 8, 32], 8.0
        from pixelmill.export.bundle import read_bundle

        size = read_bundle(bundle).preprocessing.size
        images = payloads(size)
        limit = in_process_limit(bundle, images, seconds)
        report.figure("in-process ONNX Runtime (decode + prepare + run, batches of 32)", limit, "images/s")
        on = pixelmill_levels(report, bundle, images, levels, seconds, batching=True)
        if not args.quick:
            pixelmill_levels(report, bundle, images, levels, seconds, batching=False)
            mlflow = mlflow_level(report, bundle, images, work, 32, seconds)
            report.ratio("serving 32 clients: pixelmill / mlflow models serve requests/s", on[32] / mlflow, 5.0)
        litserve_level(report, bundle, images, 32, 1.0 if args.quick else 4.0, rounds=2 if args.quick else 4)
        if not args.quick:
            # The same at 64 px, where inference is cheap and the servers' own work per request shows (no target).
            small = cached_bundle("small_cnn", 64)
            litserve_level(report, small, payloads(64), 32, 4.0, rounds=4, target=None, label=" at 64 px")
        memory_per_model(report, bundle, images)
        top = max(levels)
        report.ratio(f"serving {top} clients: pixelmill serve requests/s / in-process images/s", on[top] / limit, 0.7)
    report.finish(args.json)


if __name__ == "__main__":
    main()
