"""What every view needs: the store, the settings and the metrics of the current app."""

from __future__ import annotations

from flask import Request, current_app, g, request
from werkzeug.datastructures import ImmutableMultiDict

from app.config import Config
from app.errors import InvalidInput, ModelNotReady
from app.logs import REQUEST_ID
from app.metrics import Metrics
from app.model_store import ModelStore
from app.servable import LoadedModel
from training.export_format import parse_version


def store() -> ModelStore:
    return current_app.extensions["model_store"]


def settings() -> Config:
    return current_app.extensions["config"]


def metrics() -> Metrics:
    return current_app.extensions["metrics"]


CLIENT_HEADER = "X-Client-ID"


def client_key(client: str | None = None) -> str:
    """What keeps a client on one side of a canary split: its ``X-Client-ID`` (gRPC:
    ``x-client-id`` metadata, passed in as ``client``) when sane (printable ASCII, at
    most 128 characters, as X-Request-ID), else the request's id (app/logs.py: the
    client's X-Request-ID, or a fresh one, hence a random side)."""
    if client is None and request:
        client = request.headers.get(CLIENT_HEADER)
    if client and REQUEST_ID.fullmatch(client):
        return client
    return g.get("request_id") or ""


def resolve(name: str | None, version: int | None = None, label: str | None = None,
            client: str | None = None) -> LoadedModel:
    """The version that answers this request (ModelStore.resolve); ``client`` as for
    client_key."""
    return store().resolve(name, version, label, client_key(client))


def ready_store() -> ModelStore:
    """The store when this worker can answer predictions: the default model loaded and
    no batcher dead (a dead one makes readiness fail while the worker is replaced);
    raises ModelNotReady (503)."""
    models = store()
    if not models.ready:
        raise ModelNotReady(f"default model {models.default_name!r} is not loaded")
    stopped = [f"{model.name} version {model.version}"
               for versions in models.versions.values() for model in versions.values()
               if model.batcher is not None and not model.batcher.alive]
    if stopped:
        raise ModelNotReady(f"the batcher of {', '.join(stopped)} has stopped")
    return models


def int_arg(args, name: str, default: int, minimum: int = 1, maximum: int = 1_000_000) -> int:
    """A whole-number query parameter in ASCII digits, read as version folder names are
    (app/api/urls.py says why not ``int()``); raises InvalidInput (400) naming it."""
    raw = args.get(name)
    if raw is None:
        return default
    value = parse_version(raw)
    if value is None:
        raise InvalidInput(f"query parameter {name} must be a whole number in ASCII digits "
                           f"(no sign, no leading zero), got {raw[:40]!r}")
    if not minimum <= value <= maximum:
        raise InvalidInput(f"query parameter {name} must be between {minimum} and {maximum}")
    return value


class ArrivalOrderMultiDict(ImmutableMultiDict):
    """A MultiDict that also remembers the order its items arrived in, across keys.

    Werkzeug groups multipart files by field name, which loses the order of files sent
    under different names; a batch's predictions must come back in the order sent.
    """

    def __init__(self, mapping=None):
        super().__init__(mapping)
        self.arrival = list(mapping) if isinstance(mapping, list) else \
            list(self.items(multi=True))


class ServiceRequest(Request):
    parameter_storage_class = ArrivalOrderMultiDict
