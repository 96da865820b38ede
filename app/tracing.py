"""OpenTelemetry traces of inference requests, off unless the standard ``OTEL_*``
variables turn them on.

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
(and neither ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none``): each worker
then builds its own TracerProvider in the app factory, after gunicorn's fork (a
BatchSpanProcessor's export thread does not survive a fork), exporting over OTLP/HTTP
with protobuf; gunicorn's ``worker_exit`` flushes it. Everything else (service name,
resource attributes, sampler, batch sizes, headers, timeouts) the SDK reads from its own
variables, so these are read here and not in app/config.py. Off, nothing of
OpenTelemetry is imported and a request pays one dictionary lookup.

One inference request (app/api/inference.py ``run_model``, every protocol) is a SERVER
span in its caller's trace (W3C ``traceparent`` from the headers or gRPC metadata),
named after its route (``POST /v2/models/<name>/infer``) or gRPC method, and returned to
the caller (a ``traceparent`` response header or trailing metadata). Under it:
``preprocess`` (reading and decoding the body), ``queue`` (admission to its batch's
model call) and ``model batch``: the model call, a child of its batch's first request,
with a link to every traced request it answered (the batch runs on the batcher's thread,
so each request's span is captured at admission and the spans of that thread are written
after the fact, with their real times). A request that fails before it reaches a model
(unknown model, bad token) gets no span.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from flask import Flask, Response, current_app, g, has_request_context, request

from app.config import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

    from app.servable import LoadedModel

DEFAULT_SERVICE = "mnist-serving"
MODEL_NAME, MODEL_VERSION = "inference.model.name", "inference.model.version"
BATCH_IMAGES = "inference.batch.images"
# gRPC codes that are the server's fault: its span's status is ERROR (OTel's gRPC
# conventions); the rest are the caller's.
GRPC_SERVER_ERRORS = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL",
                      "UNAVAILABLE", "DATA_LOSS"}
_NOTHING = nullcontext()
# Whether an app in this process traces: what the per-request path checks first, so
# that with tracing off a request pays a global lookup (a Flask proxy costs ~20 times
# more). Set once, in the worker, by init_app.
_active = False


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` asks for traces (see the module docstring); raises
    ConfigError for an exporter or protocol this server does not speak."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter == "none":
        return False
    if exporter != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER must be otlp or none, got {exporter!r}")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "http/protobuf").strip()
        if protocol != "http/protobuf":
            raise ConfigError(f"{name} must be http/protobuf (OTLP over HTTP), got "
                              f"{protocol!r}")
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """One worker's TracerProvider, exporting in batches over OTLP/HTTP."""

    def __init__(self) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import (
            SERVICE_NAME,
            SERVICE_VERSION,
            OTELResourceDetector,
            Resource,
        )
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from app import __version__

        defaults = {SERVICE_NAME: DEFAULT_SERVICE, SERVICE_VERSION: __version__}
        given = OTELResourceDetector().detect().attributes  # OTEL_SERVICE_NAME and co.
        resource = Resource.create({key: value for key, value in defaults.items()
                                    if key not in given})
        resource = _hashed(Resource)(resource.attributes, resource.schema_url)
        self.provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer(__name__, __version__)

    def shutdown(self) -> None:
        """Export what is still queued, then stop the export thread."""
        self.provider.shutdown()


def _hashed(resource_class: type) -> type:
    """``resource_class`` (the SDK's Resource) hashed once, not at each use: the OTLP
    encoder groups every span it exports by its resource's hash, and the SDK's hash
    dumps the attributes to JSON each time, a seventh of the export thread's work
    (BENCHMARKS.md, "Tracing"). A Resource is immutable: the same hash every time."""

    class HashedResource(resource_class):
        @cached_property
        def _hash(self) -> int:
            return super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedResource


def init_app(app: Flask) -> None:
    """Trace ``app``'s inference requests when the OTEL_* variables ask for it."""
    global _active
    if not enabled(os.environ):
        return
    app.extensions["tracing"] = Tracing()
    _active = True
    app.after_request(_end_http)


def shutdown(app: Flask | None) -> None:
    """Flush ``app``'s traces, if it traces (gunicorn's ``worker_exit``)."""
    tracing = getattr(app, "extensions", {}).get("tracing")
    if tracing is not None:
        tracing.shutdown()


class RequestTrace:
    """One traced request's server span and the stages recorded under it. The model's
    name and version are attributes of the server span and of the batch's, not of the
    stages: each attribute costs every span that carries it (BENCHMARKS.md, "Tracing")."""

    def __init__(self, tracer: Tracer, span: Span, context: Context,
                 attributes: dict[str, Any]):
        self.tracer, self.span, self.context, self.attributes = (
            tracer, span, context, attributes)

    def stage(self, name: str) -> Any:
        """A child span for ``with``: ended on exit, ERROR if an exception leaves it."""
        return self.tracer.start_span(name, context=self.context, record_exception=False)

    def admission(self) -> Any:
        """For ``with`` around the model's ``run``: a batcher admitting a request in this
        thread captures it (``admitted``) for the queue and batch spans."""
        return _Admitting(self)


