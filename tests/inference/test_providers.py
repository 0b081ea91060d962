"""Execution-provider selection: parsing specs, choosing what this onnxruntime has, and real sessions on it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from pixelmill.errors import ConfigError
from pixelmill.export.bundle import read_bundle
from pixelmill.inference import providers
from pixelmill.inference.providers import choose_providers, parse_providers
from pixelmill.tasks import TASKS
from pixelmill.tasks.image_classification.runtime import OnnxClassifier

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"


# --- parse_providers ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [None, "", " ", ",", "cpu", "CPU", "CPUExecutionProvider", "cpuexecutionprovider"])
def test_nothing_or_cpu_means_cpu_only(spec: str | None) -> None:
    assert parse_providers(spec) == [CPU]


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("cuda,cpu", [CUDA, CPU]),
        ("tensorrt,cuda,cpu", [TRT, CUDA, CPU]),
        ("trt, cuda , cpu", [TRT, CUDA, CPU]),
        ("CUDAExecutionProvider,cpu", [CUDA, CPU]),
        ("rocm", ["ROCMExecutionProvider", CPU]),
        ("migraphx", ["MIGraphXExecutionProvider", CPU]),
        ("openvino", ["OpenVINOExecutionProvider", CPU]),
        ("dml", ["DmlExecutionProvider", CPU]),
        ("DirectML", ["DmlExecutionProvider", CPU]),
        ("coreml", ["CoreMLExecutionProvider", CPU]),
        ("qnn", ["QNNExecutionProvider", CPU]),
        ("xnnpack", ["XnnpackExecutionProvider", CPU]),
        ("cann", ["CANNExecutionProvider", CPU]),
        ("azure", ["AzureExecutionProvider", CPU]),
    ],
)
def test_short_and_full_names_map_to_ort_names(spec: str, want: list[str]) -> None:
    assert parse_providers(spec) == want


def test_order_is_kept_case_is_ignored_and_duplicates_dropped() -> None:
    assert parse_providers("CUDA,TensorRT") == [CUDA, TRT, CPU]
    assert parse_providers("cudaexecutionprovider,TRT,cuda") == [CUDA, TRT, CPU]
    assert parse_providers("cpu,cuda") == [CPU, CUDA]  # CPU already there: the user's order stands


def test_cpu_is_appended_when_missing() -> None:
    assert parse_providers("cuda")[-1] == CPU
    assert parse_providers("tensorrt,cuda") == [TRT, CUDA, CPU]


def test_every_provider_name_onnxruntime_knows_is_accepted() -> None:
    for name in ort.get_all_providers():
        assert parse_providers(name)[0] == name
        assert parse_providers(name.upper())[0] == name


@pytest.mark.parametrize("spec", ["cuda,gpu", "tpu", "CUDAExecutionProvide"])
def test_unknown_name_is_a_one_line_config_error(spec: str) -> None:
    bad = [s for s in spec.split(",") if s not in ("cuda",)][0]
    with pytest.raises(ConfigError) as info:
        parse_providers(spec)
    message = str(info.value)
    assert "\n" not in message
    assert f"unknown execution provider '{bad}'" in message
    for short in ("cpu", "cuda", "tensorrt", "trt", "rocm", "openvino", "dml", "coreml"):
        assert short in message


# --- choose_providers ----------------------------------------------------------------------------


def test_choose_keeps_available_ones_in_order() -> None:
    chosen, message = choose_providers([TRT, CUDA, CPU], available=[CPU, CUDA, TRT])
    assert chosen == [TRT, CUDA, CPU]
    assert message is None


def test_choose_drops_missing_ones_and_says_so() -> None:
    chosen, message = choose_providers([CUDA, CPU], available=[CPU])
    assert chosen == [CPU]
    assert message == f"{CUDA} is not in this onnxruntime (it has {CPU}); running on {CPU}"
    chosen, message = choose_providers([TRT, CUDA, CPU], available=[CUDA, CPU])
    assert chosen == [CUDA, CPU]
    assert message is not None and TRT in message and message.endswith(f"running on {CUDA}, {CPU}")
    assert "\n" not in message


def test_choose_falls_back_to_cpu_when_nothing_wanted_is_there() -> None:
    chosen, message = choose_providers([CUDA], available=[CPU])
    assert chosen == [CPU]
    assert message is not None and CUDA in message


def test_choose_asks_the_installed_onnxruntime_by_default() -> None:
    chosen, _ = choose_providers([CUDA, CPU])
    assert chosen == [p for p in (CUDA, CPU) if p in ort.get_available_providers()]


# --- real sessions over the test bundle (this machine runs ONNX Runtime on CPU) ---------------------


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which fallback messages this process logged, so a test sees its own."""
    monkeypatch.setattr(providers, "_logged", set())


