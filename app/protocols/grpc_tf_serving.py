"""TensorFlow Serving's gRPC API: ``tensorflow.serving.PredictionService`` (Predict,
GetModelMetadata) and ``ModelService`` (GetModelStatus) messages.

The messages come from ``tensorflow-serving-api``, whose modules import TensorFlow (its
TensorProto and SignatureDef live there): app/grpc_server.py leaves this service out,
with a log line, where TensorFlow is not installed. Tensors are read here, field by
field, rather than by ``tf.make_ndarray``: the shape is checked against MAX_BATCH before
anything is sized by it (a TensorProto may declare 2^63 - 1 elements in a few bytes),
then the values go through the same checks and preprocessing as the REST ``:predict``.
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf import json_format
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    status_pb2,
)

from app.errors import InvalidInput
from app.inputs import Limits, check_batch, from_images, from_numbers
from app.protocols.open_inference import MAX_RANK
from app.protocols.tf_serving import _check_signature
from app.servable import LoadedModel
from training.export_format import SIGNATURE

SIGNATURE_DEF = "signature_def"  # the one metadata field TF Serving defines
# Numeric dtypes a digit may come in: the TensorProto field its values use, their NumPy type.
NUMERIC = {types_pb2.DT_FLOAT: ("float_val", "<f4"), types_pb2.DT_DOUBLE: ("double_val", "<f8"),
           types_pb2.DT_HALF: ("half_val", "<f2"), types_pb2.DT_UINT8: ("int_val", "u1")}


def version_of(spec: model_pb2.ModelSpec) -> int | None:
    """The pinned version, None for a label (label_of) or the store's choice."""
    return spec.version.value if spec.HasField("version") else None


def label_of(spec: model_pb2.ModelSpec) -> str | None:
    """The version label (MODEL_CONFIG_FILE's version_labels), None when there is none."""
    return spec.version_label or None


def _shape(tensor: tensor_pb2.TensorProto, name: str, limits: Limits) -> list[int]:
    """The declared dims, refused before anything is sized by them."""
    dims = [dim.size for dim in tensor.tensor_shape.dim]
    if tensor.tensor_shape.unknown_rank or any(d < 0 for d in dims) or len(dims) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: tensor_shape must be known, with at most "
                           f"{MAX_RANK} non-negative dims, got {dims[:MAX_RANK + 1]}")
    if any(d > limits.max_values for d in dims) or math.prod(dims) > limits.max_values:
        raise InvalidInput(f"input {name!r}: shape {dims} holds more than "
                           f"{limits.max_values:,} values (MAX_BATCH × 784)")
    return dims


def images_of(tensor: tensor_pb2.TensorProto, name: str, limits: Limits) -> np.ndarray:
    """A TensorProto of digits (numbers) or of encoded images (DT_STRING) → model input."""
    dims = _shape(tensor, name, limits)
    count = math.prod(dims)
    if tensor.dtype == types_pb2.DT_STRING:
        if len(dims) not in (1, 2) or dims[1:] not in ([], [1]):
            raise InvalidInput(f"input {name!r}: a DT_STRING tensor of images has shape "
                               f"[N] or [N, 1], got {dims}")
        check_batch(dims[0], limits)
        if len(tensor.string_val) != count:
            raise InvalidInput(f"input {name!r}: shape {dims} but {len(tensor.string_val)} "
                               "strings")
        return from_images(list(tensor.string_val), limits, preprocess=True)
    if tensor.dtype not in NUMERIC:
        raise InvalidInput(f"input {name!r}: dtype {types_pb2.DataType.Name(tensor.dtype)} "
                           "is not supported; send DT_FLOAT, DT_DOUBLE, DT_HALF or DT_UINT8 "
                           "digits, or DT_STRING encoded images")
    field, dtype = NUMERIC[tensor.dtype]
    if tensor.tensor_content:
        size = count * np.dtype(dtype).itemsize
        if len(tensor.tensor_content) != size:
            raise InvalidInput(f"input {name!r}: shape {dims} needs {size} bytes of "
                               f"tensor_content, got {len(tensor.tensor_content)}")
        array = np.frombuffer(tensor.tensor_content, dtype)
    else:
        values = getattr(tensor, field)
        if len(values) != count:
            raise InvalidInput(f"input {name!r}: shape {dims} holds {count} values, "
                               f"{field} has {len(values)}")
        array = np.asarray(values)
        if tensor.dtype == types_pb2.DT_HALF:  # half_val holds each value's 16 bits
            array = array.astype("<u2").view("<f2")
        elif tensor.dtype == types_pb2.DT_UINT8:
            if array.size and (array.min() < 0 or array.max() > 255):
                raise InvalidInput(f"input {name!r}: DT_UINT8 values must lie in 0..255")
            array = array.astype("u1")
    return from_numbers(array.reshape(dims), limits, f"input {name!r}")


def read_predict(request: predict_pb2.PredictRequest, limits: Limits, model: LoadedModel
                 ) -> np.ndarray:
    """A PredictRequest → images; the signature, input and output names checked first."""
    _check_signature({"signature_name": request.model_spec.signature_name})
    if list(request.inputs) != [model.input_name]:
        raise InvalidInput(f"inputs: expected the model's input {model.input_name!r}, got "
                           f"{[key[:40] for key in list(request.inputs)[:3]]}")
    unknown = [name[:40] for name in request.output_filter if name != model.output_name]
    if unknown:
        raise InvalidInput(f"output_filter: the model has one output, "
                           f"{model.output_name!r}; got {unknown[:3]}")
    return images_of(request.inputs[model.input_name], model.input_name, limits)


def spec_of(model: LoadedModel, signature: str = SIGNATURE) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=model.name, signature_name=signature)
    spec.version.value = model.version
    return spec


def predict_response(model: LoadedModel, probabilities: np.ndarray
                     ) -> predict_pb2.PredictResponse:
    """The output in ``float_val``, as TF Serving answers (clients read it directly)."""
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=
                                    tensor_shape_pb2.TensorShapeProto(dim=[
                                        tensor_shape_pb2.TensorShapeProto.Dim(size=size)
                                        for size in probabilities.shape]))
    tensor.float_val.extend(probabilities.ravel().tolist())
    return predict_pb2.PredictResponse(model_spec=spec_of(model),
                                       outputs={model.output_name: tensor})


def metadata_response(model: LoadedModel, fields: list[str]
                      ) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """The SignatureDefs read from saved_model.pb, packed as TF Serving packs them."""
    if list(fields) != [SIGNATURE_DEF]:
        raise InvalidInput(f"metadata_field must be [{SIGNATURE_DEF!r}], the one field "
                           f"served; got {[name[:40] for name in fields][:3]}")
    signatures = json_format.ParseDict({"signature_def": model.signature_defs},
                                       get_model_metadata_pb2.SignatureDefMap())
    response = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=spec_of(model, ""))
    response.metadata[SIGNATURE_DEF].Pack(signatures)
    return response


def status_response(models: list[LoadedModel]) -> get_model_status_pb2.GetModelStatusResponse:
    """Every listed version is loaded, hence AVAILABLE with an OK status (as over REST)."""
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return get_model_status_pb2.GetModelStatusResponse(model_version_status=[
        get_model_status_pb2.ModelVersionStatus(version=model.version, state=available,
                                                status=status_pb2.StatusProto())
        for model in models])