class _Untraced:
    """What an untraced request gets: stages that do nothing."""

    def stage(self, name: str) -> nullcontext:
        return _NOTHING

    def admission(self) -> nullcontext:
        return _NOTHING


UNTRACED = _Untraced()
_admitting: ContextVar[RequestTrace | None] = ContextVar("trace_admitting", default=None)


class _Admitting:
    def __init__(self, trace: RequestTrace):
        self.trace = trace

    def __enter__(self) -> None:
        self.token = _admitting.set(self.trace)

    def __exit__(self, *exc: object) -> None:
        _admitting.reset(self.token)


def request_trace(model: LoadedModel) -> RequestTrace | _Untraced:
    """Start this request's server span (REST or gRPC, in its caller's trace) when
    tracing is on; it ends when the answer is written (``_end_http``, ``end_rpc``)."""
    if not _active:
        return UNTRACED
    tracing: Tracing | None = current_app.extensions.get("tracing")
    if tracing is None:
        return UNTRACED
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind

    state = g._get_current_object()  # one proxy lookup, not one per use (~1 µs each)
    if has_request_context():
        http = request._get_current_object()
        route = http.url_rule.rule if http.url_rule else http.path
        name, carrier = f"{http.method} {route}", http.headers
        attributes = {"http.request.method": http.method, "http.route": route}
    else:  # a gRPC call: app/api/grpc_common.py's ``rpc`` put it in ``g``
        service, method, context = state.rpc
        name, carrier = f"{service}/{method}", dict(context.invocation_metadata() or ())
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    model_attributes = {MODEL_NAME: model.name, MODEL_VERSION: model.version}
    now = time.perf_counter()  # the request's start, app/logs.py's stamp, as wall time
    started = time.time_ns() - round((now - state.get("started", now)) * 1e9)
    span = tracing.tracer.start_span(
        name, context=propagate.extract(carrier), kind=SpanKind.SERVER, start_time=started,
        attributes={**attributes, **model_attributes,
                    "inference.request_id": state.get("request_id", "")})
    state.trace_span = span, trace.set_span_in_context(span)  # the context: its children's
    if not span.is_recording():  # not sampled: its context is still returned
        return UNTRACED
    return RequestTrace(tracing.tracer, *state.trace_span, model_attributes)


def _end_http(response: Response) -> Response:
    """End the request's span with its status; ``traceparent`` in the response."""
    traced = g.pop("trace_span", None)
    if traced is not None:
        from opentelemetry.trace import StatusCode

        span, context = traced
        span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code >= 500:
            span.set_status(StatusCode.ERROR)
        _inject(context, response.headers)
        span.end()
    return response


def end_rpc(code: Any) -> list[tuple[str, str]]:
    """End a gRPC call's span with its status code (a ``grpc.StatusCode``); the
    trailing metadata that returns its context (none when untraced)."""
    traced = g.pop("trace_span", None) if _active else None
    if traced is None:
        return []
    from opentelemetry.trace import StatusCode

    span, context = traced
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code.name in GRPC_SERVER_ERRORS:
        span.set_status(StatusCode.ERROR)
    carrier: dict[str, str] = {}
    _inject(context, carrier)
    span.end()
    return list(carrier.items())


def _inject(context: Context, carrier: Any) -> None:
    from opentelemetry import propagate

    propagate.inject(carrier, context=context)


@dataclass(eq=False)
class Admission:
    """A traced request as a batcher admitted it: when, and whether its queue span
    has been written (a failed batch re-runs its requests one by one)."""

    trace: RequestTrace
    at: int = field(default_factory=time.time_ns)
    queued: bool = False


def admitted() -> Admission | None:
    """The traced request this thread is admitting now (None when untraced)."""
    trace = _admitting.get() if _active else None
    return None if trace is None else Admission(trace)


def model_call(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
               admissions: list[Admission | None]) -> np.ndarray:
    """``predict(images)`` for the requests admitted as ``admissions``; when any is
    traced, its queue span and the call's ``model batch`` span are written."""
    if not (_active and any(admissions)):
        return predict(images)
    traced = [admission for admission in admissions if admission is not None]
    started = time.time_ns()
    try:
        outputs = predict(images)
    except BaseException:
        _record_batch(traced, started, len(images), failed=True)
        raise
    _record_batch(traced, started, len(images), failed=False)
    return outputs


def _record_batch(traced: list[Admission], started: int, images: int, failed: bool) -> None:
    """The queue span of each request not yet written, then the batch's span: a child
    of its first traced request, linked to every one."""
    from opentelemetry.trace import Link, StatusCode

    ended = time.time_ns()
    first = traced[0].trace
    for admission in traced:
        if not admission.queued:
            admission.queued = True
            trace = admission.trace
            trace.tracer.start_span("queue", context=trace.context,
                                    start_time=admission.at).end(started)
    span = first.tracer.start_span(
        "model batch", context=first.context, start_time=started,
        links=[Link(admission.trace.span.get_span_context()) for admission in traced],
        attributes={**first.attributes, BATCH_IMAGES: images})
    if failed:
        span.set_status(StatusCode.ERROR)
    span.end(ended)
