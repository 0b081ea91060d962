"""The serving process itself: no torch, several workers, models:/ URIs, start-up errors, clean shutdown."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pixelmill.export.bundle import write_bundle
from pixelmill.serving.settings import available_cpus


def _mapped_torch_libraries(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if "torch" in line.split()[-1]})


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _predict_once(url: str, image: Path) -> httpx.Response:
    return httpx.post(f"{url}/predict", files=[("files", (image.name, image.read_bytes(), "image/png"))], timeout=30)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_the_server_process_never_loads_torch(server, client: httpx.Client, digit_files: list[Path], bundle_name: str) -> None:
    assert _predict_once(server.url, digit_files[0]).status_code == 200
    tensor = {"name": "image", "shape": [1, 32, 32, 1], "datatype": "UINT8", "data": [0] * 1024}
    assert client.post(f"/v2/models/{bundle_name}/infer", json={"inputs": [tensor]}).status_code == 200
    assert client.get("/metrics").status_code == 200
    assert any("onnxruntime" in line for line in Path(f"/proc/{server.proc.pid}/maps").read_text().splitlines())
    assert _mapped_torch_libraries(server.proc.pid) == []


def test_serving_modules_import_no_torch() -> None:
    code = (
        "import sys\n"
        "from pixelmill.serving.app import create_app\n"
        "from pixelmill.serving.server import serve\n"
        "from pixelmill.serving.settings import ServeSettings\n"
        "create_app(ServeSettings(model='unused')).openapi()\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_several_workers_share_the_cpus(start_server, digit_files: list[Path]) -> None:
    with start_server(args=("--workers", "2")) as srv:
        for _ in range(4):
            assert _predict_once(srv.url, digit_files[0]).status_code == 200
        workers = _children(srv.proc.pid)
        assert len(workers) >= 2
        for pid in [srv.proc.pid, *workers]:
            assert _mapped_torch_libraries(pid) == []
        samples = [s for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics").text) for s in f.samples]
        info = next(s.labels for s in samples if s.name == "pixelmill_model_info")
        assert info["ort_intra_threads"] == str(max(1, available_cpus() // 2))


@pytest.mark.slow
def test_serves_a_registered_model_by_uri(start_server, trained_run: Path, bundle_dir: Path, tmp_path: Path) -> None:
    from pixelmill.model_registry import register

    run_copy = tmp_path / "run"
    shutil.copytree(trained_run, run_copy)  # the shared run stays read-only
    shutil.copytree(bundle_dir, run_copy / "bundle")
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    info = register(run_copy, "served-digits", tracking_uri=store, artifact_location=str(tmp_path / "artifacts"))
    env = {"PIXELMILL_CACHE_DIR": str(tmp_path / "cache")}
    with start_server(model=f"models:/served-digits/{info.version}", args=("--tracking-uri", store), env=env) as srv:
        model = httpx.get(f"{srv.url}/model").json()
        assert model["sha256"] == json.loads((bundle_dir / "bundle.json").read_text())["files"]["model.onnx"]


def _serve_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PIXELMILL_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "pixelmill.cli", "serve", *args], capture_output=True, text=True, timeout=120, env=full_env)


def test_bad_model_or_settings_fail_in_one_line_before_binding(bundle_dir: Path, tmp_path: Path) -> None:
    missing = _serve_cli(str(tmp_path / "nope"), "--port", "1")
    assert missing.returncode == 2 and "error:" in missing.stderr and "Traceback" not in missing.stderr

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(data))
    result = _serve_cli(str(tampered), "--port", "1")
    assert result.returncode == 2 and "tampered" in result.stderr and "Traceback" not in result.stderr

    other = tmp_path / "other-kind"  # a consistent bundle of a kind this server cannot run (image and tabular it can)
    shutil.copytree(bundle_dir, other)
    meta = json.loads((other / "bundle.json").read_text())
    write_bundle(other, {k: v for k, v in meta.items() if k not in ("files", "meta_sha256")} | {"kind": "audio"}, ["model.onnx"])
    result = _serve_cli(str(other), "--port", "1")
    assert result.returncode == 2 and "serves bundles of kind image, multilabel, tabular" in result.stderr

    bad = _serve_cli(str(bundle_dir), env={"PIXELMILL_MAX_BATCH_SIZE": "0"})
    assert bad.returncode == 2 and "PIXELMILL_MAX_BATCH_SIZE" in bad.stderr


def test_sigint_shuts_down_cleanly(start_server, digit_files: list[Path]) -> None:
    with start_server() as srv:
        assert _predict_once(srv.url, digit_files[0]).status_code == 200
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(timeout=20) == 0
    assert "Application shutdown complete" in srv.log_path.read_text()
