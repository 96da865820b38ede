"""app/errors.py: typed errors become JSON answers that can always be encoded."""

from __future__ import annotations

import pytest
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from app import create_app, errors
from app.config import Config
from app.errors import InvalidInput


@pytest.fixture
def client(tmp_path):
    """The real app (no model needed) with one more route whose error quotes client text
    that is not Unicode: a lone surrogate, as Python's JSON parser lets through."""
    app = create_app(Config(models_dir=tmp_path))

    def quote_the_client():
        raise InvalidInput('signature "\ud800" not found')

    for path in ("/v1/models/quoted:predict", "/quoted"):
        app.add_url_rule(path, endpoint=path, view_func=quote_the_client, methods=["POST"])
    return app.test_client()


def test_a_message_quoting_a_lone_surrogate_is_sent_with_its_escape(client):
    response = client.post("/v1/models/quoted:predict")
    assert response.status_code == 400
    assert response.get_json() == {"error": 'signature "\\ud800" not found'}
    response = client.post("/quoted")
    assert response.status_code == 400
    assert response.get_json()["error"]["message"] == 'signature "\\ud800" not found'


@pytest.mark.parametrize(("error", "code"), [
    (errors.InvalidInput, "INVALID_ARGUMENT"), (errors.UnprocessableInput, "INVALID_ARGUMENT"),
    (errors.PayloadTooLarge, "INVALID_ARGUMENT"),
    (errors.UnsupportedMediaType, "INVALID_ARGUMENT"), (errors.ModelNotFound, "NOT_FOUND"),
    (errors.ModelNotReady, "UNAVAILABLE"), (errors.Overloaded, "UNAVAILABLE"),
    (errors.DeadlineExceeded, "DEADLINE_EXCEEDED"), (errors.ModelFailed, "INTERNAL"),
])
def test_each_error_has_the_grpc_code_the_anchors_answer_it_with(error, code):
    """Bad input is never UNKNOWN or INTERNAL over gRPC; only a server fault is."""
    assert errors.grpc_code(error("message")).name == code


@pytest.mark.parametrize(("error", "code"), [
    (errors.InvalidInput("bad"), "invalid_input"), (errors.Overloaded("full"), "overloaded"),
    (RequestEntityTooLarge(), "payload_too_large"), (BadRequest(), "bad_request"),
    (ValueError("a bug"), "internal_error"),
])
def test_every_failure_has_a_code_from_a_fixed_set(error, code):
    """The reason label of inference_failures_total (app/metrics.py)."""
    assert errors.error_code(error) == code
