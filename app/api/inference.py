"""The one path every protocol's inference takes: body → images → model → probabilities.

/predict, TensorFlow Serving's ``:predict`` and the Open Inference Protocol's ``/infer``
differ only in how they read images out of a body and how they write the answer; the
body limits, decompression, micro-batching and metrics are here, once.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from flask import Response, after_this_request, current_app, g, has_request_context, request
from werkzeug.exceptions import RequestEntityTooLarge

from app import tracing
from app.api.common import metrics, settings, store
from app.batching import Deadline
from app.drift import observe_drift
from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from app.inputs import MULTIPART_TYPE, WBITS, Limits, decompress
from app.payload_log import log_payload
from app.preprocess import DecodeBudget
from app.servable import LoadedModel
from app.shadow import ShadowRunner

PREPROCESS_VALUES = {"auto": True, "none": False}
_budget_lock = threading.Lock()


class Parsed(NamedTuple):
    """A request body as read: its images in model form, and whatever else the protocol
    needs to write its answer (the requested outputs, the answer's format)."""

    images: np.ndarray
    details: Any = None


# Reads a request from its (decompressed) body and multipart file parts.
Reader = Callable[[bytes, list[bytes]], Parsed]


def preprocess_flag() -> bool:
    """``?preprocess=auto`` (default) or ``none``; raises InvalidInput otherwise."""
    value = request.args.get("preprocess", "auto")
    if value not in PREPROCESS_VALUES:
        raise InvalidInput(f"preprocess must be 'auto' or 'none', got {value!r}")
    return PREPROCESS_VALUES[value]


def request_deadline() -> Deadline:
    """This request's deadline, REQUEST_TIMEOUT_MS from when it started (app/logs.py
    stamps ``g.started``), made once so every stage shares it."""
    if "deadline" not in g:
        g.deadline = Deadline(settings().request_timeout_ms / 1000.0, g.get("started"))
    return g.deadline


def decode_budget() -> DecodeBudget:
    """The worker's one DecodeBudget (DECODE_BUDGET_PIXELS), made on first use."""
    extensions = current_app.extensions
    if "decode_budget" not in extensions:
        with _budget_lock:
            extensions.setdefault("decode_budget",
                                  DecodeBudget(settings().decode_budget_pixels))
    return extensions["decode_budget"]


def limits() -> Limits:
    config = settings()
    return Limits(config.max_batch, config.max_image_pixels, config.max_request_pixels,
                  decode_budget(), request_deadline())


def multipart_files(body: bytes) -> list[bytes]:
    """The file parts of a multipart body, in the order sent, read by the parser Flask
    itself would use (``request.make_form_data_parser()``): the same MAX_FORM_PARTS and
    MAX_FORM_MEMORY_SIZE (Flask's settings: 1,000 parts, 500,000 bytes a form field)
    whether the body came compressed or not. Past either: PayloadTooLarge naming both."""
    try:
        _, _, files = request.make_form_data_parser().parse(
            io.BytesIO(body), request.mimetype, len(body), request.mimetype_params)
    except RequestEntityTooLarge:
        raise PayloadTooLarge(f"the multipart body has more than {request.max_form_parts:,} "
                              f"parts, or a form field over {request.max_form_memory_size:,} "
                              "bytes (MAX_FORM_PARTS, MAX_FORM_MEMORY_SIZE)") from None
    return [part.read() for _, part in files.arrival]


def body_and_files(limit: int) -> tuple[bytes, list[bytes]]:
    """The request's bytes and file parts, decompressed when Content-Encoding says so."""
    encoding = (request.content_encoding or "identity").lower()
    if encoding in WBITS:
        body = decompress(request.get_data(cache=False), encoding, limit)
    elif encoding == "identity":
        # Read raw whatever the Content-Type says: TF Serving's own examples post JSON
        # with `curl -d`, which labels it a form; a form parser would swallow the body.
        body = request.get_data(cache=False)
    else:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported: "
                                   "send gzip, deflate or no encoding")
    return body, multipart_files(body) if request.mimetype == MULTIPART_TYPE else []


def shadow_copy(model: LoadedModel, images: np.ndarray, probabilities: np.ndarray) -> None:
    """Queue this request's images for the model's shadow versions (app/shadow.py), once
    the answer has been sent: ``call_on_close`` runs after the server wrote the body.
    A gRPC call has no WSGI response (only an app context): its copy is queued at once,
    which is safe because ``submit`` never blocks and the shadow runs on its own thread."""
    routes = store().routes.get(model.name)
    if routes is None or not routes.shadows:
        return
    runner: ShadowRunner = current_app.extensions["shadow"]

    def submit() -> None:
        runner.submit(routes, model, images, probabilities)

    if has_request_context():
        after_this_request(lambda response: _on_close(response, submit))
    else:
        submit()


def _on_close(response: Response, action: Callable[[], None]) -> Response:
    """Run ``action`` once the server has sent ``response`` (WSGI's ``close``)."""
    response.call_on_close(action)
    return response


def infer(model: LoadedModel, read: Reader) -> tuple[Parsed, np.ndarray]:
    """(the request as read, probabilities) for this request's body, read by ``read``.

    The body is read inside the model's batching slot, so that requests still
    uploading count as arriving and a forming batch waits for them (app/batching.py).
    The request's deadline bounds the wait for decoding memory and for the model; a
    full queue is an Overloaded (503).
    """
    return run_model(model, lambda: read(*body_and_files(settings().max_content_length)))


def run_model(model: LoadedModel, read: Callable[[], Parsed]) -> tuple[Parsed, np.ndarray]:
    """``infer`` for any transport: ``read`` gives the request's images (REST reads and
    parses its body; gRPC, app/grpc_server.py, converts its message), inside the model's
    batching slot, under this request's deadline and QUEUE_MAX_REQUESTS. Needs an app
    context (the deadline lives in ``g``), not an HTTP request."""
    deadline = request_deadline()
    meters = metrics().version(model.name, model.version)
    started = g.get("started") or time.perf_counter()  # app/logs.py, app/api/grpc_common.py
    trace = tracing.request_trace(model)  # app/tracing.py; a no-op unless OTEL_* ask
    with meters.counting(started), model.slot() as slot:
        reading = time.perf_counter()
        with trace.stage("preprocess"):
            parsed = read()
        meters.preprocess.observe(time.perf_counter() - reading)
        with trace.admission():
            probabilities = slot.run(parsed.images, deadline=deadline,
                                     max_queue=settings().queue_max_requests)
    meters.answered(started)
    metrics().images.labels(model.name, str(model.version)).inc(len(parsed.images))
    metrics().version_requests.labels(model.name, str(model.version)).inc()
    shadow_copy(model, parsed.images, probabilities)
    log_payload(model, parsed.images, probabilities)
    observe_drift(model, parsed.images, probabilities)
    return parsed, probabilities
