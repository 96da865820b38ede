"""The Open Inference Protocol (KServe V2, as Triton and Seldon speak it) over HTTP.

https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol

Inputs: the model's one input (``image``) as a numeric tensor of MNIST-form digits —
FP32/FP64/FP16 in [0, 1] or UINT8 pixels, shaped [N, 28, 28, 1], [N, 28, 28],
[N, 1, 28, 28] or [N, 784] — or as a BYTES tensor [N] of encoded images (PNG, JPEG, …;
base64 strings in JSON, raw bytes in binary), which get the same preprocessing as
/predict.

Two of Triton's extensions are spoken because its client uses them by default:
*binary tensor data* (``Inference-Header-Content-Length``: a JSON header followed by raw
tensors, ~10× smaller than JSON numbers) and *classification* (``"classification": K``
on an output answers the top K as ``"probability:digit"`` strings). Of the
*model repository* extension the index is served (``POST /v2/repository/index``, from
app/api/open_inference.py); models load and unload by watching MODELS_DIR, not by request.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.batching import Deadline
from app.errors import InvalidInput, PayloadTooLarge
from app.inputs import (
    Limits,
    all_numbers,
    check_batch,
    from_images,
    from_numbers,
    quoted,
    read_json,
)
from app.servable import LoadedModel
from training.export_format import SIGNATURE

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "statistics"]
HEADER_LENGTH = "Inference-Header-Content-Length"
NUMERIC = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "UINT8": "u1"}
FROM_TF = {"DT_FLOAT": "FP32", "DT_DOUBLE": "FP64", "DT_HALF": "FP16", "DT_UINT8": "UINT8",
           "DT_INT32": "INT32", "DT_INT64": "INT64", "DT_STRING": "BYTES", "DT_BOOL": "BOOL"}
HEADER_DIGITS = re.compile(r"[0-9]{1,12}")  # ASCII only: int() also takes "²" and "٣"
MAX_RANK = 4  # [N, 28, 28, 1] is the deepest shape a digit tensor has
LENGTH = struct.Struct("<I")  # BYTES elements in binary: 4-byte little-endian length first


@dataclass
class InferRequest:
    """What the answer depends on, besides the probabilities."""

    id: str | None = None
    outputs: list[dict] | None = None  # None: every output
    binary_output: bool = False
    parameters: dict = field(default_factory=dict)


def server_metadata(name: str, version: str) -> dict:
    return {"name": name, "version": version, "extensions": EXTENSIONS}


def _tensor_metadata(name: str, info: dict) -> dict:
    dims = info.get("tensor_shape", {}).get("dim", [])
    return {"name": name, "datatype": FROM_TF.get(info.get("dtype"), info.get("dtype")),
            "shape": [int(dim["size"]) for dim in dims]}


def model_metadata(model: LoadedModel, versions: list[int]) -> dict:
    """Name, loaded versions, platform and tensors, from the SavedModel's SignatureDef."""
    signature = model.signature_defs[SIGNATURE]
    return {"name": model.name, "versions": [str(v) for v in versions],
            "platform": "tensorflow_savedmodel",
            "inputs": [_tensor_metadata(n, i) for n, i in signature["inputs"].items()],
            "outputs": [_tensor_metadata(n, i) for n, i in signature["outputs"].items()]}


def split_body(body: bytes, header_length: str | None, limits: Limits
               ) -> tuple[dict, bytes]:
    """The JSON header and the binary tensor data after it (empty without the extension)."""
    if header_length is None:
        size = len(body)
    elif HEADER_DIGITS.fullmatch(header_length) and int(header_length) <= len(body):
        size = int(header_length)
    else:
        raise InvalidInput(f"{HEADER_LENGTH} must be a whole number no larger than the "
                           f"body ({len(body)} bytes), got {header_length[:20]!r}")
    document = read_json(body[:size], limits)
    if not isinstance(document, dict):
        raise InvalidInput("the inference request must be a JSON object")
    return document, body[size:]


