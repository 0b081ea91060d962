"""Claim: ``pixelmill serve`` comes close to in-process ONNX Runtime and far outruns ``mlflow models serve``.

One bundle (small CNN at 224 px, briefly trained and exported). Clients send one JPEG photo
(224x224, already at the model's size, as a serving client would) per request to
``POST /predict`` as multipart, from 1, 8 and 32 concurrent connections (aiohttp, keep-alive,
in this process), for a fixed time each; dynamic batching on (the defaults: up to 32 images,
5 ms) and off (``PIXELMILL_MAX_BATCH_SIZE=1``).

- The limit: the same bundle in-process (``OnnxClassifier``): decode the same JPEG bytes,
  prepare, run in batches of 32 - everything the server does per image but HTTP.
- MLflow: the same run registered with ``pixelmill registry register`` and served by
  ``mlflow models serve -m models:/NAME/1 --env-manager local``. Its ONNX flavour takes
  tensors, not image files, so each request carries the already-prepared (1, 224, 224, 3)
  uint8 tensor as JSON ``{"inputs": {"image": ...}}`` - the client does the decoding for it.

All load goes to 127.0.0.1, bounded in time and request count; servers are stopped at the end.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, header, parse_args, pixelmill_bin, quiet  # noqa: E402
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


def in_process_limit(bundle: Path, images: list[bytes], seconds: float) -> float:
    """Images/s of decode + prepare + ``OnnxClassifier.run`` in batches of 32, no HTTP."""
    from PIL import Image

    from pixelmill.export.bundle import read_bundle
    from pixelmill.tasks.image_classification.runtime import OnnxClassifier

    clf = OnnxClassifier(read_bundle(bundle))
    batch = [images[i % len(images)] for i in range(32)]

    def one_batch() -> None:
        clf.run(np.stack([clf.prepare(Image.open(io.BytesIO(b))) for b in batch]))

    one_batch()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one_batch()
        done += len(batch)
    return done / (time.perf_counter() - start)


class Server:
    """A server subprocess on 127.0.0.1, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, cmd: list[str], ready_url: str, env: dict[str, str] | None = None, timeout: float = 120.0):
        self.cmd, self.ready_url, self.timeout = cmd, ready_url, timeout
        self.env = {**os.environ, **(env or {})}
        self.log = tempfile.TemporaryFile()

    def __enter__(self) -> Server:
        import httpx

        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
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
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
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


def pixelmill_levels(report: Report, bundle: Path, images: list[bytes], levels: list[int], seconds: float, batching: bool) -> dict[int, float]:
    port = free_port()
    env = {} if batching else {"PIXELMILL_MAX_BATCH_SIZE": "1", "PIXELMILL_MAX_DELAY_MS": "0"}
    env["PIXELMILL_LOG_LEVEL"] = "warning"
    cmd = [pixelmill_bin(), "serve", str(bundle), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    label = f"pixelmill serve, batching {'on' if batching else 'off'}"

    def body(i: int) -> dict:
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("files", images[i % len(images)], filename=f"{i}.jpg", content_type="image/jpeg")
        return {"data": form}

    out = {}
    with Server(cmd, f"{url}/v2/health/ready", env) as server:
        report.figure(f"{label}: start to ready", server.ready_s, "s")
        for clients in levels:
            out[clients] = load(report, label, f"{url}/predict", body, clients, seconds, max_requests=20_000)
    return out


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
        top = max(levels)
        report.ratio(f"serving {top} clients: pixelmill serve requests/s / in-process images/s", on[top] / limit, 0.7)
    report.finish(args.json)


if __name__ == "__main__":
    main()
