"""POST /predict and POST /models/<name>/predict: images in, digits out."""

from __future__ import annotations

import base64
import io

import numpy as np
from flask import Blueprint, jsonify, request
from PIL import Image
from werkzeug.formparser import FormDataParser

from app.api.common import ArrivalOrderMultiDict, metrics, settings, store
from app.errors import InvalidInput, UnsupportedMediaType
from app.inputs import MULTIPART_TYPE, Limits, gunzip, read_request

bp = Blueprint("predict", __name__)
PREPROCESS_VALUES = {"auto": True, "none": False}


def preprocess_flag() -> bool:
    """``?preprocess=auto`` (default) or ``none``; raises InvalidInput otherwise."""
    value = request.args.get("preprocess", "auto")
    if value not in PREPROCESS_VALUES:
        raise InvalidInput(f"preprocess must be 'auto' or 'none', got {value!r}")
    return PREPROCESS_VALUES[value]


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


def multipart_files(body: bytes) -> list[bytes]:
    """The file parts of a multipart body we had to decompress ourselves, in order."""
    parser = FormDataParser(cls=ArrivalOrderMultiDict)
    _, _, files = parser.parse(io.BytesIO(body), request.mimetype, len(body),
                               request.mimetype_params)
    return [part.read() for _, part in files.arrival]


def body_and_files(limit: int) -> tuple[bytes, list[bytes]]:
    """The request's bytes and file parts, gunzipped when Content-Encoding says gzip."""
    encoding = (request.content_encoding or "identity").lower()
    if encoding == "gzip":
        body = gunzip(request.get_data(cache=False), limit)
        return body, multipart_files(body) if request.mimetype == MULTIPART_TYPE else []
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported: "
                                   "send gzip or no encoding")
    files = [part.read() for _, part in request.files.arrival]  # in the order sent
    return (b"" if files else request.get_data(cache=False)), files


@bp.post("/predict")
@bp.post("/models/<name>/predict")
def predict(name: str | None = None):
    model = store().get(name)
    config = settings()
    limits = Limits(config.max_batch, config.max_image_pixels, config.max_request_pixels)
    preprocess, explain = preprocess_flag(), explain_flag()
    with model.slot() as slot:
        body, files = body_and_files(config.max_content_length)
        images = read_request(request.mimetype, body, files, limits, preprocess)
        probabilities = slot.run(images)
    metrics().images.labels(model.name, str(model.version)).inc(len(images))
    answers = predictions(probabilities)
    if explain:
        for answer, image in zip(answers, images, strict=True):
            answer["input_png"] = as_png_base64(image)
    return jsonify({"model": {"name": model.name, "version": model.version},
                    "predictions": answers})
