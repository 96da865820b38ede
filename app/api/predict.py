"""POST /predict and /models/<name>[/versions/<v>]/predict: images in, digits out."""

from __future__ import annotations

import base64
import io

import numpy as np
from flask import Blueprint, jsonify, request
from PIL import Image

from app.api.common import resolve
from app.api.inference import Parsed, infer, limits, preprocess_flag
from app.errors import InvalidInput
from app.inputs import read_request

bp = Blueprint("predict", __name__)


def explain_flag() -> bool:
    """``?explain=1`` adds the 28×28 image the model received to each prediction."""
    value = request.args.get("explain", "0").lower()
    if value not in {"0", "1", "true", "false"}:
        raise InvalidInput(f"explain must be 0 or 1, got {value!r}")
    return value in {"1", "true"}


def as_png_base64(image: np.ndarray) -> str:
    """A (28, 28, 1) model input as a base64 grayscale PNG."""
    pixels = np.clip(np.rint(image[..., 0] * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def predictions(probabilities: np.ndarray) -> list[dict]:
    """One entry per image: the digit, its probability, and all ten (6 decimals)."""
    digits = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(digits)), digits]
    return [{"digit": int(d), "confidence": float(c), "probabilities": p}
            for d, c, p in zip(digits, confidence, probabilities.round(6).tolist(),
                               strict=True)]


@bp.post("/predict")
@bp.post("/models/<name>/predict")
@bp.post("/models/<name>/versions/<int:version>/predict")
@bp.post("/models/<name>/labels/<label>/predict")
def predict(name: str | None = None, version: int | None = None, label: str | None = None):
    model = resolve(name, version, label)
    bounds, preprocess, explain = limits(), preprocess_flag(), explain_flag()
    parsed, probabilities = infer(model, lambda body, files: Parsed(read_request(
        request.mimetype, body, files, bounds, preprocess)))
    answers = predictions(probabilities)
    if explain:
        for answer, image in zip(answers, parsed.images, strict=True):
            answer["input_png"] = as_png_base64(image)
    return jsonify({"model": {"name": model.name, "version": model.version},
                    "predictions": answers})
