"""Overload and deadlines as clients see them: statuses, codes and headers from the app
(its real model and batcher, in process), and a deadline from real gunicorn."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from app import create_app
from app.config import Config
from tests.conftest import hold_model, start_server, stop_server, wait_until
from tests.restyle import canvas_seven, encode


def npy_digits(mnist, count: int) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, mnist.x_test[:count])
    return buffer.getvalue()


def post_npy(client, body: bytes):
    return client.post("/predict", data=body, content_type="application/x-npy")


@pytest.fixture
def app_with(fit_run):
    """Build the real app on the trained export with some settings changed."""
    made = []

    def build(**settings):
        app = create_app(Config(models_dir=fit_run.models_dir, **settings))
        made.append(app)
        return app

    yield build
    for app in made:
        app.extensions["model_store"].close()


def test_a_model_failure_without_batching_is_a_model_error(app_with, mnist):
    app = app_with(batch_max_size=1)
    model = app.extensions["model_store"].get()

    def broken(images):
        raise RuntimeError("kernel crashed")

    model.predict = broken  # the model itself fails on valid input
    response = post_npy(app.test_client(), npy_digits(mnist, 1))
    assert response.status_code == 500
    assert response.json["error"]["code"] == "model_error"


def queued(app) -> float:
    """Requests waiting for a batch of the default model, read from /metrics."""
    text = app.test_client().get("/metrics").get_data(as_text=True)
    match = re.search(r'^model_queue_requests\{model="mnist_cnn"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_full_queue_is_a_503_with_retry_after(app_with, mnist):
    app = app_with(queue_max_requests=1, batch_timeout_ms=0)
    gate, calls = hold_model(app)
    body = npy_digits(mnist, 1)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post_npy, app.test_client(), body)  # runs, holds the model
        wait_until(lambda: calls, "the first model call")
        second = pool.submit(post_npy, app.test_client(), body)  # the queue's one place
        wait_until(lambda: queued(app) >= 1, "1 queued")
        refused = post_npy(app.test_client(), body)
        gate.set()
        statuses = [first.result(60).status_code, second.result(60).status_code]
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json["error"]["code"] == "overloaded"
    assert statuses == [200, 200]


def test_a_dead_batcher_fails_readiness_and_refuses_predictions(app_with, mnist):
    app = app_with(batch_timeout_ms=600_000)  # the batch waits for our arriving request
    client = app.test_client()
    assert client.get("/ready").status_code == 200
    batcher = app.extensions["model_store"].get().batcher

    def fatal(images):
        raise SystemExit("escaped the model")

    batcher.predict = fatal
    with batcher.arriving():  # the next request queues, so the batcher thread runs it
        waiting = ThreadPoolExecutor(1).submit(post_npy, app.test_client(),
                                               npy_digits(mnist, 1))
        wait_until(lambda: queued(app) >= 1, "1 queued")
    assert waiting.result(60).status_code == 503
    assert client.get("/ready").status_code == 503
    assert client.get("/v2/health/ready").status_code == 503
    response = post_npy(client, npy_digits(mnist, 1))
    assert response.status_code == 503 and "replaced" in response.json["error"]["message"]


def test_a_request_past_its_deadline_is_a_504_from_gunicorn(fit_run, tmp_path):
    # A 36-megapixel canvas takes far over 50 ms to decode on any machine, so the
    # deadline has passed before the model could run: 504, and the model is not called.
    server = start_server(fit_run.models_dir, tmp_path / "gunicorn.log", WORKERS="1",
                          REQUEST_TIMEOUT_MS="50")
    try:
        response = requests.post(server.url + "/predict", timeout=60,
                                 data=encode(canvas_seven(6000), "PNG"),
                                 headers={"Content-Type": "image/png"})
        metrics = requests.get(server.url + "/metrics", timeout=10).text
    finally:
        stop_server(server)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert 'images_predicted_total{model="mnist_cnn"' not in metrics
    # The queue gauge is exported by every worker (and nothing was left queued).
    assert 'model_queue_requests{model="mnist_cnn"} 0.0' in metrics
