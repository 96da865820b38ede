"""app.create_app: the factory builds a working app from a Config, even with no model."""

from __future__ import annotations

import pytest

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


def test_factory_uses_the_given_limits(tmp_path):
    app = create_app(Config(models_dir=tmp_path, max_content_length=1234))
    assert app.config["MAX_CONTENT_LENGTH"] == 1234
