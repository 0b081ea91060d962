"""TorchScript export of the uint8 NHWC wrapper, and a runner over the saved file."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pixelmill.export.onnx import UInt8Classifier


def export_torchscript(wrapper: UInt8Classifier, path: Path, sample: torch.Tensor) -> None:
    """Trace ``wrapper`` (uint8 NHWC in, probabilities out) and save it as ``model.pt``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper.eval(), (sample,), check_trace=False)
        traced = torch.jit.freeze(traced)
        torch.jit.save(traced, str(path))


def torchscript_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, C) uint8 -> (N, num_classes) float32 through the saved TorchScript module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in favour of torch.export; it still loads
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))).numpy().astype(np.float32)

    return run
