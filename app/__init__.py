"""The digit-recognition service: a Flask app that serves exported SavedModels.

Endpoints (all JSON unless said otherwise; errors are ``{"error": {"code", "message"}}``):

- ``POST /predict``, ``POST /models/<name>/predict``: images → digits
- ``GET /summary``, ``GET /models/<name>/summary``: layer table, parameters, memory
  (``?batch_size=N``), test accuracy
- ``GET /models``, ``GET /models/<name>``: what is loaded, which versions exist
- ``GET /health`` (alive), ``GET /ready`` (default model loaded, else 503)
- ``GET /metrics`` (Prometheus text format), ``GET /openapi.json`` (OpenAPI 3.1)
- ``GET /models/<name>/plots/<plot>.png``: the training plots exported with the model
- with AUTH_TOKENS_FILE set, everything but the probes and pages needs a bearer token
  (app/auth.py); CORS_ALLOWED_ORIGINS lets other origins' pages call it (app/cors.py)
- ``GET /`` and ``GET /model``: web pages to draw a digit and to look at the model
- ``/v1/models/...``: TensorFlow Serving's REST API (status, metadata, ``:predict``), by
  version (``/versions/<v>``) or label (``/labels/<l>``); ``/models/<name>/labels/<l>/predict``
- ``/v2/...``: the Open Inference Protocol (KServe V2: health, metadata, ``/infer``,
  ``POST /v2/repository/index``)

Beside them, gRPC on GRPC_PORT (app/grpc_server.py, started in each gunicorn worker):
``inference.GRPCInferenceService`` and TF Serving's ``PredictionService``/``ModelService``,
on the same store, batcher and limits, with health and reflection.

Run it with ``make serve`` (gunicorn with app/gunicorn.conf.py).
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from app.config import Config
from app.json_provider import OrjsonProvider

SERVICE_NAME = "mnist-digits"
__version__ = "1.1.0"


def create_app(config: Config | None = None) -> Flask:
    """Build the app; settings come from the environment unless ``config`` is given.

    Called in each gunicorn worker after the fork, so models (and TensorFlow) load there.
    """
    from app import auth, cors, errors, logs, payload_log, tracing
    from app.api import models, open_inference, operations, pages, predict, tf_serving
    from app.api.common import ServiceRequest
    from app.api.urls import WholeNumberConverter, merged_slashes
    from app.drift import DriftMonitor
    from app.metrics import Metrics
    from app.model_store import ModelStore
    from app.shadow import ShadowRunner
    from app.version_policy import VersionPolicy
    from training.export_format import Bounds

    config = config or Config.from_env()
    logs.configure(config.log_level)
    app = Flask(__name__)
    app.request_class = ServiceRequest
    app.url_map.converters["int"] = WholeNumberConverter  # before any rule is added
    app.wsgi_app = merged_slashes(app.wsgi_app)
    app.config["MAX_CONTENT_LENGTH"] = config.max_content_length
    app.json = OrjsonProvider(app)
    app.extensions["config"] = config

    metrics = Metrics(config.prometheus_multiproc_dir)
    app.extensions["metrics"] = metrics
    store = ModelStore(config.models_dir, config.model_name, config.tf_threads,
                       config.batch_max_size, config.batch_timeout_ms,
                       VersionPolicy.parse(config.model_version_policy),
                       config.model_poll_seconds, metrics, config.prefer_tflite_model,
                       Bounds(config.model_max_bytes, config.model_check_seconds),
                       Path(config.model_config_file) if config.model_config_file else None)
    store.init_app(app)
    app.extensions["shadow"] = ShadowRunner(metrics)
    payload_log.init_app(app, config, metrics)
    drift = DriftMonitor(metrics.drift_psi, config.drift_window, config.drift_min_samples)
    app.extensions["drift"] = drift
    store.on_retire.append(drift.forget)
    store.load()  # what MODELS_DIR holds now; then a thread follows its changes

    errors.register(app)
    logs.init_app(app, metrics)
    auth.init_app(app, config.auth_tokens_file)
    cors.init_app(app, config.cors_origins)
    tracing.init_app(app)  # only when the OTEL_* variables ask for traces
    for blueprint in (predict.bp, models.bp, operations.bp, pages.bp, tf_serving.bp,
                      open_inference.bp):
        app.register_blueprint(blueprint)
    return app
