"""Which ONNX Runtime execution providers a pixelmill session runs on (torch-free).

A provider spec is a comma-separated list of names in order of preference, short
(``cuda``, ``trt``, ``cpu``) or full ONNX Runtime names (``CUDAExecutionProvider``),
case-insensitive: ``"tensorrt,cuda,cpu"``. :func:`parse_providers` turns it into full
names, always ending with a CPU fallback; :func:`choose_providers` keeps those the
installed onnxruntime has. When a wanted provider is missing, the session opener logs
one warning per process for that wanted list (:func:`warn_once`), not one per session.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable

from pixelmill.errors import ConfigError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"

SHORT_NAMES: dict[str, str] = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "cann": "CANNExecutionProvider",
    "azure": "AzureExecutionProvider",
}

_logged: set[tuple[str, ...]] = set()  # wanted lists whose fallback message this process already logged
_logged_lock = threading.Lock()


def _ort_provider_names() -> list[str]:
    """Every provider name the installed onnxruntime knows (built in or not)."""
    import onnxruntime as ort

    return list(ort.get_all_providers())


def _names() -> dict[str, str]:
    """lower-case name -> full provider name: the short names, every full name, and ``dnnl`` for ``DnnlExecutionProvider``."""
    full = [*SHORT_NAMES.values(), *_ort_provider_names()]
    names = {name.lower(): name for name in full}
    for name in full:
        names.setdefault(name.lower().removesuffix("executionprovider"), name)
    return names | SHORT_NAMES


def _short_names(names: dict[str, str]) -> list[str]:
    return sorted(key for key in names if not key.endswith("executionprovider"))


def normalize_providers(names: Iterable[str]) -> list[str]:
    """Short or full names (any case) -> full ONNX Runtime names in the same order, duplicates dropped, CPU last if missing.

    ConfigError naming an unknown name and listing the valid short names.
    """
    known = _names()
    out: list[str] = []
    for raw in names:
        name = str(raw).strip()
        if not name:
            continue
        full = known.get(name.lower())
        if full is None:
            raise ConfigError(
                f"unknown execution provider '{name}'; valid names: {', '.join(_short_names(known))} "
                f"(or a full ONNX Runtime name such as CUDAExecutionProvider)"
            )
        if full not in out:
            out.append(full)
    if CPU not in out:
        out.append(CPU)  # ONNX Runtime needs a provider every node can run on
    return out


def parse_providers(spec: str | None) -> list[str]:
    """``"cuda,cpu"`` -> ``["CUDAExecutionProvider", "CPUExecutionProvider"]``; None or empty -> CPU only.

    Names are short (``cuda``, ``trt``) or full ONNX Runtime names, case-insensitive, in order
    of preference; CPU is appended last when missing. ConfigError on an unknown name.
    """
    return normalize_providers((spec or "").split(","))


def choose_providers(wanted: list[str], available: list[str] | None = None) -> tuple[list[str], str | None]:
    """(the ``wanted`` providers this onnxruntime has, in order; a one-line message when any was dropped, else None).

    ``available`` defaults to ``onnxruntime.get_available_providers()``. When none of the
    wanted providers is available, CPU is chosen.
    """
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    chosen = [name for name in wanted if name in available]
    dropped = [name for name in wanted if name not in available]
    if not chosen:
        chosen = [CPU]
    if not dropped:
        return chosen, None
    verb = "is" if len(dropped) == 1 else "are"
    message = (
        f"{', '.join(dropped)} {verb} not in this onnxruntime (it has {', '.join(available) or 'none'}); "
        f"running on {', '.join(chosen)}"
    )
    return chosen, message


def warn_once(wanted: Iterable[str], message: str | None) -> bool:
    """Log ``message`` as a warning unless one was already logged for this ``wanted`` list; True when logged."""
    if not message:
        return False
    key = tuple(wanted)
    with _logged_lock:
        if key in _logged:
            return False
        _logged.add(key)
    log.warning(message)
    return True
