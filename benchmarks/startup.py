"""Claim: the CLI starts fast, and a serving process is far lighter than anything importing torch.

- ``pixelmill --help``: wall time of the whole process (median of several runs).
- A config error (``pixelmill train trainer.max_epoch=3``, ``data.path=/nonexistent``): wall time
  until the one-line answer and exit code 2; the config is checked before torch loads.
- ``pixelmill serve BUNDLE``: time from process start until ``/v2/health/ready`` answers 200,
  and the server's resident memory (VmRSS) once ready and after a few predictions.
- The comparison: ``python -c "import torch"`` - its wall time and peak resident memory.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, header, median, parse_args, pixelmill_bin, quiet  # noqa: E402
from _fixtures import cached_bundle, train_and_export  # noqa: E402


def run_timed(cmd: list[str], expect: int = 0) -> tuple[float, int]:
    """(wall seconds, peak RSS in bytes) of one process run to completion with exit code ``expect``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != expect:
        raise RuntimeError(f"{cmd} exited with {proc.returncode}")
    return seconds, usage.ru_maxrss * 1024


def rss(pid: int) -> int:
    """Resident memory of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_bytes() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def serve_once(bundle: Path, timeout: float = 60.0) -> tuple[float, int, int]:
    """(seconds to ready, RSS when ready, RSS after 20 predictions) of one ``pixelmill serve``."""
    import httpx

    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([pixelmill_bin(), "serve", str(bundle), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=5.0) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"pixelmill serve exited: {proc.stderr.read().decode()[-500:]}")
                if time.perf_counter() - start > timeout:
                    raise RuntimeError("pixelmill serve not ready in time")
                try:
                    if client.get(f"{url}/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.02)
            ready = time.perf_counter() - start
            ready_rss = rss(proc.pid)
            image = jpeg_bytes()
            for _ in range(20):
                client.post(f"{url}/predict", files={"files": ("x.jpg", image, "image/jpeg")}).raise_for_status()
            busy_rss = rss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return ready, ready_rss, busy_rss


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    header("startup", args.quick)
    quiet()
    report = Report("startup", args.quick)
    runs = 2 if args.quick else 7
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pixelmill-bench-startup-") as tmp:
        bundle = cached_bundle("small_cnn", 64) if args.quick else train_and_export("small_cnn", 224, Path(tmp), args.overrides)
        help_s, torch_s, torch_rss, serve = [], [], [], []
        config_errors: dict[str, list[float]] = {"trainer.max_epoch=3": [], "data.path=/nonexistent": []}
        run_timed([pixelmill_bin(), "--help"])  # warm the OS file cache for both sides
        run_timed([sys.executable, "-c", "import torch"])
        run_timed([pixelmill_bin(), "train", "trainer.max_epoch=3"], expect=2)
        for _ in range(runs):
            help_s.append(run_timed([pixelmill_bin(), "--help"])[0])
            for override, times in config_errors.items():
                times.append(run_timed([pixelmill_bin(), "train", override], expect=2)[0])
            t, m = run_timed([sys.executable, "-c", "import torch"])
            torch_s.append(t)
            torch_rss.append(m)
        for _ in range(1 if args.quick else 3):
            serve.append(serve_once(bundle))
    report.figure("`pixelmill --help` wall time", median(help_s), "s")
    for override, times in config_errors.items():
        report.figure(f"config error `{override}` wall time", median(times), "s")
    report.figure('`python -c "import torch"` wall time', median(torch_s), "s")
    report.figure('`python -c "import torch"` peak RSS', median(torch_rss) / 2**20, "MiB")
    report.figure("`pixelmill serve`: start to /v2/health/ready", median([s[0] for s in serve]), "s")
    report.figure("`pixelmill serve`: RSS when ready", median([s[1] for s in serve]) / 2**20, "MiB")
    report.figure("`pixelmill serve`: RSS after 20 predictions", median([s[2] for s in serve]) / 2**20, "MiB")
    serve_rss = median([s[2] for s in serve])
    report.ratio("startup `pixelmill --help` wall time / 0.5 s budget", median(help_s) / 0.5, 1.0, higher_is_better=False)
    worst_error = max(median(times) for times in config_errors.values())
    report.ratio("startup config error wall time / 1 s budget", worst_error / 1.0, 1.0, higher_is_better=False, note="the slower of the two errors")
    report.ratio("startup serve RSS / import-torch RSS", serve_rss / median(torch_rss), 0.5, higher_is_better=False)
    report.finish(args.json)


if __name__ == "__main__":
    main()
