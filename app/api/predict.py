"""POST /predict and POST /models/<name>/predict: images in, digits out."""

from __future__ import annotations

import numpy as np
from flask import Blueprint, jsonify, request

from app.api.common import metrics, settings, store
from app.errors import InvalidInput
from app.inputs import Limits, read_request

bp = Blueprint("predict", __name__)
PREPROCESS_VALUES = {"auto": True, "none": False}


def preprocess_flag() -> bool:
    """``?preprocess=auto`` (default) or ``none``; raises InvalidInput otherwise."""
    value = request.args.get("preprocess", "auto")
    if value not in PREPROCESS_VALUES:
        raise InvalidInput(f"preprocess must be 'auto' or 'none', got {value!r}")
    return PREPROCESS_VALUES[value]


def prediction(probabilities: np.ndarray) -> dict:
    digit = int(probabilities.argmax())
    return {"digit": digit, "confidence": float(probabilities[digit]),
            "probabilities": [round(float(p), 6) for p in probabilities]}


@bp.post("/predict")
@bp.post("/models/<name>/predict")
def predict(name: str | None = None):
    model = store().get(name)
    config = settings()
    files = [part.read() for _, part in request.files.arrival]  # in the order sent
    images = read_request(request.mimetype, request.get_data(cache=False) if not files else b"",
                          files, Limits(config.max_batch, config.max_image_pixels,
                                        config.max_request_pixels),
                          preprocess_flag())
    probabilities = model.predict(images)
    metrics().images.labels(model.name, str(model.version)).inc(len(images))
    return jsonify({"model": {"name": model.name, "version": model.version},
                    "predictions": [prediction(p) for p in probabilities]})
