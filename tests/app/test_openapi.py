"""app/openapi.py: the document describes what the real server answers, field by field.

Each response below comes from a real gunicorn serving a really trained model, next to a
broken version folder, a folder that is no version and a model with no servable version
(so that every "rejected" map has entries). It is validated against the schema that
/openapi.json gives for its path and status, closed for the test: an object schema that
lists its properties accepts no others, so a field the server sends and the document
omits fails, and so does a required field the server leaves out.
"""

from __future__ import annotations

import base64
import copy
import io
import shutil

import pytest
import requests
from jsonschema import Draft202012Validator
from PIL import Image

from tests.conftest import PREDICT_TOKEN, start_server, stop_server


@pytest.fixture(scope="module")
def models_dir(served_models, tmp_path_factory):
    """``digits``: version 1 served, version 2 missing its weights, a folder ``draft``;
    ``broken``: only a version without weights."""
    root = tmp_path_factory.mktemp("openapi_models")
    for target in ("digits/1", "digits/2", "broken/1"):
        shutil.copytree(served_models / "mnist_tiny" / "1", root / target)
    for target in ("digits/2", "broken/1"):
        shutil.rmtree(root / target / "variables")
    (root / "digits" / "draft").mkdir()
    return root


@pytest.fixture(scope="module")
def api(models_dir, tmp_path_factory):
    running = start_server(models_dir, tmp_path_factory.mktemp("openapi") / "gunicorn.log",
                           MODEL_NAME="digits", MODEL_VERSION_POLICY="all", WORKERS="1")
    yield running.url
    stop_server(running)


@pytest.fixture(scope="module")
def spec(api) -> dict:
    return requests.get(f"{api}/openapi.json", timeout=30).json()


def closed(schema):
    """A copy where every object schema that lists properties allows no others."""
    schema = copy.deepcopy(schema)
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed(item) for item in schema]
    return schema


def assert_documented(spec: dict, path: str, method: str, response: requests.Response):
    """The response's JSON body is valid against its documented, closed schema."""
    documented = spec["paths"][path][method]["responses"][str(response.status_code)]
    schema = documented["content"]["application/json"]["schema"]
    validator = Draft202012Validator({**closed(schema),
                                      "components": closed(spec["components"])})
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
              for e in validator.iter_errors(response.json())]
    assert not errors, f"{method.upper()} {path} {response.status_code}: {errors}"


def png(mnist) -> bytes:
    """The first test digit, a 7, as black ink on white, as people send digits."""
    buffer = io.BytesIO()
    Image.fromarray(255 - mnist.x_test[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_model_list_is_documented_field_by_field(api, spec):
    response = requests.get(f"{api}/models", timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["rejected"] and body["models"][0]["rejected"]  # every map has entries
    assert_documented(spec, "/models", "get", response)


def test_model_info_is_documented_field_by_field(api, spec):
    response = requests.get(f"{api}/models/digits", timeout=30)
    assert response.status_code == 200
    assert set(response.json()["rejected"]) == {"2", "draft"}
    assert_documented(spec, "/models/{name}", "get", response)


@pytest.mark.parametrize("path, documented", [
    ("/summary?batch_size=4", "/summary"),
    ("/models/digits/summary", "/models/{name}/summary")])
def test_the_summary_is_documented_field_by_field(api, spec, path, documented):
    response = requests.get(f"{api}{path}", timeout=30)
    assert response.status_code == 200
    assert_documented(spec, documented, "get", response)


@pytest.mark.parametrize("path, documented", [
    ("/predict?explain=1", "/predict"),
    ("/models/digits/predict", "/models/{name}/predict"),
    ("/models/digits/versions/1/predict", "/models/{name}/versions/{version}/predict")])
def test_predictions_are_documented_field_by_field(api, spec, mnist, path, documented):
    image = png(mnist)
    response = requests.post(f"{api}{path}", files={"a": image, "b": image}, timeout=30)
    assert response.status_code == 200, response.text
    assert "input_png" in response.json()["predictions"][0] or "explain" not in path
    assert_documented(spec, documented, "post", response)


def test_json_instances_are_answered_as_documented(api, spec, mnist):
    instance = {"b64": base64.b64encode(png(mnist)).decode()}
    response = requests.post(f"{api}/predict", json={"instances": [instance]}, timeout=30)
    assert response.status_code == 200, response.text
    assert_documented(spec, "/predict", "post", response)


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_operations_are_documented_field_by_field(api, spec, path):
    response = requests.get(f"{api}{path}", timeout=30)
    assert response.status_code == 200
    assert_documented(spec, path, "get", response)


@pytest.mark.parametrize("method, path, documented, status", [
    ("get", "/models/nothing", "/models/{name}", 404),
    ("get", "/models/broken", "/models/{name}", 503),
    ("get", "/summary?batch_size=0", "/summary", 400),
    ("post", "/predict", "/predict", 415),
    ("post", "/models/digits/versions/7/predict", "/models/{name}/versions/{version}/predict",
     404)])
def test_errors_are_documented_field_by_field(api, spec, method, path, documented, status):
    response = requests.request(method, f"{api}{path}", data=b"not an image",
                                headers={"Content-Type": "text/plain"}, timeout=30)
    assert response.status_code == status, response.text
    assert_documented(spec, documented, method, response)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_server_without_tokens_documents_no_security(spec):
    assert "securitySchemes" not in spec["components"]
    assert not [path for path, ops in spec["paths"].items()
                for op in ops.values() if "security" in op]


def test_each_operation_documents_the_scope_the_secured_server_enforces(secured):
    """Every documented operation is called on the real secured server: without a token
    it is refused (401) exactly when its ``security`` asks for a scope, and a predict
    token is refused (403) exactly where that scope is admin."""
    from openapi_spec_validator import validate

    secured_spec = requests.get(f"{secured.url}/openapi.json", timeout=30).json()
    validate(secured_spec)
    assert secured_spec["components"]["securitySchemes"]["bearerAuth"] | {"description": ""} \
        == {"type": "http", "scheme": "bearer", "description": ""}
    scopes = {}
    for path, operations in secured_spec["paths"].items():
        url = secured.url + path.format(name="mnist_cnn", version=1, label="stable",
                                        plot="history")
        for method, operation in operations.items():
            (scope,) = [r["bearerAuth"] for r in operation["security"]] or [[None]]
            scopes[method, path] = scope[0]
            anonymous = requests.request(method, url, timeout=30)
            assert (anonymous.status_code == 401) == (scope[0] is not None), (path, anonymous)
            predict = requests.request(method, url, headers=bearer(PREDICT_TOKEN), timeout=30)
            assert predict.status_code != 401 and \
                (predict.status_code == 403) == (scope[0] == "admin"), (path, predict)
    assert sorted(p for (_, p), s in scopes.items() if s is None) == [
        "/health", "/openapi.json", "/ready", "/v2/health/live", "/v2/health/ready"]
    assert sorted(p for (_, p), s in scopes.items() if s == "admin") == [
        "/metrics", "/v2/models/stats", "/v2/models/{name}/stats",
        "/v2/models/{name}/versions/{version}/stats", "/v2/repository/index"]
