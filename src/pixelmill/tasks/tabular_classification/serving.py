"""How ``pixelmill serve`` reads and answers tabular requests: native JSON records and v2 tensors, one named input per column.

Both routes end in :func:`runtime.rows_from_records`, so a record's
value is checked by the same rules whichever protocol carried it. A value the schema
refuses is a 422 naming the record and column; a malformed v2 tensor is a 400.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from pixelmill.errors import DataError
from pixelmill.serving.schemas import InferInput, InferRequest, RecordPrediction, RecordsPredictResponse, TensorSpec
from pixelmill.tasks.tabular_classification.runtime import TabularSchemaView, rows_from_records

# v2 datatype per schema column type (what metadata advertises); numbers may come as any of _NUMERIC.
V2_TYPES = {"numeric": "FP32", "boolean": "FP32", "categorical": "BYTES"}
_NUMERIC = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "?"}


def checked_rows(records: list[Any], schema: TabularSchemaView) -> np.ndarray:
    """Records -> (N,) structured rows, or 422 naming the record and column."""
    try:
        return rows_from_records(records, schema)
    except DataError as exc:
        raise HTTPException(422, str(exc)) from None


def records_of(body: bytes, max_records: int) -> list[Any]:
    """``{"records": [{column: value, ...}, ...]}`` -> the list; 400/413/422 for a malformed body."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"malformed JSON: {str(exc)[:200]}") from None
    records = payload.get("records") if isinstance(payload, dict) else None
    if not isinstance(records, list):
        raise HTTPException(422, 'expected {"records": [{"column": value, ...}, ...]} for this tabular model')
    if not records:
        raise HTTPException(422, "'records' is empty; send at least one record")
    if len(records) > max_records:
        raise HTTPException(413, f"too many records ({len(records)}); send at most {max_records} per request")
    return records


def metadata_inputs(schema: TabularSchemaView) -> list[TensorSpec]:
    """v2 model metadata: one [-1, 1] input per column."""
    return [TensorSpec(name=name, datatype=V2_TYPES[kind], shape=[-1, 1]) for name, kind in schema.columns.items()]


def _bytes_elements(raw: bytes, count: int, name: str) -> list[str]:
    """Triton BYTES tensor: each element is a little-endian uint32 length and that many bytes."""
    out, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise HTTPException(400, f"input '{name}' BYTES data ends early")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise HTTPException(400, f"input '{name}' BYTES data ends early")
        out.append(raw[offset : offset + n].decode("utf-8", errors="replace"))
        offset += n
    if offset != len(raw):
        raise HTTPException(400, f"input '{name}' BYTES data is longer than its shape")
    return out


