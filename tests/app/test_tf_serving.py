"""TensorFlow Serving's REST API, against a real gunicorn serving really trained models.

Request bodies follow https://www.tensorflow.org/tfx/serving/api_rest (its examples,
adapted from ``half_plus_three`` to this model's [28, 28, 1] ``image`` input), and each
answer is checked field by field against the response format that page documents.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
import requests

from tests.restyle import encode, ink_on_paper

MODEL = "/v1/models/mnist_cnn"


@pytest.fixture(scope="module")
def digits(mnist) -> tuple[np.ndarray, np.ndarray]:
    """16 real test digits in MNIST form (floats in [0, 1]) and their labels."""
    return mnist.x_test[:16].astype(np.float32) / 255.0, mnist.y_test[:16]


@pytest.fixture(scope="module")
def reference(url, digits) -> np.ndarray:
    """/predict's probabilities for the same digits: what every protocol must agree with."""
    body = {"instances": digits[0].tolist()}
    response = requests.post(url + "/predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


def post(url: str, path: str, body: object) -> requests.Response:
    return requests.post(url + path, json=body, timeout=30)


def assert_tf_error(response: requests.Response, status: int, *words: str) -> None:
    """TF Serving's error format: an object whose one key, ``error``, is a string."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    for word in words:
        assert word in body["error"], body["error"]


def test_model_status_is_a_get_model_status_response(url):
    response = requests.get(url + MODEL, timeout=5)
    assert response.status_code == 200
    assert response.json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]}


def test_status_of_one_version(url):
    body = requests.get(url + MODEL + "/versions/1", timeout=5).json()
    assert [s["version"] for s in body["model_version_status"]] == ["1"]


def test_metadata_is_the_saved_signature_def(url):
    response = requests.get(url + MODEL + "/metadata", timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert body["model_spec"] == {"name": "mnist_cnn", "signature_name": "", "version": "1"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    (name, image), = signature["inputs"].items()
    assert name == "image" and image["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in image["tensor_shape"]["dim"]] == ["-1", "28", "28", "1"]
    assert image["name"].endswith(":0")
    (output,) = signature["outputs"].values()
    assert output["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in output["tensor_shape"]["dim"]] == ["-1", "10"]


def test_row_format_instances_shaped_as_the_signature(url, digits, reference):
    """{"instances": [<tensor>, ...]}: one [28, 28, 1] tensor per digit."""
    images, labels = digits
    response = post(url, MODEL + ":predict", {"instances": images[..., None].tolist()})
    assert response.status_code == 200, response.text
    assert list(response.json()) == ["predictions"]
    predictions = np.array(response.json()["predictions"])
    assert predictions.shape == (16, 10)
    np.testing.assert_allclose(predictions, reference, atol=1e-5)
    assert (predictions.argmax(axis=1) == labels).mean() >= 0.9


def test_row_format_instances_as_28x28(url, digits, reference):
    response = post(url, MODEL + ":predict", {"instances": digits[0].tolist()})
    np.testing.assert_allclose(response.json()["predictions"], reference, atol=1e-5)


def test_row_format_with_the_signature_name_and_named_inputs(url, digits, reference):
    """The documented multi-input form: each instance an object of input name → tensor."""
    body = {"signature_name": "serving_default",
            "instances": [{"image": image.tolist()} for image in digits[0]]}
    response = post(url, MODEL + ":predict", body)
    np.testing.assert_allclose(response.json()["predictions"], reference, atol=1e-5)


def test_columnar_inputs_answer_outputs(url, digits, reference):
    """{"inputs": <batch>} answers {"outputs": <batch>}: one output, so no name."""
    response = post(url, MODEL + ":predict", {"inputs": digits[0][..., None].tolist()})
    assert response.status_code == 200, response.text
    assert list(response.json()) == ["outputs"]
    np.testing.assert_allclose(response.json()["outputs"], reference, atol=1e-5)


def test_columnar_inputs_by_name(url, digits, reference):
    response = post(url, MODEL + ":predict", {"inputs": {"image": digits[0].tolist()}})
    np.testing.assert_allclose(response.json()["outputs"], reference, atol=1e-5)


def test_b64_image_instances_are_read_and_preprocessed(url, mnist):
    """{"b64": ...} holds an encoded image: photographed-style ink on paper, 280×280."""
    rng = np.random.default_rng(1)
    encoded = [base64.b64encode(encode(ink_on_paper(digit, rng), "PNG")).decode()
               for digit in mnist.x_test[:8]]
    body = {"instances": [{"b64": encoded[0]}] + [{"image": {"b64": e}} for e in encoded[1:]]}
    response = post(url, MODEL + ":predict", body)
    assert response.status_code == 200, response.text
    predicted = np.array(response.json()["predictions"]).argmax(axis=1)
    assert (predicted == mnist.y_test[:8]).mean() >= 7 / 8


def test_a_pinned_version_answers(url, digits, reference):
    response = post(url, MODEL + "/versions/1:predict", {"instances": digits[0].tolist()})
    np.testing.assert_allclose(response.json()["predictions"], reference, atol=1e-5)


def test_the_documented_404_for_an_unknown_model(url):
    """The page's own example: POST /v1/models/half:predict → 404 {"error": ...}."""
    assert_tf_error(post(url, "/v1/models/half:predict", {"instances": [1.0, 5.0]}), 404,
                    "half")


def test_a_version_that_is_not_loaded_is_404(url, digits):
    assert_tf_error(post(url, MODEL + "/versions/7:predict",
                         {"instances": digits[0][:1].tolist()}), 404, "version 7")
    assert_tf_error(requests.get(url + MODEL + "/versions/7", timeout=5), 404, "version 7")


@pytest.mark.parametrize(("body", "status", "word"), [
    ({"signature_name": "classify_objects", "instances": [[0.0]]}, 400, "classify_objects"),
    ({"instances": [], "inputs": []}, 400, "exactly one"),
    ({"examples": []}, 400, "instances"),
    ([1.0, 2.0], 400, "JSON object"),
    ({"instances": [1.0, 2.0, 5.0]}, 422, "28×28"),
    ({"instances": [{"x": 1.0}]}, 400, "'image'"),
    ({"inputs": {"x": [1.0]}}, 400, "'image'"),
    ({"instances": [{"b64": "not base64!"}]}, 400, "base64"),
    ({"instances": []}, 400, "no image"),
])
def test_bad_predict_bodies_get_tf_servings_error_format(url, body, status, word):
    assert_tf_error(post(url, MODEL + ":predict", body), status, word)


def test_an_unknown_signature_name_is_quoted_short_not_echoed_whole(url):
    """A 1 MB name made a 1 MB error: the message quotes its first 40 characters."""
    response = post(url, MODEL + ":predict", {"signature_name": "x" * 1_000_000,
                                             "instances": [[0.0]]})
    assert_tf_error(response, 400, "x" * 40 + "…")
    assert len(response.content) < 1000


def test_malformed_json_is_400(url):
    response = requests.post(url + MODEL + ":predict", data=b'{"instances": [',
                             headers={"Content-Type": "application/json"}, timeout=5)
    assert_tf_error(response, 400, "JSON")


def test_classify_and_regress_are_refused_with_a_reason(url):
    for verb in ("classify", "regress"):
        assert_tf_error(post(url, f"{MODEL}:{verb}", {"examples": [{"x": 1.0}]}), 400, verb)


def test_an_unknown_path_under_v1_answers_in_tf_servings_format(url):
    assert_tf_error(requests.get(url + MODEL + "/labels/stable", timeout=5), 404)
