"""ONNX export: the uint8 NHWC wrapper graph, ``torch.onnx.export``, int8 quantisation (static and dynamic), an ORT runner."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pixelmill.data.preprocess import Preprocessing
from pixelmill.errors import ConfigError, DataError
from pixelmill.export import CALIBRATION_METHODS, DEFAULT_CALIBRATION_METHOD

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


def export_onnx(wrapper: nn.Module, path: Path, sample: torch.Tensor, opset: int = OPSET, outputs: Sequence[str] = (OUTPUT_NAME,)) -> None:
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
            output_names=list(outputs),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)


_CALIBRATION_BATCH = 16  # images per calibration forward pass
_WEIGHTED_OPS = ("Gemm", "MatMul", "Conv")  # the last of them is the classifier: it and all after it stay float


@contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """ONNX Runtime's quantiser warns on the root logger (the uint8 input it leaves alone,
    pre-processing advice) and prints calibration progress; none of it is the user's business."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _pre_process(src: Path, dst: Path) -> Path:
    """ONNX Runtime's ``quant_pre_process`` (graph optimisation, shape inference) into ``dst``;
    ``src`` itself when it fails: pre-processing only helps."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return dst
    except Exception as exc:
        log.debug("quantisation pre-processing skipped: %s", exc)
        return src


def quantize_int8(src: Path, dst: Path) -> dict[str, Any]:
    """Dynamic int8 quantisation (weights int8, activations quantised on the fly); returns its settings."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre = dst.with_name(dst.stem + ".pre.onnx")
    with _quiet_quantiser():
        try:
            quantize_dynamic(str(_pre_process(src, pre)), str(dst), weight_type=QuantType.QInt8)
        finally:
            pre.unlink(missing_ok=True)
    return {"mode": "dynamic", "weights": "int8"}


def _float_head(path: Path) -> list[str]:
    """Names of the nodes kept float: the last layer with weights (the classifier: a Linear, or a
    1x1 convolution in a few networks) and every node after it.

    The head turns logits into probabilities (softmax, a temperature, per-label sigmoids); in
    uint8 its outputs would move in steps of 1/255, visible in every probability and in the
    decisions made at thresholds. It is a sliver of the compute.
    """
    import onnx

    nodes = list(onnx.load(str(path), load_external_data=False).graph.node)  # topologically sorted
    last = max((i for i, node in enumerate(nodes) if node.op_type in _WEIGHTED_OPS), default=len(nodes))
    return [node.name for node in nodes[last:]]


def quantize_static_int8(src: Path, dst: Path, images: np.ndarray, method: str = DEFAULT_CALIBRATION_METHOD) -> dict[str, Any]:
    """Static int8 quantisation in QDQ form, calibrated on ``images`` ((N, H, W, C) uint8, the graph's input).

    Weights int8 per output channel, activations uint8 with ranges measured by running the float
    graph over ``images`` (``method``: a key of ``CALIBRATION_METHODS``). ONNX Runtime fuses the
    QDQ pairs into integer kernels (QLinearConv), so activations stay int8 between layers - the
    speed-up over dynamic quantisation, which re-quantises every activation at run time. The
    classifier head stays float (``_float_head``). Returns the settings for bundle.json.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"invalid calibration method '{method}'; only {', '.join(CALIBRATION_METHODS)} are supported")
    if len(images) == 0:
        raise DataError("int8 calibration needs at least one image")

    class Batches(CalibrationDataReader):
        """The calibration images in batches; ``set_range`` hands the calibrator one batch at a
        time (``CalibStridedMinMax``), so it holds one batch's activations, not all of them."""

        def __init__(self) -> None:
            self.starts = list(range(0, len(images), _CALIBRATION_BATCH))
            self.pending: Iterator[int] = iter(())

        def __len__(self) -> int:
            return len(self.starts)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(self.starts[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.pending, None)
            return None if start is None else {INPUT_NAME: np.ascontiguousarray(images[start : start + _CALIBRATION_BATCH])}

    pre = dst.with_name(dst.stem + ".pre.onnx")
    with _quiet_quantiser():
        try:
            source = _pre_process(src, pre)
            float_nodes = _float_head(source)
            quantize_static(
                str(source), str(dst), Batches(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,  # uint8 activations with int8 weights: the x86 fast path
                weight_type=QuantType.QInt8,
                # Full 8-bit weights: 7-bit ones (reduce_range) avoid an overflow only CPUs without VNNI
                # have, and cost agreement (resnet18 on photos: 99.5% -> 98.5% of top-1 kept).
                reduce_range=False,
                nodes_to_exclude=float_nodes,
                calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                extra_options={"CalibStridedMinMax": 1},  # one batch per collection (every method, despite the name)
            )
        finally:
            pre.unlink(missing_ok=True)
    return {
        "mode": "static", "format": "QDQ", "weights": "int8", "per_channel": True, "activations": "uint8", "reduce_range": False,
        "calibration_method": method, "calibration_images": int(len(images)), "float_nodes": float_nodes,
    }


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, C) uint8 -> (N, num_classes) float32 through ONNX Runtime on CPU."""
    from pixelmill.inference.session import open_onnx_file

    session = open_onnx_file(path)
    return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.uint8)})[0]
