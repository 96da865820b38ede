"""GET /health, /ready, /metrics and /openapi.json: what operators and tools poll."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from app.api.common import metrics, ready_store, settings
from app.openapi import openapi_spec

bp = Blueprint("operations", __name__)


@bp.get("/health")
def health():
    """Liveness: the process answers. Says nothing about models."""
    return jsonify({"status": "ok"})


@bp.get("/ready")
def ready():
    """Readiness: 200 only when the default model is loaded and its batcher runs, else 503."""
    models = ready_store()
    return jsonify({"status": "ready", "default": models.default_name,
                    "models": {name: m.version for name, m in sorted(models.models.items())}})


@bp.get("/metrics")
def prometheus_metrics():
    body, content_type = metrics().exposition()
    return Response(body, content_type=content_type)


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_spec(settings(), current_app.url_map))
