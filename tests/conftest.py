"""Shared fixtures: tiny real datasets, built once per test session."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from helpers import fast_train_overrides, serve_process

_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp"}


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny MLPs (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    they gain nothing from intra-op threads, and on a shared 2-core machine those cost 10x."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sklearn digits as PNG class folders: <root>/{train,val,test}/<digit>/<index>.png (32x32 'L')."""
    from pixelmill.data.demo import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root, seed=0, size=32)
    return root


@pytest.fixture(scope="session")
def image_folder_factory() -> Callable[..., Path]:
    """Return ``make(root, classes, size=(32, 32), mode="RGB", fmt="PNG", seed=0) -> root``.

    Writes ``classes[name]`` images per class as ``root/<name>/<i:03d>.<ext>``. Each class
    has its own base colour plus seeded noise, so a model can learn it.
    """

    def make(
        root: str | Path,
        classes: dict[str, int],
        size: tuple[int, int] = (32, 32),
        mode: str = "RGB",
        fmt: str = "PNG",
        seed: int = 0,
    ) -> Path:
        root = Path(root)
        rng = np.random.default_rng(seed)
        width, height = size
        for k, (name, count) in enumerate(classes.items()):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(k * 67 + 30) % 256, (k * 131 + 60) % 256, (k * 29 + 90) % 256], dtype=np.int16)
            for i in range(count):
                noise = rng.integers(-30, 31, size=(height, width, 3), dtype=np.int16)
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert(mode).save(folder / f"{i:03d}{_SUFFIX[fmt.upper()]}", format=fmt)
        return root

    return make


@pytest.fixture(scope="session")
def trained_run(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real finished run directory (small CNN on digits, 3 short epochs, test split evaluated).

    Shared by evaluation, export, predict and serving tests: treat it as read-only.
    """
    from pixelmill.config import load_config
    from pixelmill.training.fit import train

    out = tmp_path_factory.mktemp("trained")
    result = train(load_config(fast_train_overrides(digits_root, out / "runs", "run_name=shared", epochs=3)))
    assert result.status == "finished"
    return result.run_dir


# --- Serving: a real bundle and real `pixelmill serve` processes (tests/serving, tests/reliability). ---


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
    """``with start_server(env={...}, args=(...), model=...) as server:`` a real uvicorn on 127.0.0.1 with those settings."""
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(env: dict[str, str] | None = None, args: tuple[str, ...] = (), model: str | None = None):
        return serve_process(model or str(bundle_dir), log_dir, env, args)

    return start


@pytest.fixture(scope="session")
def digit_files(digits_root: Path) -> list[Path]:
    """Twelve real digit PNGs from the test split, two or more classes."""
    files = sorted((digits_root / "test").rglob("*.png"))
    step = max(1, len(files) // 12)
    return files[::step][:12]


# --- The reliability table: `make reliability` (and `make test`) print case, tried, passed. ---
_RELIABILITY: dict[str, list[bool]] = {}


def pytest_configure(config: pytest.Config) -> None:
    # The suite's scans keep their cache in a folder of their own, not the user's (subprocesses inherit it).
    from pixelmill.caches import SCAN_CACHE_ENV

    os.environ.setdefault(SCAN_CACHE_ENV, tempfile.mkdtemp(prefix="pixelmill-scan-cache-"))
    config.addinivalue_line("markers", "reliability(case): a fault or bad-input case counted in the reliability table")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("reliability")
    if marker is None or report.skipped:
        return
    if report.when == "call" or (report.when == "setup" and report.failed):
        _RELIABILITY.setdefault(marker.args[0], []).append(report.passed)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _RELIABILITY:
        return
    width = max(len(case) for case in _RELIABILITY) + 2
    terminalreporter.section("reliability")
    terminalreporter.write_line(f"{'case':<{width}}{'tried':>6}{'passed':>8}")
    for case, results in sorted(_RELIABILITY.items()):
        terminalreporter.write_line(f"{case:<{width}}{len(results):>6}{sum(results):>8}")
    tried = sum(len(r) for r in _RELIABILITY.values())
    passed = sum(sum(r) for r in _RELIABILITY.values())
    terminalreporter.write_line(f"{'all cases':<{width}}{tried:>6}{passed:>8}")
