"""The HTTP API, against a real gunicorn serving really trained models (no mocks)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import shutil

import numpy as np
import pytest
import requests
import urllib3
from PIL import Image

from tests.restyle import encode, ink_on_paper

IMAGE_FORMATS = [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/gif", "GIF"),
                 ("image/bmp", "BMP"), ("image/webp", "WEBP"), ("image/tiff", "TIFF")]


@pytest.fixture(scope="module")
def seven(mnist):
    """The first test digit, a clear 7, as black ink on white paper."""
    assert mnist.y_test[0] == 7
    return ink_on_paper(mnist.x_test[0], np.random.default_rng(0)).convert("RGB")


def post_image(url: str, data: bytes, content_type: str, path: str = "/predict", **kw):
    return requests.post(url + path, data=data, headers={"Content-Type": content_type},
                         timeout=30, **kw)


def assert_error(response, status: int, code: str, *words: str):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    for word in words:
        assert word in error["message"], error["message"]


# --- operations ------------------------------------------------------------------------

def test_health_says_ok(url):
    assert requests.get(url + "/health", timeout=5).json() == {"status": "ok"}


def test_ready_lists_the_loaded_models(url):
    response = requests.get(url + "/ready", timeout=5)
    assert response.status_code == 200
    assert response.json()["models"] == {"mnist_cnn": 1, "mnist_scratch": 1, "mnist_tiny": 1}


def test_models_lists_every_model_and_the_default(url):
    body = requests.get(url + "/models", timeout=5).json()
    assert body["default"] == "mnist_cnn"
    assert [(m["name"], m["version"], m["versions"]) for m in body["models"]] == [
        ("mnist_cnn", 1, [1]), ("mnist_scratch", 1, [1]), ("mnist_tiny", 1, [1])]
    assert 0.9 < body["models"][0]["test_accuracy"] <= 1.0


def test_one_model_is_described(url):
    body = requests.get(url + "/models/mnist_tiny", timeout=5).json()
    assert body["arch"] == "tiny" and body["input"]["shape"] == [28, 28, 1]


def test_openapi_document_is_valid_and_covers_every_route(url, server):
    from openapi_spec_validator import validate

    spec = requests.get(url + "/openapi.json", timeout=5).json()
    validate(spec)
    assert set(spec["paths"]) == {
        "/predict", "/models/{name}/predict", "/summary", "/models/{name}/summary",
        "/models", "/models/{name}", "/health", "/ready", "/metrics", "/openapi.json",
        "/models/{name}/plots/{plot}.png", "/models/{name}/versions/{version}/predict",
        "/v1/models/{name}", "/v1/models/{name}/metadata", "/v1/models/{name}:predict",
        "/v1/models/{name}/versions/{version}", "/v1/models/{name}/versions/{version}/metadata",
        "/v1/models/{name}/versions/{version}:predict",
        "/v2", "/v2/health/live", "/v2/health/ready", "/v2/repository/index",
        "/v2/models/{name}",
        "/v2/models/{name}/ready", "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}", "/v2/models/{name}/versions/{version}/ready",
        "/v2/models/{name}/versions/{version}/infer", "/v2/models/stats",
        "/v2/models/{name}/stats", "/v2/models/{name}/versions/{version}/stats",
        "/models/{name}/labels/{label}/predict", "/v1/models/{name}/labels/{label}",
        "/v1/models/{name}/labels/{label}/metadata", "/v1/models/{name}/labels/{label}:predict",
        "/v2/models/{name}/labels/{label}/infer"}


# --- summary ---------------------------------------------------------------------------

def test_summary_gives_the_table_totals_memory_and_accuracy(url):
    body = requests.get(url + "/summary", timeout=5).json()
    assert body["model"] == {"name": "mnist_cnn", "version": 1}
    assert body["totals"]["params"] == 1_199_882
    assert body["totals"]["activations_per_image"] == 87_194
    assert [row["name"] for row in body["layers"]][:3] == ["image", "conv2d_1", "conv2d_2"]
    assert body["memory"]["batch_size"] == 1
    assert body["memory"]["forward_bytes"] == 87_194 * 4
    assert 0.9 < body["test_accuracy"] <= 1.0
    assert len(body["per_class_accuracy"]) == 10


def test_summary_scales_memory_for_a_batch_size(url):
    one = requests.get(url + "/summary", timeout=5).json()["memory"]
    many = requests.get(url + "/summary?batch_size=64", timeout=5).json()["memory"]
    assert many["forward_bytes"] == 64 * one["forward_bytes"]
    assert many["training_bytes"] == 2 * many["forward_bytes"]
    assert many["param_bytes"] == one["param_bytes"]


def test_a_named_models_summary(url):
    body = requests.get(url + "/models/mnist_tiny/summary", timeout=5).json()
    assert body["totals"]["params"] == 13_602


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1.5", "1_000", "\u0665", "\uff15", "+5",
                                   " 5", "05", "\U0001d7d3"])
def test_summary_refuses_a_bad_batch_size(url, value):
    """ASCII digits only: int() would take 1_000, Arabic-Indic ٥, fullwidth ５ and +5."""
    response = requests.get(url + f"/summary?batch_size={value}", timeout=5)
    assert_error(response, 400, "invalid_input", "batch_size")


# --- predict: every input form -----------------------------------------------------------

@pytest.mark.parametrize(("content_type", "fmt"), IMAGE_FORMATS)
def test_a_raw_image_body_of_every_common_type_is_read(url, seven, content_type, fmt):
    image = seven.convert("P") if fmt == "GIF" else seven
    response = post_image(url, encode(image, fmt), content_type)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "mnist_cnn", "version": 1}
    (prediction,) = body["predictions"]
    assert prediction["digit"] == 7
    assert len(prediction["probabilities"]) == 10
    assert prediction["confidence"] == pytest.approx(max(prediction["probabilities"]), abs=1e-6)
    assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-4)


def test_multipart_files_under_any_field_names_keep_their_order(url, mnist):
    rng = np.random.default_rng(1)
    blobs = [encode(ink_on_paper(mnist.x_test[i], rng), "PNG") for i in range(8)]
    files = [(f"field{i % 3}", (f"d{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]
    batch = requests.post(url + "/predict", files=files, timeout=30).json()["predictions"]
    single = [post_image(url, blob, "image/png").json()["predictions"][0] for blob in blobs]
    assert [p["digit"] for p in batch] == [p["digit"] for p in single]
    np.testing.assert_allclose([p["probabilities"] for p in batch],
                               [p["probabilities"] for p in single], atol=1e-5)


def test_json_arrays_are_taken_as_mnist_form(url, mnist):
    arrays = (mnist.x_test[:20] / 255.0).round(4)
    response = requests.post(url + "/predict", json={"instances": arrays.tolist()}, timeout=30)
    digits = [p["digit"] for p in response.json()["predictions"]]
    assert np.mean(np.array(digits) == mnist.y_test[:20]) >= 0.9


def test_json_arrays_with_a_channel_axis_are_accepted(url, mnist):
    array = (mnist.x_test[0] / 255.0)[..., np.newaxis].tolist()
    response = requests.post(url + "/predict", json={"instances": [array]}, timeout=30)
    assert response.json()["predictions"][0]["digit"] == 7


def test_json_b64_images_follow_tf_servings_convention(url, seven):
    b64 = base64.b64encode(encode(seven, "JPEG")).decode()
    response = requests.post(url + "/predict", json={"instances": [{"b64": b64}]}, timeout=30)
    assert response.json()["predictions"][0]["digit"] == 7


def test_mixed_json_instances_keep_their_order(url, mnist, seven):
    b64 = base64.b64encode(encode(seven, "PNG")).decode()
    one = (mnist.x_test[2] / 255.0).tolist()  # a 1
    body = requests.post(url + "/predict", json={"instances": [one, {"b64": b64}, one]},
                         timeout=30).json()
    assert [p["digit"] for p in body["predictions"]] == [1, 7, 1]


def test_preprocess_none_takes_a_28x28_digit_as_it_is(url, mnist):
    png = encode(Image.fromarray(mnist.x_test[0]), "PNG")
    raw = post_image(url, png, "image/png", path="/predict?preprocess=none").json()
    array = requests.post(url + "/predict", timeout=30,
                          json={"instances": [(mnist.x_test[0] / 255.0).tolist()]}).json()
    np.testing.assert_allclose(raw["predictions"][0]["probabilities"],
                               array["predictions"][0]["probabilities"], atol=1e-5)


def test_explain_returns_the_28x28_image_the_model_received(url, seven):
    response = post_image(url, encode(seven, "PNG"), "image/png", path="/predict?explain=1")
    seen = response.json()["predictions"][0]["input_png"]
    with Image.open(io.BytesIO(base64.b64decode(seen))) as image:
        pixels = np.asarray(image)
    assert pixels.shape == (28, 28) and pixels.max() == 255 and pixels[0, 0] == 0
    plain = post_image(url, encode(seven, "PNG"), "image/png").json()["predictions"][0]
    assert "input_png" not in plain


def test_explain_accepts_only_0_or_1(url, seven):
    response = post_image(url, encode(seven, "PNG"), "image/png", path="/predict?explain=yes")
    assert_error(response, 400, "invalid_input", "explain")


def test_training_plots_are_served_with_the_model(url):
    plots = requests.get(url + "/models/mnist_cnn", timeout=5).json()["plots"]
    assert [p["url"] for p in plots] == [f"/models/mnist_cnn/plots/{n}.png"
                                         for n in ("history", "confusion", "samples")]
    response = requests.get(url + plots[0]["url"], timeout=5)
    assert response.headers["Content-Type"] == "image/png"
    assert response.content.startswith(b"\x89PNG")
    assert_error(requests.get(url + "/models/mnist_cnn/plots/secret.png", timeout=5), 400,
                 "invalid_input")


def test_the_pages_are_html(url):
    for path in ("/", "/model"):
        response = requests.get(url + path, timeout=5)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/html")
    assert 'id="pad"' in requests.get(url + "/", timeout=5).text


def test_every_answer_carries_a_content_security_policy_and_refuses_framing(url):
    for path in ("/", "/model", "/models", "/no/such/page"):
        headers = requests.get(url + path, timeout=5).headers
        policy = headers["Content-Security-Policy"]
        for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'",
                          "frame-ancestors 'none'", "base-uri 'none'"):
            assert directive in policy, (path, policy)
        assert "unsafe" not in policy
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"


def test_the_numpy_trained_model_is_served_like_any_other(url, mnist):
    body = requests.post(url + "/models/mnist_scratch/predict", timeout=30, json={
        "instances": (mnist.x_test[:50] / 255.0).tolist()}).json()
    assert body["model"] == {"name": "mnist_scratch", "version": 1}
    digits = np.array([p["digit"] for p in body["predictions"]])
    assert (digits == mnist.y_test[:50]).mean() > 0.7
    summary = requests.get(url + "/models/mnist_scratch/summary", timeout=5).json()
    assert summary["totals"]["params"] == 13_602


def test_a_named_model_answers_for_itself(url, seven):
    response = post_image(url, encode(seven, "PNG"), "image/png",
                          path="/models/mnist_tiny/predict")
    assert response.json()["model"] == {"name": "mnist_tiny", "version": 1}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_an_npy_batch_is_read_in_order(url, mnist, dtype):
    pixels = mnist.x_test[:32]
    array = pixels if dtype == "uint8" else (pixels / 255.0).astype(np.float32)
    response = post_image(url, npy_bytes(array), "application/x-npy")
    digits = np.array([p["digit"] for p in response.json()["predictions"]])
    reference = requests.post(url + "/predict", timeout=30, json={
        "instances": (pixels / 255.0).tolist()}).json()["predictions"]
    assert digits.tolist() == [p["digit"] for p in reference]
    assert (digits == mnist.y_test[:32]).mean() >= 0.9


@pytest.mark.parametrize("form", ["json", "npy", "image", "multipart"])
def test_gzip_bodies_are_accepted_for_every_form(url, mnist, seven, form):
    if form == "multipart":
        prepared = requests.Request("POST", url + "/predict", files=[
            ("a", ("a.png", encode(seven, "PNG"), "image/png")),
            ("b", ("b.png", encode(seven, "JPEG"), "image/jpeg"))]).prepare()
        body, content_type = prepared.body, prepared.headers["Content-Type"]
    elif form == "json":
        body = json.dumps({"instances": [(mnist.x_test[0] / 255.0).tolist()]}).encode()
        content_type = "application/json"
    elif form == "npy":
        body, content_type = npy_bytes(mnist.x_test[:1]), "application/x-npy"
    else:
        body, content_type = encode(seven, "PNG"), "image/png"
    response = requests.post(url + "/predict", data=gzip.compress(body), timeout=30,
                             headers={"Content-Type": content_type,
                                      "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    assert {p["digit"] for p in response.json()["predictions"]} == {7}


def test_a_json_image_batch_shrinks_with_gzip_and_is_answered_whole(url, mnist):
    body = json.dumps({"instances": (mnist.x_test[:256] / 255.0).round(4).tolist()}).encode()
    compressed = gzip.compress(body)
    assert len(body) / len(compressed) > 8
    response = requests.post(url + "/predict", data=compressed, timeout=60, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text
    digits = [p["digit"] for p in response.json()["predictions"]]
    assert len(digits) == 256 and np.mean(np.array(digits) == mnist.y_test[:256]) > 0.9


# --- predict: every error -----------------------------------------------------------------

def test_a_truncated_png_is_400(url, seven):
    png = encode(seven, "PNG")
    assert_error(post_image(url, png[: len(png) // 2], "image/png"), 400, "invalid_input",
                 "truncated")


def test_a_png_bomb_over_pillows_own_limit_is_422(url, png_bomb):
    # 400 MP trips Pillow's decompression-bomb guard first; our own MAX_IMAGE_PIXELS
    # check is tested over HTTP with an image between the two limits (test_bad_input.py).
    assert_error(post_image(url, png_bomb, "image/png"), 422, "unprocessable_input",
                 "too large", "Pillow")


def test_a_text_file_sent_as_png_is_400(url):
    assert_error(post_image(url, b"just some text\n" * 10, "image/png"), 400,
                 "invalid_input", "not a readable image")


def test_an_empty_body_is_400(url):
    assert_error(post_image(url, b"", "image/png"), 400, "invalid_input", "empty")


def test_a_body_over_10_mb_is_413(url):
    assert_error(post_image(url, b"\0" * (11 * 1024 * 1024), "image/png"), 413,
                 "payload_too_large")


def test_more_than_max_batch_instances_is_413(url):
    instances = [[[0.0] * 28] * 28] * 300
    response = requests.post(url + "/predict", json={"instances": instances}, timeout=30)
    assert_error(response, 413, "payload_too_large", "300", "256")


def test_nan_is_422(url):
    body = '{"instances": [' + json.dumps([[0.0] * 28] * 27)[:-1] + ", [" + \
        ", ".join(["NaN"] * 28) + "]]]}"
    response = post_image(url, body.encode(), "application/json")
    assert_error(response, 422, "unprocessable_input", "NaN")


def test_a_27x28_array_is_422(url):
    response = requests.post(url + "/predict", json={"instances": [[[0.5] * 28] * 27]},
                             timeout=30)
    assert_error(response, 422, "unprocessable_input", "27×28")


def test_values_outside_unit_range_are_422(url):
    response = requests.post(url + "/predict", json={"instances": [[[255.0] * 28] * 28]},
                             timeout=30)
    assert_error(response, 422, "unprocessable_input", "[0, 1]")


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"inputs": []}',
                                  b'{"instances": []}', b'{"instances": [{"b64": "%%%"}]}'])
def test_malformed_json_is_400(url, body):
    assert_error(post_image(url, body, "application/json"), 400, "invalid_input")


def error_message(response) -> str:
    """The message of either error shape: ours, or the protocols' plain one."""
    error = response.json()["error"]
    return error if isinstance(error, str) else error["message"]


