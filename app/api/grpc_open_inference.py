"""``inference.GRPCInferenceService``: the Open Inference Protocol's gRPC methods, each
the counterpart of a /v2 view (app/api/open_inference.py) and answering as it does.

Methods of Triton's superset that this server has no use for (shared memory, model
load/unload, tracing, streaming) are not registered: gRPC answers them UNIMPLEMENTED.
"""

from __future__ import annotations

from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from app import SERVICE_NAME, __version__
from app.api.common import metrics, ready_store, resolve, store
from app.api.grpc_common import Servicer, client_metadata, rpc
from app.api.inference import Parsed, limits, run_model
from app.errors import ModelNotFound, ModelNotReady
from app.protocols import grpc_open_inference as protocol
from app.protocols.open_inference import EXTENSIONS
from app.statistics import model_statistics, served

SERVICE = protocol.SERVICE


class OpenInferenceServicer(Servicer, service_pb2_grpc.GRPCInferenceServiceServicer):
    @rpc(SERVICE)
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc(SERVICE)
    def ServerReady(self, request, context):
        """Ready when the default model is loaded and no batcher died: a plain false
        otherwise, as Triton answers (its client reads the field, not a status)."""
        try:
            ready_store()
        except ModelNotReady:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    @rpc(SERVICE)
    def ModelReady(self, request, context):
        """True once the model (version) is loaded; NOT_FOUND for a model never served,
        as over REST; false while it cannot answer."""
        try:
            store().get(request.name, protocol.version_of(request.version))
        except ModelNotReady:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc(SERVICE)
    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVICE_NAME, version=__version__,
                                         extensions=EXTENSIONS)

    @rpc(SERVICE)
    def ModelMetadata(self, request, context):
        models = store()
        model = models.get(request.name, protocol.version_of(request.version))
        versions = models.versions.get(model.name, {model.version: model})
        return protocol.metadata_response(model, list(versions))

    @rpc(SERVICE)
    def RepositoryIndex(self, request, context):
        if request.repository_name:
            raise ModelNotFound(f"no repository named {request.repository_name[:40]!r}: "
                                "this server has one, named \"\"")
        return protocol.index_response(store().index(), request.ready)

    @rpc(SERVICE)
    def ModelStatistics(self, request, context):
        """The statistics extension, the REST answer parsed into its message."""
        models = served(store(), request.name or None, protocol.version_of(request.version))
        return json_format.ParseDict(model_statistics(metrics(), models),
                                     pb.ModelStatisticsResponse())

    @rpc(SERVICE)
    def ModelInfer(self, request, context):
        model = resolve(request.model_name or None, protocol.version_of(request.model_version),
                        client=client_metadata(context))
        bounds = limits()
        parsed, probabilities = run_model(
            model, lambda: Parsed(*protocol.read_infer(request, bounds, model)))
        return protocol.infer_response(model, parsed.details, probabilities)
