"""``tensorflow.serving.PredictionService`` (Predict, GetModelMetadata) and
``tensorflow.serving.ModelService`` (GetModelStatus), each the counterpart of a /v1 view
(app/api/tf_serving.py). Importing this module imports TensorFlow (through
tensorflow-serving-api's messages); app/grpc_server.py skips it where that fails.

Classify, Regress and MultiInference need a signature this model does not have, and
HandleReloadConfigRequest would load models by request (they load by watching
MODELS_DIR): they are not registered, and gRPC answers them UNIMPLEMENTED.
"""

from __future__ import annotations

from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from app.api.common import resolve, store
from app.api.grpc_common import Servicer, client_metadata, rpc
from app.api.inference import Parsed, limits, run_model
from app.protocols import grpc_tf_serving as protocol

PREDICTION = "tensorflow.serving.PredictionService"
MODELS = "tensorflow.serving.ModelService"


class PredictionServicer(Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):
    @rpc(PREDICTION)
    def Predict(self, request, context):
        spec = request.model_spec
        model = resolve(spec.name or None, protocol.version_of(spec), protocol.label_of(spec),
                        client_metadata(context))
        bounds = limits()
        _, probabilities = run_model(
            model, lambda: Parsed(protocol.read_predict(request, bounds, model)))
        return protocol.predict_response(model, probabilities)

    @rpc(PREDICTION)
    def GetModelMetadata(self, request, context):
        spec = request.model_spec
        model = resolve(spec.name or None, protocol.version_of(spec), protocol.label_of(spec))
        return protocol.metadata_response(model, list(request.metadata_field))


class ModelServicer(Servicer, model_service_pb2_grpc.ModelServiceServicer):
    @rpc(MODELS)
    def GetModelStatus(self, request, context):
        """All loaded versions, or the one asked for, as the REST status does."""
        models = store()
        version = protocol.version_of(request.model_spec)
        name = request.model_spec.name
        chosen = [models.get(name, version)] if version is not None else \
            list(models.versions.get(name or models.default_name, {}).values()) or \
            [models.get(name)]
        return protocol.status_response(chosen)