ZEROS_V2 = '"inputs": [{"name": "image", "shape": [1, 784], "datatype": "FP32", "data": ' + \
    json.dumps([0.0] * 784) + "}]"
LONE_SURROGATES = [  # (path, JSON text with a lone surrogate where the route reads a string)
    ("/predict", '{"instances": [{"b64": "\\ud800"}]}'),
    ("/predict", '{"instances": [[[0]]], "\\udc00": 1}'),
    ("/v1/models/mnist_cnn:predict", '{"signature_name": "\\ud800", "instances": [[0]]}'),
    ("/v2/models/mnist_cnn/infer", '{"id": "\\ud800", ' + ZEROS_V2 + "}"),  # echoed after the run
    ("/v2/models/mnist_cnn/infer", '{"id": "a\\udfffb", ' + ZEROS_V2 + ', "x": NaN}'),
    ("/v2/repository/index", '{"ready": true, "\\ud800": 1}'),
]


@pytest.mark.parametrize("path, text", LONE_SURROGATES)
def test_a_lone_surrogate_in_json_is_400_on_every_json_route(url, path, text):
    """Half a UTF-16 pair is no Unicode text: orjson refuses it, and so must the fallback
    parser, or the string breaks the answer that echoes it (a 500)."""
    response = requests.post(url + path, data=text.encode(), timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert "lone UTF-16 surrogate" in error_message(response)


def test_a_surrogate_pair_in_json_is_text_like_any_other(url):
    body = '{"id": "\\ud83d\\ude00", ' + ZEROS_V2 + "}"
    response = requests.post(url + "/v2/models/mnist_cnn/infer", data=body.encode(),
                             timeout=30, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "\U0001f600"


def test_an_unsupported_media_type_is_415(url):
    assert_error(post_image(url, b"7", "text/plain"), 415, "unsupported_media_type",
                 "image/png")


def test_multipart_with_form_fields_only_is_400_naming_the_missing_files(url):
    body, content_type = urllib3.encode_multipart_formdata({"note": "no file"})
    assert_error(post_image(url, body, content_type), 400, "invalid_input", "no file parts")


def test_multipart_with_an_empty_file_part_is_400_naming_the_empty_image(url):
    response = requests.post(url + "/predict", data={"note": "no file"}, timeout=30,
                             files={"x": ("", b"", "")})
    assert_error(response, 400, "invalid_input", "empty image")


def test_a_gzip_bomb_is_413(url):
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 1024 * 1024
    response = requests.post(url + "/predict", data=bomb, timeout=30, headers={
        "Content-Type": "application/x-npy", "Content-Encoding": "gzip"})
    assert_error(response, 413, "payload_too_large", "decompresses")


def test_a_body_that_is_not_really_gzip_is_400(url, seven):
    response = requests.post(url + "/predict", data=encode(seven, "PNG"), timeout=30,
                             headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})
    assert_error(response, 400, "invalid_input", "gzip")


def test_an_unknown_content_encoding_is_415(url, seven):
    response = requests.post(url + "/predict", data=encode(seven, "PNG"), timeout=30,
                             headers={"Content-Type": "image/png", "Content-Encoding": "br"})
    assert_error(response, 415, "unsupported_media_type", "gzip")


@pytest.mark.parametrize(("array", "status", "code", "words"), [
    (np.zeros((2, 27, 28), np.float32), 422, "unprocessable_input", "2×27×28"),
    (np.full((1, 28, 28), np.nan, np.float32), 422, "unprocessable_input", "NaN"),
    (np.full((1, 28, 28), 2.0, np.float32), 422, "unprocessable_input", "[0, 1]"),
    (np.zeros((300, 28, 28), np.uint8), 413, "payload_too_large", "MAX_BATCH"),
    (np.array(["a", "b"]), 422, "unprocessable_input", "numbers"),
])
def test_bad_npy_arrays_are_refused(url, array, status, code, words):
    assert_error(post_image(url, npy_bytes(array), "application/x-npy"), status, code, words)


def test_a_pickled_npy_is_refused(url):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    assert_error(post_image(url, buffer.getvalue(), "application/x-npy"), 422,
                 "unprocessable_input", "numbers", "object")


def test_get_on_predict_is_405_with_allow(url):
    response = requests.get(url + "/predict", timeout=5)
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_an_unknown_model_is_404(url, seven):
    response = post_image(url, encode(seven, "PNG"), "image/png", path="/models/nope/predict")
    assert_error(response, 404, "model_not_found", "nope", "mnist_cnn")
    assert_error(requests.get(url + "/models/nope/summary", timeout=5), 404,
                 "model_not_found")


def test_an_unknown_path_is_a_json_404(url):
    assert_error(requests.get(url + "/no/such/page", timeout=5), 404, "not_found")


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/models//mnist_cnn", None), ("GET", "//models///mnist_cnn", None),
    ("GET", "/v1/models//mnist_cnn", None),
    ("POST", "/v2//models/mnist_cnn/infer", "{" + ZEROS_V2 + "}"),
    ("POST", "/v1/models//mnist_cnn:predict", json.dumps({"instances": [[[0.0] * 28] * 28]})),
])
def test_doubled_slashes_are_answered_in_place_never_redirected_to_the_host_header(
        url, method, path, body):
    """Werkzeug answered 308 to http://<Host header>/... with an HTML body, POSTs too."""
    response = requests.request(method, url + path, data=body, allow_redirects=False,
                                timeout=30, headers={"Host": "evil.example",
                                                     "Content-Type": "application/json"})
    assert "Location" not in response.headers
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("version", ["\u0661", "\u06f1", "\uff11", "\U0001d7cf", "01", "001"])
@pytest.mark.parametrize("method, template", [
    ("GET", "/v2/models/mnist_cnn/versions/{}"),
    ("GET", "/v2/models/mnist_cnn/versions/{}/ready"),
    ("GET", "/v1/models/mnist_cnn/versions/{}"),
    ("POST", "/v1/models/mnist_cnn/versions/{}:predict"),
    ("POST", "/v2/models/mnist_cnn/versions/{}/infer"),
    ("POST", "/models/mnist_cnn/versions/{}/predict"),
])
def test_a_version_in_a_path_is_ascii_digits_only(url, method, template, version):
    """Each of these spells 1 to int() and to Werkzeug's <int:> (\\d+); none is version 1."""
    response = requests.request(method, url + template.format(version), timeout=30)
    assert response.status_code == 404, response.text
    assert response.headers["Content-Type"].startswith("application/json")