def _object(value: object, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _shape(tensor: dict, name: str, max_values: int) -> list[int]:
    """The tensor's shape, refused (413) before anything is sized by it when it holds
    more than ``max_values`` (MAX_BATCH × 784) elements or has a larger dimension."""
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of whole numbers")
    if len(shape) > MAX_RANK or any(d > max_values for d in shape) or \
            math.prod(shape) > max_values:
        raise PayloadTooLarge(f"input {name!r}: shape {shape[:MAX_RANK + 1]} is larger than "
                              f"{max_values:,} values (MAX_BATCH × 784) in at most "
                              f"{MAX_RANK} dimensions")
    return shape


def _binary_parts(inputs: list[dict], data: bytes) -> list[bytes | None]:
    """Each input's slice of the binary data, in input order (None: its data is JSON)."""
    parts, offset = [], 0
    for tensor in inputs:
        size = _object(tensor.get("parameters"), "parameters").get("binary_data_size")
        if size is None:
            parts.append(None)
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(data):
            raise InvalidInput(f"input {tensor.get('name')!r}: binary_data_size {size!r} "
                               f"runs past the {len(data)} bytes of binary data")
        parts.append(data[offset:offset + size])
        offset += size
    if offset != len(data):
        raise InvalidInput(f"{len(data) - offset} bytes of binary data belong to no input")
    return parts


def _numbers(tensor: dict, datatype: str, raw: bytes | None, shape: list[int], name: str
             ) -> np.ndarray:
    dtype = np.dtype(NUMERIC[datatype])
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(f"input {name!r}: shape {shape} of {datatype} needs "
                               f"{count * dtype.itemsize} bytes, got {len(raw)}")
        return np.frombuffer(raw, dtype).reshape(shape)
    wrong = InvalidInput(f"input {name!r}: data must be {datatype} numbers, "
                         "flat or nested in row-major order")
    # Strings ("0.5") and booleans are not numbers to the protocol, though NumPy would
    # convert them; nor are integers past 64 bits; UINT8 must not wrap 300 round to 44.
    if not all_numbers(tensor.get("data")):
        raise wrong
    try:
        values = np.asarray(tensor.get("data"))
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise wrong from None
    if values.dtype.kind not in "iuf" or (datatype == "UINT8" and values.size and (
            values.dtype.kind == "f" or values.min() < 0 or values.max() > 255)):
        raise wrong
    with np.errstate(over="ignore", invalid="ignore"):  # infinities get their own 422
        array = values.astype(dtype)
    if array.size != count:
        raise InvalidInput(f"input {name!r}: shape {shape} holds {count} values, "
                           f"data has {array.size}")
    return array.reshape(shape)


def _split_bytes(raw: bytes, name: str, count: int) -> list[bytes]:
    """Binary BYTES tensor: elements each led by their 4-byte little-endian length; one
    more than the ``count`` its shape declares is an error, before any further split."""
    elements, offset = [], 0
    while offset < len(raw) and len(elements) <= count:
        if offset + LENGTH.size > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES data ends inside a length prefix")
        (size,) = LENGTH.unpack_from(raw, offset)
        offset += LENGTH.size
        if offset + size > len(raw):
            raise InvalidInput(f"input {name!r}: a BYTES element runs past the data")
        elements.append(raw[offset:offset + size])
        offset += size
    return elements


def _json_bytes(data: object, name: str, count: int) -> list[bytes]:
    """JSON BYTES tensor: base64 strings (JSON cannot carry raw image bytes), decoded
    only when there are as many as the shape's ``count``."""
    try:
        flat = np.asarray(data, dtype=object).ravel().tolist() if isinstance(data, list) \
            else None
    except (ValueError, RecursionError):
        flat = None
    if not flat or not all(isinstance(item, str) for item in flat):
        raise InvalidInput(f"input {name!r}: BYTES data must be a list of base64 strings")
    if len(flat) != count:
        raise InvalidInput(f"input {name!r}: shape [{count}] but {len(flat)} elements")
    try:
        return [base64.b64decode(item, validate=True) for item in flat]
    except (binascii.Error, ValueError):
        raise InvalidInput(f"input {name!r}: BYTES data must be base64 in JSON") from None


def _images(tensor: dict, raw: bytes | None, limits: Limits, preprocess: bool) -> np.ndarray:
    name, datatype = tensor.get("name"), str(tensor.get("datatype"))
    shape = _shape(tensor, name, limits.max_values)
    if datatype in NUMERIC:
        return from_numbers(_numbers(tensor, datatype, raw, shape, name), limits,
                            f"input {name!r}")
    if datatype != "BYTES":
        raise InvalidInput(f"input {name!r}: datatype {datatype!r} is not supported; send "
                           f"{', '.join(NUMERIC)} digits or BYTES encoded images")
    if len(shape) not in (1, 2) or shape[1:] not in ([], [1]):
        raise InvalidInput(f"input {name!r}: a BYTES tensor of images has shape [N] or "
                           f"[N, 1], got {shape}")
    check_batch(shape[0], limits)
    blobs = _split_bytes(raw, name, shape[0]) if raw is not None else \
        _json_bytes(tensor.get("data"), name, shape[0])
    if len(blobs) != shape[0]:
        raise InvalidInput(f"input {name!r}: shape {shape} but {len(blobs)} elements")
    return from_images(blobs, limits, preprocess)


def read_infer(body: bytes, header_length: str | None, limits: Limits, preprocess: bool,
               model: LoadedModel) -> tuple[np.ndarray, InferRequest]:
    """An inference request → (images, what the answer must look like). Everything but
    the images is checked first, so that a request the answer cannot be written for
    never costs a decode or a model call."""
    document, data = split_body(body, header_length, limits)
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise InvalidInput('the inference request needs "inputs", a list of tensors')
    if len(inputs) != 1 or inputs[0].get("name") != model.input_name:
        raise InvalidInput(f"the model takes one input, {model.input_name!r}; got "
                           f"{quoted(t.get('name') for t in inputs)}")
    (raw,) = _binary_parts(inputs, data)
    parameters = _object(document.get("parameters"), "parameters")
    binary_output = _flag(parameters, "binary_data_output", False)
    outputs = _checked_outputs(document.get("outputs"), model)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f'"id" must be a string, got {type(request_id).__name__}')
    images = _images(inputs[0], raw, limits, preprocess)
    return images, InferRequest(request_id, outputs, binary_output, parameters)


