"""What every gRPC method shares with a REST view: the app context (store, settings,
metrics), the request's deadline, the error map, the metrics and the JSON access line.

``rpc`` wraps a servicer method: it runs inside the Flask app's context, so the method
calls the very functions the REST views call (``store()``, ``limits()``,
``run_model``); a typed ApiError becomes its status code (``app.errors.grpc_code``)
and anything else INTERNAL, logged once with its traceback, without internals.
``add_servicer`` registers the methods so that a request reaches ``rpc`` as its bytes
(``Unparsed``), parsed only once its token is checked, as a REST body is read only for
an authorized request; bytes that are no message become an ``Unreadable``, answered
INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from flask import Flask, g
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from app import tracing
from app.api.common import metrics, settings
from app.auth import check, only_one, rpc_scope
from app.batching import Deadline
from app.errors import ApiError, InvalidInput, grpc_code
from app.logs import access_log, request_id_from

log = logging.getLogger(__name__)
REQUEST_ID = "x-request-id"  # metadata keys are lower case in gRPC
MAX_DETAILS = 1024  # characters of an error's details; gRPC's metadata limit is 16 KiB


class Servicer:
    """Base of the servicers: they hold the app whose store and settings they use."""

    def __init__(self, app: Flask):
        self.app = app


class Unreadable:
    """A request whose bytes are no message of its type: gRPC would answer INTERNAL
    ("Exception deserializing request!") for it; ``rpc`` answers INVALID_ARGUMENT."""

    def __init__(self, data: bytes, error: str):
        self.size, self.error = len(data), error

    def ByteSize(self) -> int:
        return self.size


class Unparsed:
    """A request's bytes as gRPC received them, and how to parse them (``parse``, after
    the token check): a caller without a valid token costs no parsing."""

    def __init__(self, data: bytes, reader: Callable[[bytes], Any]):
        self.data, self.reader = data, reader

    def ByteSize(self) -> int:
        return len(self.data)

    def parse(self) -> Any:
        return self.reader(self.data)


def lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: bytes that do not parse (malformed
    protobuf, a string field that is not UTF-8) become an ``Unreadable``."""

    def read(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as err:
            return Unreadable(data, str(err)[:200])

    return read


def add_servicer(server: grpc.Server, servicer: Servicer, service: ServiceDescriptor) -> None:
    """Register the unary methods ``servicer``'s class defines (the rest stay
    UNIMPLEMENTED), each request handed over ``Unparsed``, to be read with ``lenient``."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming or \
                method.name not in vars(type(servicer)):
            continue
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=functools.partial(Unparsed, reader=lenient(request.FromString)),
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name,
                                                                          handlers),))


def _metadata(context: grpc.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key and isinstance(value, str):
            return value
    return None


def _deadline(context: grpc.ServicerContext, started: float) -> Deadline:
    """REQUEST_TIMEOUT_MS, or the client's own deadline when that comes sooner."""
    seconds = settings().request_timeout_ms / 1000.0
    remaining = context.time_remaining()
    if remaining is not None:
        seconds = min(seconds, remaining)
    return Deadline(seconds, started)


def rpc(service: str) -> Callable:
    """Decorate a servicer method of ``service`` (its full name) as described above."""

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def call(self: Servicer, request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            request_id = request_id_from(_metadata(context, REQUEST_ID))
            code, message, response = grpc.StatusCode.OK, "", None
            with self.app.app_context():
                g.started, g.request_id = started, request_id
                g.deadline = _deadline(context, started)
                g.rpc = (service, method.__name__, context)  # for app/tracing.py
                try:
                    authorize(self.app, method.__name__, context)
                    if isinstance(request, Unparsed):
                        request = request.parse()
                    if isinstance(request, Unreadable):
                        raise InvalidInput(f"the request is no valid {method.__name__} "
                                           f"message: {request.error}")
                    response = method(self, request, context)
                except ApiError as err:
                    code, message = grpc_code(err), err.message
                except Exception:
                    log.exception("unhandled error in %s/%s", service, method.__name__)
                    code, message = grpc.StatusCode.INTERNAL, "internal server error"
                _record(service, method.__name__, code, started, request, context, request_id)
                trailers = tracing.end_rpc(code)
            context.set_trailing_metadata(((REQUEST_ID, request_id), *trailers))
            if code is not grpc.StatusCode.OK:
                # Details travel as UTF-8: a quoted lone surrogate must not break them.
                # They travel in a trailer, too: one over the peer's metadata limit (16
                # KiB by default; a message may quote a client's name) loses the code.
                details = message.encode("utf-8", "backslashreplace").decode()
                if len(details) > MAX_DETAILS:
                    details = details[:MAX_DETAILS - 1] + "…"
                context.abort(code, details)
            return response

        return call

    return decorate


def client_metadata(context: grpc.ServicerContext) -> str | None:
    """The ``x-client-id`` metadata: which side of a canary split the caller keeps to."""
    return _metadata(context, "x-client-id")


def authorize(app: Flask, method: str, context: grpc.ServicerContext) -> None:
    """AUTH_TOKENS_FILE's check on the call's ``authorization`` metadata, as REST's on its
    header; raises Unauthenticated or PermissionDenied."""
    tokens = app.extensions.get("auth")
    scope = rpc_scope(method)
    if tokens is not None and scope is not None:
        check(tokens.current(), only_one([value for name, value in
                                          context.invocation_metadata() or ()
                                          if name == "authorization"]), scope)


def _record(service: str, method: str, code: grpc.StatusCode, started: float, request: Any,
            context: grpc.ServicerContext, request_id: str) -> None:
    """Count the call in /metrics and write the access line REST requests get."""
    seconds = time.perf_counter() - started
    metrics().observe_grpc(service, method, code.name, seconds)
    if not access_log.isEnabledFor(logging.INFO):
        return
    path = f"/{service}/{method}"
    access_log.info("GRPC %s %s", path, code.name, extra={
        "request_id": request_id, "method": "GRPC", "path": path, "status": code.name,
        "ms": round(seconds * 1000, 2), "bytes_in": request.ByteSize(),
        "remote": context.peer()})
