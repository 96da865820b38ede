"""TensorFlow Serving's REST endpoints under /v1 (see app/protocols/tf_serving.py)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from app.api.common import store
from app.api.inference import Parsed, infer, limits, preprocess_flag
from app.errors import InvalidInput
from app.protocols import tf_serving

bp = Blueprint("tf_serving", __name__, url_prefix="/v1/models")


@bp.get("/<name>")
@bp.get("/<name>/versions/<int:version>")
def status(name: str, version: int | None = None):
    """All loaded versions, or the one asked for."""
    models = store()
    chosen = [models.get(name, version)] if version is not None else \
        list(models.versions.get(name, {}).values()) or [models.get(name)]
    return jsonify(tf_serving.version_status(chosen))


@bp.get("/<name>/metadata")
@bp.get("/<name>/versions/<int:version>/metadata")
def metadata(name: str, version: int | None = None):
    return jsonify(tf_serving.model_metadata(store().get(name, version)))


@bp.post("/<name>:predict")
@bp.post("/<name>/versions/<int:version>:predict")
def predict(name: str, version: int | None = None):
    model = store().get(name, version)
    bounds, preprocess = limits(), preprocess_flag()
    parsed, probabilities = infer(model, lambda body, _files: Parsed(
        *tf_serving.read_predict(body, bounds, preprocess, model.input_name)))
    return jsonify(tf_serving.predict_response(probabilities, parsed.details))


@bp.post("/<name>:<verb>")
@bp.post("/<name>/versions/<int:version>:<verb>")
def other_verb(name: str, verb: str, version: int | None = None):
    store().get(name, version)  # an unknown model is still a 404
    raise InvalidInput(f"{verb!r} is not supported: this model has one signature, "
                       f"{tf_serving.SIGNATURE!r}, for :predict")