def _flag(parameters: dict, name: str, default: bool) -> bool:
    """A boolean parameter: JSON true or false, never a string ("false" is truthy)."""
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter {name!r} must be true or false, got {value!r:.40}")
    return value


def _checked_outputs(outputs: object, model: LoadedModel) -> list[dict] | None:
    """The requested outputs, checked before the model runs for them: each of the
    model's outputs at most once (as Triton requires), so the answer holds at most one
    tensor per output, whatever the length of the list sent."""
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidInput('"outputs" must be a list of {"name": ...} objects')
    if not outputs:
        raise InvalidInput('"outputs" names no output; leave it out to get every output')
    classes = _tensor_metadata(model.output_name, model.signature_defs[SIGNATURE][
        "outputs"][model.output_name])["shape"][-1]
    seen = set()
    for output in outputs:
        name = output.get("name")
        if name != model.output_name:
            raise InvalidInput(f"the model has one output, {model.output_name!r}; "
                               f"got {quoted([name])}")
        if name in seen:
            raise InvalidInput(f"output {name!r} is requested more than once")
        seen.add(name)
        parameters = _object(output.get("parameters"), "output parameters")
        _flag(parameters, "binary_data", False)
        count = parameters.get("classification", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= classes:
            raise InvalidInput(f"classification must be a whole number from 1 to {classes}, "
                               f"got {count!r:.40}")
    return outputs


def _top_classes(probabilities: np.ndarray, count: int) -> np.ndarray:
    """Triton's classification output: the top ``count`` as ``b"probability:digit"``."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :count]
    return np.array([[f"{row[i]:.6f}:{i}".encode() for i in top]
                     for row, top in zip(probabilities, order, strict=True)], dtype=object)


def _output(name: str, values: np.ndarray, binary: bool) -> tuple[dict, bytes]:
    if values.dtype == object:
        tensor = {"name": name, "datatype": "BYTES", "shape": list(values.shape)}
        elements = values.ravel().tolist()
        raw = b"".join(LENGTH.pack(len(e)) + e for e in elements)
        data: list = [e.decode() for e in elements]
    else:
        tensor = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
        raw = values.astype("<f4").tobytes()
        data = values.ravel()
    if binary:
        tensor["parameters"] = {"binary_data_size": len(raw)}
        return tensor, raw
    tensor["data"] = data
    return tensor, b""


def infer_response(model: LoadedModel, request: InferRequest, probabilities: np.ndarray,
                   deadline: Deadline | None = None) -> tuple[dict, bytes]:
    """The response header object and the binary data that follows it (maybe empty);
    DeadlineExceeded if the request's deadline passes before a tensor is written, since
    its client (and any proxy) has stopped waiting for it."""
    wanted = request.outputs if request.outputs is not None else [{"name": model.output_name}]
    tensors, chunks = [], []
    for output in wanted:  # checked by read_infer: each output at most once
        if deadline is not None:
            deadline.check("while the answer was written")
        parameters = output.get("parameters") or {}
        values = probabilities if "classification" not in parameters else \
            _top_classes(probabilities, parameters["classification"])
        tensor, raw = _output(model.output_name, values,
                              parameters.get("binary_data", request.binary_output))
        tensors.append(tensor)
        chunks.append(raw)
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = tensors
    return header, b"".join(chunks)