def _column_values(tensor: InferInput, raw: bytes | None, rows: int) -> list[Any]:
    """One column's values as Python objects (str or number), checked against its shape."""
    name = tensor.name
    if tensor.datatype == "BYTES":
        if raw is not None:
            return _bytes_elements(raw, rows, name)
        values = np.asarray(tensor.data, dtype=object).reshape(-1).tolist() if tensor.data is not None else None
    elif tensor.datatype in _NUMERIC:
        if raw is not None:
            width = np.dtype(_NUMERIC[tensor.datatype]).itemsize
            if len(raw) != rows * width:
                raise HTTPException(400, f"input '{name}' binary_data_size is {len(raw)}; shape {tensor.shape} of {tensor.datatype} needs {rows * width}")
            return np.frombuffer(raw, dtype=_NUMERIC[tensor.datatype]).tolist()
        try:
            values = np.asarray(tensor.data, dtype=np.float64).reshape(-1).tolist() if tensor.data is not None else None
        except (ValueError, TypeError):
            raise HTTPException(422, f"input '{name}' ({tensor.datatype}) holds values that are not numbers") from None
    else:
        raise HTTPException(400, f"input '{name}' has datatype {tensor.datatype!r}; send BYTES for text or one of {', '.join(_NUMERIC)}")
    if values is None:
        raise HTTPException(400, f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    if len(values) != rows:
        raise HTTPException(400, f"input '{name}' has {len(values)} values; its shape {tensor.shape} needs {rows}")
    return [None if isinstance(v, float) and v != v else v for v in values]  # NaN -> missing


def _rows_of(tensor: InferInput, max_batch: int) -> int:
    shape = tensor.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise HTTPException(400, f"input '{tensor.name}' has shape {shape[:8]}; each column takes [N, 1] (or [N]) with N >= 1")
    if shape[0] > max_batch:
        raise HTTPException(413, f"input '{tensor.name}' has batch size {shape[0]}; the limit is {max_batch}")
    return shape[0]


def infer_rows(request: InferRequest, binary: bytes, schema: TabularSchemaView, max_batch: int) -> np.ndarray:
    """A v2 request with one named input per column -> (N,) structured rows."""
    names = [t.name for t in request.inputs]
    unknown = sorted(set(names) - set(schema.columns))
    if unknown:
        raise HTTPException(400, f"unknown input(s) {unknown[:10]}; the model takes one input per column: {', '.join(schema.columns)}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise HTTPException(400, f"input(s) {twice[:10]} appear more than once")
    missing = [n for n in schema.columns if n not in names]
    if missing:
        raise HTTPException(422, f"missing input for column '{missing[0]}' (the model needs: {', '.join(schema.columns)})")
    counts = {_rows_of(t, max_batch) for t in request.inputs}
    if len(counts) != 1:
        raise HTTPException(400, f"inputs have different batch sizes {sorted(counts)}; every column needs the same N")
    rows = counts.pop()
    columns, offset = {}, 0
    for tensor in request.inputs:  # binary tensors follow the JSON in the order of the inputs
        size = tensor.parameters.get("binary_data_size")
        raw = None
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise HTTPException(400, f"input '{tensor.name}' binary_data_size {size!r} does not fit the {len(binary)} binary bytes")
            if tensor.data is not None:
                raise HTTPException(400, f"input '{tensor.name}' has both 'data' and binary_data_size")
            raw, offset = binary[offset : offset + size], offset + size
        columns[tensor.name] = _column_values(tensor, raw, rows)
    if offset != len(binary):
        raise HTTPException(400, f"the body carries {len(binary)} binary bytes but the inputs declare {offset}")
    return checked_rows([{name: values[i] for name, values in columns.items()} for i in range(rows)], schema)


async def native_inputs(request: Request, media_type: str, engine: Any, settings: Any, limiter: Any) -> tuple[list[int], np.ndarray]:
    """JSON ``{"records": [{column: value, ...}, ...]}`` -> (record indices, (N,) structured rows); 422 names a bad record's column."""
    if not (media_type == "application/json" or media_type.endswith("+json")):
        raise HTTPException(415, 'this model takes table rows: send JSON {"records": [{"column": value, ...}, ...]}')
    records = records_of(await request.body(), settings.max_infer_batch)
    rows = checked_rows(records, engine.classifier.schema)
    request.state.images = len(rows)
    return list(range(len(rows))), rows


takes_threshold = True  # /predict?threshold= moves a binary model's operating point (a 422 for other models)


def native_response(engine: Any, ids: list[int], probs: np.ndarray, top_k: int, threshold: float | None = None) -> JSONResponse:
    """Per record: the label (a binary model's at its threshold), its confidence, the top-k and every class's probability."""
    try:
        predictions = engine.classifier.decode(probs, top_k, threshold)
    except DataError as exc:
        raise HTTPException(422, str(exc)) from None
    body = RecordsPredictResponse(
        model=engine.name,
        version=engine.version,
        predictions=[RecordPrediction(record=i, **p.to_dict()) for i, p in zip(ids, predictions)],
    )
    return JSONResponse(body.model_dump())


def v2_inputs(engine: Any) -> list[TensorSpec]:
    """v2 model metadata: one [-1, 1] input per column."""
    return metadata_inputs(engine.classifier.schema)


def v2_config_inputs(engine: Any) -> list[dict[str, Any]]:
    """Triton model configuration ``input``: one per column."""
    return [
        {"name": t.name, "data_type": f"TYPE_{'STRING' if t.datatype == 'BYTES' else t.datatype}", "dims": [1]}
        for t in metadata_inputs(engine.classifier.schema)
    ]


def v2_batch(request: InferRequest, binary: bytes, engine: Any, max_batch: int) -> np.ndarray:
    """A v2 request with one named input per column -> (N,) structured rows."""
    return infer_rows(request, binary, engine.classifier.schema, max_batch)
