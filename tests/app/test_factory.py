"""app.create_app: the factory builds a working app from a Config, even with no model."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from app import create_app
from app.config import Config


@pytest.fixture
def empty_client(tmp_path):
    return create_app(Config(models_dir=tmp_path)).test_client()


def test_alive_without_a_model(empty_client):
    assert empty_client.get("/health").get_json() == {"status": "ok"}


def test_not_ready_without_a_model(empty_client):
    response = empty_client.get("/ready")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "model_not_ready"


def test_predict_without_a_model_is_503_not_500(empty_client):
    response = empty_client.post("/predict", data=b"x", content_type="image/png")
    assert response.status_code == 503
    assert "make train" in response.get_json()["error"]["message"]


def test_factory_uses_the_given_body_limit(fit_run, mnist):
    client = create_app(Config(models_dir=fit_run.models_dir, max_content_length=1234)
                        ).test_client()
    digit = io.BytesIO()
    Image.fromarray(mnist.x_test[0]).save(digit, "PNG")
    assert len(digit.getvalue()) <= 1234
    under = client.post("/predict", data=digit.getvalue(), content_type="image/png")
    assert under.status_code == 200, under.get_json()
    over = client.post("/predict", data=digit.getvalue() + b"\0" * 1234,
                       content_type="image/png")
    assert over.status_code == 413
    assert over.get_json()["error"]["code"] == "payload_too_large"
    assert "1234 bytes" in over.get_json()["error"]["message"]


@pytest.fixture(scope="module")
def apps(served_models):
    """The same models served with micro-batching on (default) and off."""
    return {size: create_app(Config(models_dir=served_models, batch_max_size=size))
            for size in (64, 1)}


def test_batching_off_answers_exactly_as_batching_on(apps, mnist):
    import io

    import numpy as np
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(mnist.x_test[3]).save(png, "PNG")
    requests_ = [
        {"data": png.getvalue(), "content_type": "image/png"},
        {"json": {"instances": (mnist.x_test[:5] / 255.0).tolist()}},
        {"data": b"broken", "content_type": "image/png"},
    ]
    for kwargs in requests_:
        on, off = (apps[size].test_client().post("/predict", **kwargs) for size in (64, 1))
        assert on.status_code == off.status_code
        if on.status_code == 200:
            np.testing.assert_allclose(
                [p["probabilities"] for p in on.get_json()["predictions"]],
                [p["probabilities"] for p in off.get_json()["predictions"]], atol=1e-5)
        else:
            assert on.get_json() == off.get_json()
    assert apps[1].extensions["model_store"].get().batcher is None
    assert apps[64].extensions["model_store"].get().batcher is not None
