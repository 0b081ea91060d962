"""ONNX export: the uint8 NHWC wrapper graph, ``torch.onnx.export``, int8 quantisation, an ORT runner."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pixelmill.data.preprocess import Preprocessing

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


class UInt8Classifier(nn.Module):
    """The network as serving sees it: uint8 NHWC pixels in, the task's head activation out.

    Normalisation lives inside the graph so no client can get mean/std wrong; ``activation``
    is the task's (single-label: softmax over classes).
    """

    def __init__(self, net: nn.Module, prep: Preprocessing, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.net = net.eval()
        self.activation = activation
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (N, H, W, C) uint8 -> (N, C, H, W) float
        x = (x - self.mean) / self.std
        return self.activation(self.net(x))  # (N, num_classes)


def export_onnx(wrapper: UInt8Classifier, path: Path, sample: torch.Tensor, opset: int = OPSET) -> None:
    """Write ``wrapper`` as a single-file ONNX graph with a dynamic batch axis.

    Uses the TorchScript-based exporter (``dynamo=False``): stable for plain CNNs and
    quiet; the dynamo exporter is not needed for these graphs.
    """
    import onnx

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper.eval(),
            (sample,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation (weights int8, activations quantised on the fly)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.stem + ".pre.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns on the root logger about the uint8 input it leaves alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            source = pre
        except Exception as exc:  # pre-processing only helps; quantise the raw graph without it
            log.debug("quantisation pre-processing skipped: %s", exc)
            source = src
        try:
            quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
            pre.unlink(missing_ok=True)


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, C) uint8 -> (N, num_classes) float32 through ONNX Runtime on CPU."""
    from pixelmill.inference.session import open_onnx_file

    session = open_onnx_file(path)
    return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.uint8)})[0]