def test_one_bad_image_in_a_batch_is_named(url, seven):
    files = [("a", ("a.png", encode(seven, "PNG"), "image/png")),
             ("b", ("b.png", b"broken", "image/png"))]
    assert_error(requests.post(url + "/predict", files=files, timeout=30), 400,
                 "invalid_input", "image 1")


# --- request ids, metrics, and health after all of the above ---------------------------------

def test_a_request_id_is_honoured_and_logged(url, server):
    response = requests.get(url + "/health", headers={"X-Request-ID": "trace-abc-123"},
                            timeout=5)
    assert response.headers["X-Request-ID"] == "trace-abc-123"
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "trace-abc-123" and line.get("status") == 200
               for line in lines)


def test_a_request_id_is_generated_when_absent(url):
    assert len(requests.get(url + "/health", timeout=5).headers["X-Request-ID"]) == 32


def metric(url: str, name: str) -> float:
    """One sample's value from /metrics (0 when absent), summed over all workers."""
    text = requests.get(url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " "))


def test_metrics_count_requests_images_and_load_time(url, seven):
    ok = 'http_requests_total{endpoint="/predict",method="POST",status="200"}'
    images = 'images_predicted_total{model="mnist_cnn",version="1"}'
    seconds = 'http_request_duration_seconds_count{endpoint="/predict"}'
    before = {name: metric(url, name) for name in (ok, images, seconds)}
    for _ in range(3):
        assert post_image(url, encode(seven, "PNG"), "image/png").status_code == 200
    files = [(f"f{i}", (f"{i}.png", encode(seven, "PNG"), "image/png")) for i in range(2)]
    assert requests.post(url + "/predict", files=files, timeout=30).status_code == 200
    after = {name: metric(url, name) for name in (ok, images, seconds)}
    assert after[ok] - before[ok] == 4
    assert after[images] - before[images] == 5
    assert after[seconds] - before[seconds] == 4
    assert metric(url, 'model_load_seconds{model="mnist_cnn",version="1"}') > 0


