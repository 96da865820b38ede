"""The naive servers `make bench` measures ours against: the usual tutorial code.

One image per request, decoded with Pillow, one model call per request, no batching,
gunicorn's default sync workers. ``BENCH_MODEL`` is an exported version folder.
"""

from __future__ import annotations

import io
import os

import numpy as np
from flask import Flask, jsonify, request
from PIL import Image


def _image() -> np.ndarray:
    pixels = Image.open(io.BytesIO(request.get_data())).convert("L")
    return (np.asarray(pixels, dtype=np.float32) / 255.0).reshape(1, 28, 28, 1)


def _answer(probabilities: np.ndarray):
    return jsonify({"digit": int(probabilities.argmax()),
                    "probabilities": [float(p) for p in probabilities]})


def keras_app() -> Flask:
    """Flask + Keras ``model.predict`` per request."""
    import keras

    model = keras.saving.load_model(os.path.join(os.environ["BENCH_MODEL"], "model.keras"))
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        return _answer(model.predict(_image(), verbose=0)[0])

    @app.get("/ready")
    def ready():
        return "ok"

    return app


def savedmodel_app() -> Flask:
    """Flask + the SavedModel's serving signature per request."""
    import tensorflow as tf

    loaded = tf.saved_model.load(os.environ["BENCH_MODEL"])
    serve = loaded.signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]  # called by keyword: the fast path
    app = Flask(__name__)
    app.config["loaded"] = loaded  # keeps the variables alive

    @app.post("/predict")
    def predict():
        outputs = serve(**{name: tf.constant(_image())})
        return _answer(next(iter(outputs.values())).numpy()[0])

    @app.get("/ready")
    def ready():
        return "ok"

    return app


def hello_app() -> Flask:
    """The stack's ceiling: the same Flask under the same gunicorn, answering a fixed
    prediction without decoding or computing anything."""
    app = Flask(__name__)
    answer = {"digit": 7, "probabilities": [0.0] * 7 + [1.0] + [0.0] * 2}

    @app.post("/predict")
    def predict():
        request.get_data()
        return jsonify(answer)

    @app.get("/ready")
    def ready():
        return "ok"

    return app
