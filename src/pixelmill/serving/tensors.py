"""Open Inference Protocol v2 tensors: JSON ``data`` and Triton's binary tensor extension.

A binary request is ``<JSON header><raw tensor bytes>`` with the JSON's length in the
``Inference-Header-Content-Length`` header; each input that travels as bytes says how many
in ``parameters.binary_data_size``. Responses use the same layout for outputs requested
with ``parameters.binary_data: true``. Every malformed request is a 400 (413 for a batch
over the limit), never a 500.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
from fastapi import HTTPException
from pydantic import ValidationError

from pixelmill.serving.schemas import InferInput, InferRequest

HEADER_LENGTH = "inference-header-content-length"


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool
    classification: int  # 0: the probabilities tensor; k > 0: top-k "score:index:label" strings


def _bad(message: str) -> HTTPException:
    return HTTPException(400, message)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """Body -> (JSON header, binary tail) using ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise _bad(f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}") from None
    if not 0 <= n <= len(body):
        raise _bad(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
    return body[:n], body[n:]


def parse_request(header: bytes) -> InferRequest:
    """JSON header bytes -> validated :class:`InferRequest`."""
    try:
        payload = json.loads(header)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise _bad(f"malformed JSON in the inference request: {str(exc)[:200]}") from None
    try:
        return InferRequest.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise _bad(f"invalid inference request: {problems}") from None


def _the_input(request: InferRequest, input_name: str) -> InferInput:
    names = [t.name for t in request.inputs]
    unknown = sorted(set(names) - {input_name})
    if unknown:
        raise _bad(f"unknown input(s) {unknown}; the model takes one input '{input_name}'")
    if names.count(input_name) != 1:
        raise _bad(f"the request must hold exactly one input '{input_name}', it holds {names.count(input_name)}")
    return request.inputs[0]


def _json_uint8(data: Any, count: int, name: str) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, RecursionError):
        raise _bad(f"input '{name}' data is not a rectangular array of numbers") from None
    if arr.dtype.kind not in "iu":
        raise _bad(f"input '{name}' is UINT8: its data must be integers in [0, 255]")
    if arr.size != count:
        raise _bad(f"input '{name}' has {arr.size} values; its shape needs {count}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise _bad(f"input '{name}' is UINT8: its values must be in [0, 255]")
    return arr.astype(np.uint8).reshape(-1)


def input_batch(
    request: InferRequest, binary: bytes, input_name: str, image_shape: tuple[int, int, int], max_batch: int
) -> np.ndarray:
    """The request's image tensor as (N, H, W, C) uint8, every field checked before any allocation."""
    tensor = _the_input(request, input_name)
    if tensor.datatype != "UINT8":
        raise _bad(f"input '{input_name}' has datatype {tensor.datatype!r}; the model takes UINT8 (raw pixels, NHWC)")
    shape = tensor.shape
    expected = [-1, *image_shape]
    if len(shape) != 4 or tuple(shape[1:]) != image_shape:
        raise _bad(f"input '{input_name}' has shape {shape[:8]}; the model takes {expected} (N, height, width, channels)")
    if shape[0] < 1:
        raise _bad(f"input '{input_name}' has batch size {shape[0]}; it must be at least 1")
    if shape[0] > max_batch:
        raise HTTPException(413, f"input '{input_name}' has batch size {shape[0]}; the limit is {max_batch}")
    count = prod(shape)
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if binary:
            raise _bad(f"the body carries {len(binary)} binary bytes but input '{input_name}' has no binary_data_size")
        if tensor.data is None:
            raise _bad(f"input '{input_name}' has neither 'data' nor parameters.binary_data_size")
        flat = _json_uint8(tensor.data, count, input_name)
    else:
        if type(size) is not int or size != count:
            raise _bad(f"input '{input_name}' binary_data_size is {size!r}; shape {shape} of UINT8 needs {count} bytes")
        if tensor.data is not None:
            raise _bad(f"input '{input_name}' has both 'data' and binary_data_size")
        if len(binary) != size:
            raise _bad(f"the body carries {len(binary)} binary bytes; input '{input_name}' declares {size}")
        flat = np.frombuffer(binary, dtype=np.uint8)
    return flat.reshape(shape)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"{what} must be true or false, got {value!r}")
    return value


def output_requests(request: InferRequest, output_name: str) -> list[OutputRequest]:
    """Which outputs to return, how (JSON or binary) and whether as top-k classification strings."""
    default_binary = _flag(request.parameters.get("binary_data_output", False), "parameters.binary_data_output")
    if not request.outputs:
        return [OutputRequest(output_name, default_binary, 0)]
    out = []
    for requested in request.outputs:
        if requested.name != output_name:
            raise _bad(f"unknown output '{requested.name[:100]}'; the model's output is '{output_name}'")
        params = requested.parameters
        binary = _flag(params.get("binary_data", default_binary), f"output '{output_name}' binary_data")
        k = params.get("classification", 0)
        if type(k) is not int or k < 0:
            raise _bad(f"output '{output_name}' classification must be a non-negative integer, got {k!r}")
        out.append(OutputRequest(output_name, binary, k))
    return out


def _classification(probs: np.ndarray, classes: list[str], k: int) -> list[bytes]:
    """Triton's classification extension: per row the top-k as b"score:index:label", row-major."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
    return [f"{probs[i, j]:f}:{j}:{classes[j]}".encode() for i, row in enumerate(order) for j in row]


def encode_response(
    model_name: str, version: str, request_id: str | None, probs: np.ndarray, classes: list[str], outputs: list[OutputRequest]
) -> tuple[bytes, int | None]:
    """(N, C) probabilities -> (body, JSON header length or None when nothing is binary)."""
    n, c = probs.shape
    tensors: list[dict[str, Any]] = []
    tails: list[bytes] = []
    for spec in outputs:
        if spec.classification:
            k = min(spec.classification, c)
            values: list[bytes] = _classification(probs, classes, k)
            tensor: dict[str, Any] = {"name": spec.name, "datatype": "BYTES", "shape": [n, k]}
            raw = b"".join(struct.pack("<I", len(v)) + v for v in values)
            data: list[Any] = [v.decode() for v in values]
        else:
            tensor = {"name": spec.name, "datatype": "FP32", "shape": [n, c]}
            raw = np.ascontiguousarray(probs, dtype="<f4").tobytes()
            data = probs.reshape(-1).tolist()
        if spec.binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            tensor["data"] = data
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response).encode()
    if not tails:
        return header, None
    return header + b"".join(tails), len(header)