def test_json_nested_too_deep_is_400_not_a_crash(url):
    body = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(post_image(url, body, "application/json"), 400, "invalid_input")


def test_a_batch_over_the_request_pixel_budget_is_413(url):
    big = encode(Image.new("L", (6000, 6000), 255), "PNG")  # 36 MP each, tiny on the wire
    files = [(f"f{i}", (f"{i}.png", big, "image/png")) for i in range(5)]
    assert_error(requests.post(url + "/predict", files=files, timeout=60), 413,
                 "payload_too_large", "MAX_REQUEST_PIXELS")


BAD_REQUESTS = [  # (content type, body), one of each kind of bad input above
    ("image/png", b""), ("image/png", b"just some text\n"), ("application/json", b"{not"),
    ("application/json", b'{"instances": [{"image": {}}]}'),
    ("application/json", b'{"instances": [[' + b"[" * 50_000 + b"]" * 50_000 + b"]]}"),
    ("application/x-npy", b"\x93NUMPY\x01\x00garbage"), ("text/plain", b"7"),
]


def test_bad_requests_are_4xx_and_leave_the_service_healthy(url, server):
    tags = {}
    for index, (content_type, body) in enumerate(BAD_REQUESTS):
        tag = f"bad-request-{index}-{id(tags)}"
        response = requests.post(url + "/predict", data=body, timeout=30, headers={
            "Content-Type": content_type, "X-Request-ID": tag})
        assert 400 <= response.status_code < 500, (content_type, body[:40], response.text)
        tags[tag] = response.status_code
    assert requests.get(url + "/ready", timeout=5).status_code == 200
    assert server.process.poll() is None
    logged = {line["request_id"]: line["status"] for line in map(json.loads, (
        text for text in server.log().splitlines() if text.startswith("{")))
        if line.get("request_id") in tags}
    assert logged == tags  # every one logged, with the status the client saw