@pytest.fixture(scope="module")
def cpu_only_machine() -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the fallback tests need a CPU-only one")


def test_wanting_cuda_on_a_cpu_machine_runs_on_cpu_with_cpu_predictions(
    bundle_dir: Path, digit_files: list[Path], cpu_only_machine: None, fresh_warnings: None
) -> None:
    bundle = read_bundle(bundle_dir)
    cpu = OnnxClassifier(bundle)
    wanted = OnnxClassifier(bundle, providers=[CUDA, CPU])
    assert cpu.providers == [CPU]
    assert wanted.providers == [CPU]
    batch = np.stack([cpu.prepare(f) for f in digit_files])
    np.testing.assert_array_equal(wanted.run(batch), cpu.run(batch))
    assert [p.to_dict() for p in wanted.predict(digit_files, top_k=3)] == [p.to_dict() for p in cpu.predict(digit_files, top_k=3)]


def test_fallback_is_logged_once_per_wanted_list(bundle_dir: Path, cpu_only_machine: None, fresh_warnings: None, caplog: pytest.LogCaptureFixture) -> None:
    bundle = read_bundle(bundle_dir)
    caplog.set_level(logging.WARNING, logger=providers.__name__)
    first = OnnxClassifier(bundle, providers=[CUDA, CPU])
    second = OnnxClassifier(bundle, providers=[CUDA, CPU])
    assert first.providers == second.providers == [CPU]
    records = [r for r in caplog.records if r.name == providers.__name__]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert records[0].getMessage().startswith(f"{CUDA} is not in this onnxruntime")
    assert records[0].getMessage().endswith(f"running on {CPU}")

    OnnxClassifier(bundle, providers=[TRT, CUDA, CPU])  # another wanted list: its own message, once
    OnnxClassifier(bundle, providers=[TRT, CUDA, CPU])
    OnnxClassifier(bundle)  # CPU only: nothing to say
    records = [r for r in caplog.records if r.name == providers.__name__]
    assert len(records) == 2 and TRT in records[1].getMessage()


def test_cpu_only_sessions_log_nothing(bundle_dir: Path, fresh_warnings: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=providers.__name__)
    runtime = OnnxClassifier(read_bundle(bundle_dir), providers=[CPU])
    assert runtime.providers == [CPU]
    assert not [r for r in caplog.records if r.name == providers.__name__]


def test_task_runtime_passes_providers_through(bundle_dir: Path, cpu_only_machine: None, fresh_warnings: None) -> None:
    bundle = read_bundle(bundle_dir)
    runtime = TASKS[bundle.kind].runtime(bundle, intra_op_threads=2, providers=["cuda", "cpu"])  # short names work here too
    assert runtime.providers == [CPU]
    single = runtime.single_threaded()
    assert single is not runtime and single.wanted_providers == ["cuda", "cpu"] and single.providers == [CPU]


def test_unknown_provider_fails_before_opening_a_session(bundle_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown execution provider 'gpu'"):
        OnnxClassifier(read_bundle(bundle_dir), providers=["gpu"])
