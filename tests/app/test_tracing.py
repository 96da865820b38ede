"""OpenTelemetry traces (app/tracing.py) through a real gunicorn to a real OTLP/HTTP
receiver: a loopback HTTP server that decodes each POST /v1/traces as the protobuf
``ExportTraceServiceRequest`` the OTLP specification defines, as a collector would.
"""

from __future__ import annotations

import http.server
import io
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
from flask import Flask
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from tritonclient.grpc import service_pb2, service_pb2_grpc

from app import create_app, tracing
from app.config import Config, ConfigError
from tests.conftest import hold_model, serving, start_server, stop_server, wait_until

MODEL = "mnist_cnn"
EXPORT_THREAD = "OtelBatchSpan"  # the SDK's BatchSpanProcessor thread


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: every span it was sent, with its resource."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.spans: list[tuple[dict[str, str], Span]] = []
        self.paths: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def trace(self, trace_id: str) -> list[Span]:
        return [span for _, span in self.spans if span.trace_id.hex() == trace_id]


class ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.paths.append(self.path)
        exported = ExportTraceServiceRequest.FromString(body)
        for resource_spans in exported.resource_spans:
            resource = {kv.key: kv.value.string_value
                        for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.server.spans.extend((resource, span) for span in scope_spans.spans)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def receiver():
    with serving(Receiver()) as running:
        yield running


@pytest.fixture(scope="module")
def traced(served_models, receiver, tmp_path_factory):
    """gunicorn (one worker, gRPC on) exporting every span to ``receiver`` at once."""
    running = start_server(served_models, tmp_path_factory.mktemp("traced") / "g.log",
                           WORKERS="1", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                           OTEL_BSP_SCHEDULE_DELAY="100", OTEL_SERVICE_NAME="digits-test",
                           OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test")
    yield running
    stop_server(running)
    assert "Traceback" not in running.log(), running.log()[-3000:]


def caller() -> tuple[str, str, str]:
    """A caller's trace id, span id and the W3C traceparent header naming them."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def attributes(span: Span) -> dict[str, object]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def v2_body(mnist) -> dict:
    images = (mnist.x_test[:2] / 255.0).astype(np.float32)
    return {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 28, 28, 1],
                        "data": images.ravel().tolist()}]}


def grpc_request(mnist) -> service_pb2.ModelInferRequest:
    images = (mnist.x_test[:1] / 255.0).astype("<f4")
    return service_pb2.ModelInferRequest(
        model_name=MODEL, raw_input_contents=[images.tobytes()],
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype="FP32", shape=[1, 28, 28])])


def test_a_request_is_traced_in_the_callers_trace_through_preprocess_queue_and_model(
        traced, receiver, mnist):
    trace_id, parent_id, traceparent = caller()
    response = requests.post(f"{traced.url}/v2/models/{MODEL}/infer", json=v2_body(mnist),
                             headers={"traceparent": traceparent}, timeout=30)
    assert response.status_code == 200, response.text
    wait_until(lambda: {"preprocess", "queue", "model batch"}
               <= {span.name for span in receiver.trace(trace_id)}, "the spans exported")
    spans = {span.name: span for span in receiver.trace(trace_id)}
    server = spans["POST /v2/models/<name>/infer"]
    assert server.parent_span_id.hex() == parent_id
    assert server.kind == Span.SPAN_KIND_SERVER
    assert attributes(server) | {"http.response.status_code": 200} == attributes(server)
    for name in ("preprocess", "queue", "model batch"):
        assert spans[name].parent_span_id == server.span_id, name
    batch = spans["model batch"]
    for span in (server, batch):
        assert attributes(span)["inference.model.name"] == MODEL
        assert attributes(span)["inference.model.version"] == 1
    assert [(link.trace_id.hex(), link.span_id) for link in batch.links] == [
        (trace_id, server.span_id)]
    assert attributes(batch)["inference.batch.images"] == 2
    assert (server.start_time_unix_nano <= spans["preprocess"].start_time_unix_nano
            <= spans["preprocess"].end_time_unix_nano <= spans["queue"].start_time_unix_nano
            <= spans["queue"].end_time_unix_nano <= batch.start_time_unix_nano
            <= batch.end_time_unix_nano <= server.end_time_unix_nano)
    assert response.headers["traceparent"].split("-")[1:3] == [trace_id, server.span_id.hex()]
    resource = next(resource for resource, span in receiver.spans if span == server)
    assert resource["service.name"] == "digits-test"
    assert resource["deployment.environment"] == "test"
    assert set(receiver.paths) == {"/v1/traces"}


def test_a_grpc_call_is_traced_in_the_callers_trace(traced, receiver, mnist):
    trace_id, parent_id, traceparent = caller()
    with grpc.insecure_channel(traced.grpc) as channel:
        _, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            grpc_request(mnist), metadata=[("traceparent", traceparent)], timeout=30)
    name = "inference.GRPCInferenceService/ModelInfer"
    wait_until(lambda: {name, "model batch"} <= {span.name for span in receiver.trace(trace_id)},
               "the gRPC call's spans exported")
    server = next(span for span in receiver.trace(trace_id) if span.name == name)
    assert server.parent_span_id.hex() == parent_id
    assert attributes(server)["rpc.grpc.status_code"] == 0
    trailers = dict(call.trailing_metadata())
    assert trailers["traceparent"].split("-")[1:3] == [trace_id, server.span_id.hex()]


def queued(app) -> float:
    """Requests waiting for a batch of the default model, read from /metrics."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    match = re.search(r'^model_queue_requests\{model="mnist_cnn"\} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_queued_requests_share_one_batch_span_linked_to_each(served_models, receiver,
                                                             monkeypatch, mnist):
    """The real app and batcher in process: one request holds the model while three
    queue; their batch runs on the batcher's thread as one model call."""
    monkeypatch.setattr(tracing, "_active", False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    app = create_app(Config(models_dir=served_models, model_poll_seconds=0))
    gate, calls = hold_model(app)
    callers = [caller() for _ in range(4)]
    buffer = io.BytesIO()
    np.save(buffer, mnist.x_test[:1])

    def post(traceparent: str) -> int:
        return app.test_client().post("/predict", data=buffer.getvalue(), headers={
            "traceparent": traceparent, "Content-Type": "application/x-npy"}).status_code

    try:
        with ThreadPoolExecutor(4) as pool:
            statuses = [pool.submit(post, callers[0][2])]
            wait_until(lambda: calls, "the first model call")
            statuses += [pool.submit(post, traceparent) for _, _, traceparent in callers[1:]]
            wait_until(lambda: queued(app) >= 3, "3 requests queued")
            gate.set()
            assert [status.result(60) for status in statuses] == [200] * 4
        assert calls == [1, 3]
        wait_until(lambda: all(len(receiver.trace(trace_id)) >= 3
                               for trace_id, _, _ in callers[1:]), "the batch's traces")
    finally:
        gate.set()
        tracing.shutdown(app)
        app.extensions["model_store"].close()
    servers = {trace_id: next(span for span in receiver.trace(trace_id)
                              if span.kind == Span.SPAN_KIND_SERVER)
               for trace_id, _, _ in callers[1:]}
    batch = next(span for _, span in receiver.spans if span.name == "model batch"
                 and span.trace_id.hex() in servers)
    assert sorted((link.trace_id.hex(), link.span_id) for link in batch.links) == sorted(
        (trace_id, span.span_id) for trace_id, span in servers.items())
    assert attributes(batch)["inference.batch.images"] == 3
    for trace_id in servers:
        queue = next(span for span in receiver.trace(trace_id) if span.name == "queue")
        assert queue.end_time_unix_nano == batch.start_time_unix_nano


def test_a_server_without_otel_settings_returns_no_trace_context(server, mnist):
    _, _, traceparent = caller()
    response = requests.post(f"{server.url}/v2/models/{MODEL}/infer", json=v2_body(mnist),
                             headers={"traceparent": traceparent}, timeout=30)
    assert response.status_code == 200
    assert "traceparent" not in response.headers
    with grpc.insecure_channel(server.grpc) as channel:
        _, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            grpc_request(mnist), metadata=[("traceparent", traceparent)], timeout=30)
    assert "traceparent" not in dict(call.trailing_metadata())


def exporting_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate()
            if thread.name.startswith(EXPORT_THREAD)]


