"""The gRPC server beside REST: one per gunicorn worker, on the same port (GRPC_PORT).

gRPC's core starts threads and polling machinery that a ``fork()`` does not carry over,
so nothing of gRPC is created in the gunicorn master: each worker starts its own server
after the fork, once its app (store, batchers) is built (``post_worker_init`` in
app/gunicorn.conf.py), and every worker binds GRPC_PORT with ``SO_REUSEPORT``
(``grpc.so_reuseport``), so the kernel spreads new connections over the workers as
gunicorn's shared socket spreads HTTP ones. A server in its own process would need a
second copy of every model and batcher; a server in the master would not survive the
fork. Since SO_REUSEPORT would as well let a *second* server's workers share the port,
the master first checks that GRPC_PORT is free (app/grpc_port.py) and refuses to
start otherwise, as it does for PORT.

Services: ``inference.GRPCInferenceService`` (app/api/grpc_open_inference.py), TF
Serving's ``PredictionService`` and ``ModelService`` where TensorFlow imports
(app/api/grpc_tf_serving.py), ``grpc.health.v1.Health`` (overall and per model: the
name of each served model, SERVING while it has a loaded version) and server reflection.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from flask import Flask
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from app.api.grpc_common import add_servicer
from app.api.grpc_open_inference import OpenInferenceServicer
from app.config import Config
from app.grpc_port import PortTaken
from app.model_store import ModelStore
from app.protocols.grpc_open_inference import OPEN_INFERENCE

log = logging.getLogger(__name__)
HEALTH_SECONDS = 1.0  # how often the health service follows the store's models
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthFollower:
    """Keeps the health service's statuses in step with the store, every HEALTH_SECONDS:
    "" (the server) and each service SERVING while the default model is ready, and each
    model name SERVING while it has a loaded version, NOT_SERVING once it has none."""

    def __init__(self, servicer: health.HealthServicer, store: ModelStore, services: list[str]):
        self.servicer, self.store, self.services = servicer, store, services
        self._known: set[str] = set()
        self._stop = threading.Event()
        self.sync()
        self._thread = threading.Thread(target=self._run, name="grpc-health", daemon=True)
        self._thread.start()

    def sync(self) -> None:
        overall = SERVING if self.store.ready else NOT_SERVING
        for service in ["", *self.services]:
            self.servicer.set(service, overall)
        loaded = set(self.store.versions)
        for name in self._known | loaded:
            self.servicer.set(name, SERVING if name in loaded else NOT_SERVING)
        self._known |= loaded

    def _run(self) -> None:
        while not self._stop.wait(HEALTH_SECONDS):
            try:
                self.sync()
            except Exception:  # a failed sync must not end the follower
                log.exception("the gRPC health statuses could not be updated")

    def stop(self) -> None:
        self._stop.set()
        self.servicer.enter_graceful_shutdown()


class GrpcServer:
    """A started gRPC server and its health follower; ``stop`` ends both."""

    def __init__(self, server: grpc.Server, follower: HealthFollower, port: int):
        self.server, self.follower, self.port = server, follower, port

    def stop(self, grace: float) -> None:
        """Refuse new calls, let those in flight finish for up to ``grace`` seconds."""
        self.follower.stop()
        self.server.stop(grace).wait(grace + 1)


def _tf_serving_servicers(app: Flask) -> list[tuple]:
    """(servicer, service descriptor) for TF Serving's two services, or none (with a
    log line) where TensorFlow is missing."""
    try:
        from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

        from app.api.grpc_tf_serving import ModelServicer, PredictionServicer
    except ImportError as err:
        log.warning("TensorFlow Serving's gRPC API is off: %s", err)
        return []
    return [(PredictionServicer(app),
             prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]),
            (ModelServicer(app), model_service_pb2.DESCRIPTOR.services_by_name["ModelService"])]


def start(app: Flask) -> GrpcServer | None:
    """Serve gRPC for ``app`` on GRPC_PORT (None when it is 0). Its limits are REST's:
    messages up to MAX_CONTENT_LENGTH, THREADS calls at once per worker; past THREADS +
    QUEUE_MAX_REQUESTS calls gRPC itself answers RESOURCE_EXHAUSTED."""
    config: Config = app.extensions["config"]
    if not config.grpc_port:
        return None
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="grpc"),
        options=[("grpc.so_reuseport", 1),
                 ("grpc.max_receive_message_length", config.max_content_length)],
        maximum_concurrent_rpcs=config.threads + config.queue_max_requests)
    services = []
    for servicer, service in [(OpenInferenceServicer(app), OPEN_INFERENCE),
                              *_tf_serving_servicers(app)]:
        add_servicer(server, servicer, service)
        services.append(service.full_name)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"0.0.0.0:{config.grpc_port}")
    if port != config.grpc_port:
        raise PortTaken(f"GRPC_PORT {config.grpc_port} could not be bound")
    server.start()
    follower = HealthFollower(health_servicer, app.extensions["model_store"], services)
    log.info("gRPC serving on port %d: %s", port, ", ".join(services))
    return GrpcServer(server, follower, port)