@pytest.fixture
def plot_client(tmp_path, served_models):
    """An app serving a copy of the tiny net, whose plots the test may replace."""
    from app import create_app
    from app.config import Config

    shutil.copytree(served_models / "mnist_tiny" / "1", tmp_path / "mnist_tiny" / "1")
    app = create_app(Config(models_dir=tmp_path, model_name="mnist_tiny",
                            model_poll_seconds=0))
    return app.test_client(), tmp_path / "mnist_tiny" / "1" / "plots"


def test_a_plot_that_is_no_regular_file_inside_its_version_is_never_served(
        plot_client, tmp_path):
    client, plots = plot_client
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (plots / "history.png").unlink()
    (plots / "history.png").symlink_to("/etc/passwd")
    (plots / "confusion.png").unlink()
    (plots / "confusion.png").symlink_to(secret)
    (plots / "samples.png").unlink()
    os.mkfifo(plots / "samples.png")
    assert client.get("/models/mnist_tiny").get_json()["plots"] == []
    for plot in ("history", "confusion", "samples"):
        response = client.get(f"/models/mnist_tiny/plots/{plot}.png")
        assert response.status_code == 404, plot
        assert response.get_json()["error"]["code"] == "model_not_found"
        assert b"root:" not in response.data


def test_a_plot_hard_linked_to_another_file_is_never_served(plot_client, tmp_path):
    """A hard link is a regular file inside the version: only the manifest's SHA-256
    (which nobody can write for a file they cannot read) tells it from the plot."""
    client, plots = plot_client
    secret = tmp_path / "shadow"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nroot:$6$secret:19000:0:99999:7:::\n")
    (plots / "confusion.png").unlink()
    os.link(secret, plots / "confusion.png")
    response = client.get("/models/mnist_tiny/plots/confusion.png")
    assert response.status_code == 404
    assert b"root:" not in response.data


def test_a_plot_linked_inside_its_version_is_served(plot_client):
    client, plots = plot_client
    (plots / "history.png").rename(plots / "history-v1.png")
    (plots / "history.png").symlink_to("history-v1.png")
    response = client.get("/models/mnist_tiny/plots/history.png")
    assert response.status_code == 200 and response.data.startswith(b"\x89PNG")
    assert response.headers["Content-Type"] == "image/png"


@pytest.mark.parametrize("header", ["abc\n", "a" * 129, "two words", "ü"])
def test_a_request_id_outside_the_rule_is_replaced_whole(header):
    """HTTP and gRPC cannot deliver a newline today; the rule must not lean on that (a
    trailing newline passed `^...$` with `match`)."""
    from app.logs import request_id_from

    replaced = request_id_from(header)
    assert replaced != header and len(replaced) == 32
