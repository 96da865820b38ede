"""Open Inference Protocol (KServe V2) endpoints under /v2 (app/protocols/open_inference.py)."""

from __future__ import annotations

import orjson
from flask import Blueprint, Response, jsonify, request

from app import SERVICE_NAME, __version__
from app.api.common import metrics, ready_store, resolve, store
from app.api.inference import Parsed, infer, limits, preprocess_flag, request_deadline
from app.errors import InvalidInput
from app.inputs import json_values_bound, parse_json
from app.protocols import open_inference
from app.statistics import model_statistics, served

bp = Blueprint("open_inference", __name__, url_prefix="/v2")
INDEX_MOST_VALUES = 8  # {"ready": true} is two


@bp.get("")
def server_metadata():
    return jsonify(open_inference.server_metadata(SERVICE_NAME, __version__))


@bp.get("/health/live")
def live():
    return jsonify({"live": True})


@bp.get("/health/ready")
def ready():
    """Ready when the default model is loaded; 503 before, as KServe's own server answers
    (the protocol asks only for a non-200; probes and tritonclient read it so)."""
    ready_store()
    return jsonify({"ready": True})


@bp.post("/repository/index")
def repository_index():
    """The model-repository extension's index: every model and version folder with its
    state (READY, LOADING, UNAVAILABLE) and, when not ready, why; ``{"ready": true}``
    keeps only the ready ones. A body of more than a few JSON values is refused unparsed:
    parsing 10 MB of them would cost a worker hundreds of MB (app/inputs.py)."""
    body = request.get_data(cache=False)
    wrong = InvalidInput('the index request must be a JSON object like {"ready": true}')
    if json_values_bound(body) > INDEX_MOST_VALUES:
        raise wrong
    document = parse_json(body) if body.strip() else {}
    if not isinstance(document, dict) or not isinstance(document.get("ready", False), bool):
        raise wrong
    rows = [row for row in store().index()
            if row.state == "READY" or not document.get("ready", False)]
    return jsonify([{"name": row.name, "version": row.version, "state": row.state,
                     **({"reason": row.reason} if row.reason else {})} for row in rows])


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<int:version>")
def model_metadata(name: str, version: int | None = None):
    models = store()
    model = models.get(name, version)
    versions = models.versions.get(name, {model.version: model})  # may change meanwhile
    return jsonify(open_inference.model_metadata(model, list(versions)))


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<int:version>/ready")
def model_ready(name: str, version: int | None = None):
    """A model (version) is ready once loaded; it is never loaded half-way."""
    model = store().get(name, version)
    return jsonify({"name": model.name, "version": str(model.version), "ready": True})


@bp.get("/models/stats")
@bp.get("/models/<name>/stats")
@bp.get("/models/<name>/versions/<int:version>/stats")
def statistics(name: str | None = None, version: int | None = None):
    """The statistics extension: counts and durations of every worker (app/statistics.py)."""
    return jsonify(model_statistics(metrics(), served(store(), name, version)))


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<int:version>/infer")
@bp.post("/models/<name>/labels/<label>/infer")
def run_inference(name: str, version: int | None = None, label: str | None = None):
    model = resolve(name, version, label)
    bounds, preprocess = limits(), preprocess_flag()
    header_length = request.headers.get(open_inference.HEADER_LENGTH)
    parsed, probabilities = infer(model, lambda body, _files: Parsed(
        *open_inference.read_infer(body, header_length, bounds, preprocess, model)))
    header, binary = open_inference.infer_response(model, parsed.details, probabilities,
                                                   request_deadline())
    if not binary:
        return jsonify(header)
    encoded = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(encoded + binary, mimetype="application/octet-stream",
                    headers={open_inference.HEADER_LENGTH: str(len(encoded))})
