"""Typed errors that say which HTTP status they mean, mapped to JSON in one place.

Code below the views raises these and never builds a response; ``register`` turns them,
and Werkzeug's own HTTP errors, into ``{"error": {"code", "message"}}`` — or, under the
TensorFlow Serving (``/v1/``) and Open Inference Protocol (``/v2``) paths, into the
``{"error": "<message>"}`` both of those protocols define, which their clients parse.
Anything else is a bug: logged once with its traceback and answered 500 without internals.
Over gRPC (app/grpc_server.py) the same errors become status codes: ``grpc_code``.
"""

from __future__ import annotations

import logging

import grpc
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

log = logging.getLogger(__name__)
DRAIN_FACTOR = 4  # an over-limit body up to 4 × MAX_CONTENT_LENGTH is read, then answered
DRAIN_CHUNK = 1 << 16


class ApiError(Exception):
    """Base of every error the API answers on purpose."""

    status = 500
    code = "internal_error"
    retry_after: int | None = None  # seconds, sent as Retry-After when set

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = {}  # sent with the answer (WWW-Authenticate, …)


class InvalidInput(ApiError):
    """The request cannot be read: unreadable image, empty body, malformed JSON."""

    status, code = 400, "invalid_input"


def bearer_challenge(realm: str, error: str | None = None, scope: str | None = None) -> str:
    """RFC 6750's WWW-Authenticate value: ``Bearer realm="…"`` plus the error and scope."""
    parts = [f'realm="{realm}"']
    if error:
        parts.append(f'error="{error}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(parts)


class Unauthenticated(ApiError):
    """No bearer token, a malformed one, or one not listed in AUTH_TOKENS_FILE (app/auth.py).
    gRPC: UNAUTHENTICATED."""

    status, code = 401, "unauthenticated"

    def __init__(self, message: str, realm: str, error: str | None = None):
        super().__init__(message)
        self.headers["WWW-Authenticate"] = bearer_challenge(realm, error)


class PermissionDenied(ApiError):
    """A listed token without the scope the endpoint needs. gRPC: PERMISSION_DENIED."""

    status, code = 403, "permission_denied"

    def __init__(self, message: str, realm: str, scope: str):
        super().__init__(message)
        self.headers["WWW-Authenticate"] = bearer_challenge(realm, "insufficient_scope", scope)


class ModelNotFound(ApiError):
    status, code = 404, "model_not_found"


class PayloadTooLarge(ApiError):
    """Body (after decompression) over MAX_CONTENT_LENGTH, or more images than MAX_BATCH."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class UnprocessableInput(ApiError):
    """Readable, but not a valid digit image: wrong shape, NaN, out of range, too big."""

    status, code = 422, "unprocessable_input"


class ModelNotReady(ApiError):
    status, code = 503, "model_not_ready"


class Overloaded(ApiError):
    """The model's queue is full: shed the request now, as TF Serving, Triton and Ray do,
    rather than answer it late; ``Retry-After`` tells clients to back off."""

    status, code = 503, "overloaded"
    retry_after = 1


class DeadlineExceeded(ApiError):
    """The request's deadline (REQUEST_TIMEOUT_MS) passed before it could be answered."""

    status, code = 504, "deadline_exceeded"


class ModelFailed(ApiError):
    """The model raised on valid input: a server fault, reported as one."""

    status, code = 500, "model_error"


# Each HTTP status an ApiError carries, as the gRPC status code the anchors answer it with.
# Bad input of any kind (400, 413, 415, 422) is INVALID_ARGUMENT, as Triton answers a
# batch over its limit: the client must change the request, and retrying cannot help.
# A full queue (503 Overloaded) is UNAVAILABLE, as TF Serving's batch scheduler and
# Triton's dynamic batcher answer it, and as gRPC maps HTTP 503: the one code gRPC's own
# retry policies and clients treat as "retry with backoff"; RESOURCE_EXHAUSTED is left to
# gRPC's own limits (a message over MAX_CONTENT_LENGTH, too many concurrent calls).
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
              413: grpc.StatusCode.INVALID_ARGUMENT, 415: grpc.StatusCode.INVALID_ARGUMENT,
              422: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE,
              504: grpc.StatusCode.DEADLINE_EXCEEDED}


def grpc_code(err: ApiError) -> grpc.StatusCode:
    """The gRPC status for an ApiError; INTERNAL only for a server fault (500)."""
    return GRPC_CODES.get(err.status, grpc.StatusCode.INTERNAL)


def http_error_code(err: HTTPException) -> str:
    """Werkzeug's error as a code: its name ("Bad Request" → ``bad_request``)."""
    return (err.name or "error").lower().replace(" ", "_")


def error_code(err: BaseException) -> str:
    """The code a failure is answered with, from a fixed set (metrics label with it):
    an ApiError's own, Werkzeug's by name (a body over MAX_CONTENT_LENGTH is
    ``payload_too_large``), ``internal_error`` for anything else."""
    if isinstance(err, ApiError):
        return err.code
    if isinstance(err, RequestEntityTooLarge):
        return PayloadTooLarge.code
    return http_error_code(err) if isinstance(err, HTTPException) else "internal_error"


def error_body(code: str, message: str) -> dict:
    """Our shape, or the protocols' plain one for a request under their paths.

    A message may quote what the client sent; text that is not Unicode (a lone surrogate
    such as ``\\ud800``) is quoted as its escape, so the answer can always be encoded.
    """
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    path = request.path
    if path == "/v2" or path.startswith(("/v1/", "/v2/")):
        return {"error": message}
    return {"error": {"code": code, "message": message}}


def drain_body(most: int) -> bool:
    """Read and discard the rest of an over-limit body of at most ``most`` bytes; False
    (nothing read) for a larger or unsized one.

    A server that answers 413 and closes while the client is still sending makes the
    client's kernel see a reset, and most clients (Python's urllib and requests among
    them) then report a broken connection, never the 413. Reading a bounded amount costs
    network time, no memory; past that bound the connection is closed, as HTTP allows.
    """
    length = request.content_length
    stream = request.environ.get("wsgi.input")
    if length is None or length > most or stream is None:
        return False
    while stream.read(DRAIN_CHUNK):
        pass
    return True


def register(app: Flask) -> None:
    """Attach the handlers; called once by the app factory."""

    @app.errorhandler(ApiError)
    def handle_api_error(err: ApiError):
        response = jsonify(error_body(err.code, err.message))
        response.status_code = err.status
        if err.retry_after is not None:
            response.headers["Retry-After"] = str(err.retry_after)
        response.headers.update(err.headers)
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def handle_too_large(err: RequestEntityTooLarge):
        limit = app.config.get("MAX_CONTENT_LENGTH")
        response = jsonify(error_body(
            PayloadTooLarge.code, f"request body is larger than the limit of {limit} bytes"))
        response.status_code = 413
        if not drain_body(DRAIN_FACTOR * (limit or 0)):
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(HTTPException)
    def handle_http_error(err: HTTPException):
        response = jsonify(error_body(http_error_code(err), err.description or err.name))
        response.status_code = err.code or 500
        allowed = getattr(err, "valid_methods", None)
        if allowed:  # a 405 names the methods that would work, as HTTP requires
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.errorhandler(Exception)
    def handle_unexpected(err: Exception):
        log.exception("unhandled error")
        return jsonify(error_body("internal_error", "internal server error")), 500
