"""TensorFlow Serving's REST endpoints under /v1 (see app/protocols/tf_serving.py)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from app.api.common import resolve, store
from app.api.inference import Parsed, infer, limits, preprocess_flag
from app.errors import InvalidInput
from app.protocols import tf_serving

bp = Blueprint("tf_serving", __name__, url_prefix="/v1/models")


@bp.get("/<name>")
@bp.get("/<name>/versions/<int:version>")
@bp.get("/<name>/labels/<label>")
def status(name: str, version: int | None = None, label: str | None = None):
    """All loaded versions, or the one asked for (by number or label)."""
    models = store()
    chosen = [models.resolve(name, version, label)] if version is not None or label else \
        list(models.versions.get(name, {}).values()) or [models.get(name)]
    return jsonify(tf_serving.version_status(chosen))


@bp.get("/<name>/metadata")
@bp.get("/<name>/versions/<int:version>/metadata")
@bp.get("/<name>/labels/<label>/metadata")
def metadata(name: str, version: int | None = None, label: str | None = None):
    return jsonify(tf_serving.model_metadata(store().resolve(name, version, label)))


@bp.post("/<name>:predict")
@bp.post("/<name>/versions/<int:version>:predict")
@bp.post("/<name>/labels/<label>:predict")
def predict(name: str, version: int | None = None, label: str | None = None):
    model = resolve(name, version, label)
    bounds, preprocess = limits(), preprocess_flag()
    parsed, probabilities = infer(model, lambda body, _files: Parsed(
        *tf_serving.read_predict(body, bounds, preprocess, model.input_name)))
    return jsonify(tf_serving.predict_response(probabilities, parsed.details))


@bp.post("/<name>:<verb>")
@bp.post("/<name>/versions/<int:version>:<verb>")
@bp.post("/<name>/labels/<label>:<verb>")
def other_verb(name: str, verb: str, version: int | None = None, label: str | None = None):
    store().resolve(name, version, label)  # an unknown model is still a 404
    raise InvalidInput(f"{verb!r} is not supported: this model has one signature, "
                       f"{tf_serving.SIGNATURE!r}, for :predict")
