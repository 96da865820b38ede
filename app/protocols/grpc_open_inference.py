"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` messages.

The messages are Triton's ``grpc_service.proto`` as ``tritonclient`` ships it compiled
(``tritonclient.grpc.service_pb2``): the superset of KServe's ``grpc_predict_v2.proto``
(same package, service and field numbers) that also holds ``RepositoryIndex``, which
Triton's client calls. Importing it needs no TensorFlow, so a LiteRT-only image serves it.

Each message is turned into the JSON-form tensor the REST side reads
(app/protocols/open_inference.py), and read by the same code: the same shapes,
datatypes, limits and preprocessing, and the same errors, whatever the transport.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from app.errors import InvalidInput
from app.inputs import Limits
from app.model_store import VersionState
from app.protocols.open_inference import (
    LENGTH,
    NUMERIC,
    _checked_outputs,
    _images,
    _output,
    _top_classes,
    model_metadata,
)
from app.servable import LoadedModel
from training.export_format import parse_version

OPEN_INFERENCE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE = OPEN_INFERENCE.full_name
# Where each datatype's values sit in InferTensorContents (FP16 has no field: raw only).
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "UINT8": "uint_contents"}


@dataclass(frozen=True)
class GrpcInfer:
    """What the answer depends on besides the probabilities."""

    id: str
    outputs: list[dict] | None  # None: every output


def version_of(text: str) -> int | None:
    """``model_version``: empty for the store's choice, else a version folder's number."""
    if not text:
        return None
    version = parse_version(text)
    if version is None:
        raise InvalidInput(f"model_version must be empty or a whole number in ASCII digits, "
                           f"got {text[:40]!r}")
    return version


def parameter(value: pb.InferParameter) -> object:
    """An InferParameter's one set value (None when none is set)."""
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def _raw_from_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes | None:
    """The input's ``contents`` as the bytes ``raw_input_contents`` would hold, so one
    reader checks both; None when the field its datatype uses is empty."""
    if tensor.datatype == "BYTES":
        items = tensor.contents.bytes_contents
        return b"".join(LENGTH.pack(len(item)) + item for item in items) if items else None
    field = CONTENTS.get(tensor.datatype)
    values = getattr(tensor.contents, field) if field else None
    if not values:
        return None
    array = np.asarray(values)
    if tensor.datatype == "UINT8" and array.max() > 255:  # uint_contents holds 32 bits
        raise InvalidInput(f"input {tensor.name!r}: UINT8 contents must lie in 0..255")
    return array.astype(NUMERIC[tensor.datatype]).tobytes()


def read_infer(request: pb.ModelInferRequest, limits: Limits, model: LoadedModel
               ) -> tuple[np.ndarray, GrpcInfer]:
    """A ModelInferRequest → (images, what the answer must hold); the outputs are checked
    before any image is decoded, as over REST."""
    if len(request.inputs) != 1 or request.inputs[0].name != model.input_name:
        names = [tensor.name[:40] for tensor in request.inputs][:3]
        raise InvalidInput(f"the model takes one input, {model.input_name!r}; got {names}")
    (tensor,) = request.inputs
    if len(request.raw_input_contents) > 1:
        raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for one input")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if raw is not None and tensor.HasField("contents"):
        raise InvalidInput(f"input {tensor.name!r} has both contents and raw_input_contents")
    outputs = _checked_outputs([{"name": output.name, "parameters": {
        key: parameter(value) for key, value in output.parameters.items()}}
        for output in request.outputs] or None, model)
    if raw is None:
        raw = _raw_from_contents(tensor)
    document = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    images = _images(document, raw, limits, preprocess=True)
    return images, GrpcInfer(request.id, outputs)


def infer_response(model: LoadedModel, details: GrpcInfer, probabilities: np.ndarray
                   ) -> pb.ModelInferResponse:
    """Every tensor in ``raw_output_contents``, as Triton answers and its client reads."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version),
                                     id=details.id)
    for output in details.outputs or [{"name": model.output_name}]:
        count = (output.get("parameters") or {}).get("classification")
        values = probabilities if count is None else _top_classes(probabilities, count)
        tensor, raw = _output(model.output_name, values, binary=True)
        response.outputs.add(name=tensor["name"], datatype=tensor["datatype"],
                             shape=tensor["shape"])
        response.raw_output_contents.append(raw)
    return response


def metadata_response(model: LoadedModel, versions: list[int]) -> pb.ModelMetadataResponse:
    """The REST metadata (app/protocols/open_inference.py) as its message."""
    document = model_metadata(model, versions)
    tensors = {kind: [pb.ModelMetadataResponse.TensorMetadata(**tensor)
                      for tensor in document[kind]] for kind in ("inputs", "outputs")}
    return pb.ModelMetadataResponse(name=document["name"], versions=document["versions"],
                                    platform=document["platform"], **tensors)


def index_response(rows: list[VersionState], ready_only: bool) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(models=[
        pb.RepositoryIndexResponse.ModelIndex(name=row.name, version=row.version,
                                              state=row.state, reason=row.reason)
        for row in rows if row.state == "READY" or not ready_only])
