"""Export a tabular run: the fitted ColumnTransformer (skl2onnx) and the MLP (torch.onnx) merged into one graph.

The merged ``model.onnx`` takes one named (N, 1) input per raw column (numeric and boolean
float32, categorical string) and returns ``probabilities`` (N, num_classes) float32, so a
client never re-implements imputation, scaling or one-hot encoding. Before the bundle is
written, ONNX Runtime runs the run's test rows (else val) and must agree with
scikit-learn + eager PyTorch exactly as the image export must agree with PyTorch.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pixelmill import runs
from pixelmill.data.tabular_preprocess import read_schema_file
from pixelmill.errors import BundleError, ConfigError, DataError
from pixelmill.export.bundle import Bundle, read_bundle, write_bundle
from pixelmill.export.parity import agreement, verdict
from pixelmill.export.writer import run_meta, staged
from pixelmill.inference.session import open_onnx_file
from pixelmill.runs import LoadedRun
from pixelmill.tasks.classification import read_temperature, tempered_softmax
from pixelmill.tasks.tabular_classification.data import load_rows
from pixelmill.tasks.tabular_classification.runtime import TabularSchemaView, feeds, rows_from_frame

log = logging.getLogger(__name__)

FEATURES = "features"  # the MLP's input inside the merged graph
OUTPUT_NAME = "probabilities"
ML_OPSET = 3


def preprocessor_onnx(prep, opset: int):
    """The fitted ColumnTransformer as ONNX: one (N, 1) input per column -> (N, F) float32."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    types = {"categorical": StringTensorType, "numeric": FloatTensorType, "boolean": FloatTensorType}
    initial = [(name, types[kind]([None, 1])) for name, kind in prep.schema.columns.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_sklearn(prep.transformer, initial_types=initial, target_opset={"": opset, "ai.onnx.ml": ML_OPSET})


def network_onnx(net, n_features: int, opset: int, path: Path, temperature: float = 1.0):
    """The MLP plus its softmax head (tempered by eval.calibrate) as ONNX: ``features`` (N, F) float32 -> ``probabilities``, dynamic batch."""
    head = tempered_softmax(temperature)
    import onnx

    class Probabilities(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.net = inner.eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return head(self.net(x))  # (N, F) features -> (N, num_classes)

    sample = torch.zeros(2, n_features)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Probabilities(net).eval(), (sample,), str(path), input_names=[FEATURES], output_names=[OUTPUT_NAME],
            dynamic_axes={FEATURES: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    return onnx.load(str(path))


def merge(pre, net_model, opset: int):
    """One graph: raw columns -> preprocessor -> MLP -> probabilities."""
    import onnx
    from onnx import compose

    (pre_out,) = [o.name for o in pre.graph.output]
    net_model = compose.add_prefix(net_model, "mlp/", rename_inputs=False, rename_outputs=False)
    # merge_models needs one IR version and matching opsets per domain.
    ir = max(pre.ir_version, net_model.ir_version)
    for model in (pre, net_model):
        model.ir_version = ir
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset
    merged = compose.merge_models(pre, net_model, io_map=[(pre_out, FEATURES)], outputs=[OUTPUT_NAME], name="pixelmill_tabular")
    onnx.checker.check_model(merged)
    return merged


def check_rows(cfg: Any, run_dir: Path, limit: int = 256):
    """Up to ``limit`` typed rows of the run's test split (else val), spread over the split."""
    try:
        data = load_rows(cfg, run_dir)
    except (DataError, ConfigError, OSError) as exc:
        raise BundleError(f"cannot read the data of '{run_dir}' to check the export against ({exc}); restore its data.path") from None
    split = next((s for s in ("test", "val") if len(data.frames.get(s, ())) > 0), None)
    if split is None:
        raise BundleError(f"no test or val rows in the data of '{run_dir}' to check the export against")
    frame = data.frames[split]
    step = max(1, len(frame) // limit)
    return frame.iloc[::step].iloc[:limit].reset_index(drop=True)


def reference(net: nn.Module, prep, frame, temperature: float = 1.0) -> np.ndarray:
    """scikit-learn transform + eager PyTorch: what evaluation computed."""
    with torch.inference_mode():
        return tempered_softmax(temperature)(net.eval()(torch.from_numpy(prep.transform(frame)))).numpy()


def export(run: LoadedRun, out: Path, fmt: str, quantize: str | None, options: dict[str, Any]) -> Bundle:
    """Export a tabular run to a checked ONNX bundle (see the module docstring); BundleError when it disagrees."""
    import onnx

    prep, opset = run.preprocessing, options["opset"]
    schema_doc = read_schema_file(run.run_dir)
    view = TabularSchemaView(schema_doc)
    frame = check_rows(run.config, run.run_dir, max(options["max_images"], 256))
    temperature = read_temperature(run.run_dir)  # eval.calibrate: the temperature lives in the graph
    expected = reference(run.net, prep, frame, temperature)
    with staged(out) as work:
        net_model = network_onnx(run.net, prep.n_features, opset, work / "net.onnx", temperature)
        (work / "net.onnx").unlink()
        onnx.save(merge(preprocessor_onnx(prep, opset), net_model, opset), str(work / "model.onnx"))
        session = open_onnx_file(work / "model.onnx")
        (exported,) = session.run([OUTPUT_NAME], feeds(rows_from_frame(frame, view), view))
        figures = agreement(expected, exported)
        reason = verdict(figures, None, 1.0, noun="rows")
        if reason:
            raise BundleError(f"refusing to write a bundle for '{run.run_dir}': {reason}")
        meta = run_meta(run, options.get("name"), "model.onnx", runs.versions("torch", "onnx", "onnxruntime", "sklearn", "skl2onnx"))
        meta |= {
            "classes": list(schema_doc["classes"]),
            "inputs": view.inputs(),
            "output": {"name": OUTPUT_NAME, "shape": [-1, len(schema_doc["classes"])]},
            "schema": schema_doc,
            "preprocessing": run.summary.preprocessing,
            "export": {"format": "onnx", "opset": opset, "quantize": None, "reference": "scikit-learn + PyTorch", **figures},
        }
        if temperature != 1.0:
            meta["calibration"] = {"method": "temperature", "temperature": temperature}
        write_bundle(work, meta, ["model.onnx"])
    log.info("exported %s: top-1 agreement %.2f%%, max |diff| %.2e on %d rows",
             out, 100 * figures["top1_agreement"], figures["max_abs_diff"], figures["checked_images"])
    return read_bundle(out)
