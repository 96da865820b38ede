"""TensorFlow Serving's REST API (https://www.tensorflow.org/tfx/serving/api_rest).

A client or gateway written for TF Serving talks to this service unchanged: model status,
model metadata (the SavedModel's own SignatureDefs) and ``:predict`` in row
(``instances``) or columnar (``inputs``) form, answered with ``predictions`` or
``outputs`` and TF Serving's ``{"error": "..."}``. The images go through the same
reading, checks and preprocessing as /predict (app/inputs.py).
"""

from __future__ import annotations

import numpy as np

from app.errors import InvalidInput
from app.inputs import Limits, from_instances, quoted, read_json
from app.servable import LoadedModel
from training.export_format import SIGNATURE

ROW, COLUMNAR = "instances", "inputs"
ANSWER_KEY = {ROW: "predictions", COLUMNAR: "outputs"}


def version_status(models: list[LoadedModel]) -> dict:
    """GetModelStatusResponse: every listed version is loaded, hence AVAILABLE."""
    return {"model_version_status": [
        {"version": str(model.version), "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}} for model in models]}


def model_metadata(model: LoadedModel) -> dict:
    """GetModelMetadataResponse with the SignatureDefs read from saved_model.pb."""
    return {"model_spec": {"name": model.name, "signature_name": "",
                           "version": str(model.version)},
            "metadata": {"signature_def": {"signature_def": model.signature_defs}}}


def _check_signature(document: dict) -> None:
    name = document.get("signature_name", SIGNATURE) or SIGNATURE
    if name != SIGNATURE:
        shown = str(name)[:40] + ("…" if len(str(name)) > 40 else "")  # no echo of 3 MB
        raise InvalidInput(f'Serving signature name: "{shown}" not found in signature def; '
                           f'this model has "{SIGNATURE}"')


def _columns(value: object, input_name: str) -> object:
    """Columnar ``inputs``: the input's batch itself, or ``{"<input>": batch}``."""
    if isinstance(value, dict) and "b64" not in value:
        if set(value) != {input_name}:
            raise InvalidInput(f"inputs: expected the model's input {input_name!r}, "
                               f"got keys {quoted(value)}")
        value = value[input_name]
    if not isinstance(value, list):
        raise InvalidInput("inputs must hold a batch: a list with one entry per image")
    return value


def read_predict(body: bytes, limits: Limits, preprocess: bool, input_name: str
                 ) -> tuple[np.ndarray, str]:
    """A :predict body → (images, ROW or COLUMNAR, which decides the answer's key)."""
    document = read_json(body, limits)
    if not isinstance(document, dict):
        raise InvalidInput('the body must be a JSON object with "instances" or "inputs"')
    _check_signature(document)
    given = [key for key in (ROW, COLUMNAR) if key in document]
    if len(given) != 1:
        raise InvalidInput('give exactly one of "instances" (row format) or "inputs" '
                           "(columnar format)")
    (style,) = given
    instances = document[ROW] if style == ROW else _columns(document[COLUMNAR], input_name)
    return from_instances(instances, limits, preprocess, input_name), style


def predict_response(probabilities: np.ndarray, style: str) -> dict:
    """One output tensor, so its name is left out, as TF Serving does."""
    return {ANSWER_KEY[style]: probabilities.tolist()}