def test_without_an_endpoint_the_factory_starts_no_exporter(receiver, monkeypatch):
    """What a worker's ``create_app`` runs (``init_app``), here in process: no exporter
    and no hook unless an endpoint is set; with one, both, until ``shutdown``."""
    monkeypatch.setattr(tracing, "_active", False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "digits-test")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    before = exporting_threads()
    plain = Flask(__name__)
    tracing.init_app(plain)
    assert "tracing" not in plain.extensions and not plain.after_request_funcs
    assert exporting_threads() == before and not tracing._active
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    traced = Flask(__name__)
    tracing.init_app(traced)
    assert len(exporting_threads()) == len(before) + 1 and traced.after_request_funcs
    tracing.shutdown(traced)
    assert exporting_threads() == before


@pytest.mark.parametrize("environ, on", [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"},
     False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"},
     False),
])
def test_tracing_is_on_only_when_an_otlp_endpoint_is_set_and_the_sdk_not_disabled(environ, on):
    assert tracing.enabled(environ) is on


@pytest.mark.parametrize("name, value", [("OTEL_TRACES_EXPORTER", "zipkin"),
                                         ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                                         ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")])
def test_an_exporter_this_server_does_not_speak_is_refused_by_name(name, value):
    with pytest.raises(ConfigError, match=name):
        tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", name: value})
