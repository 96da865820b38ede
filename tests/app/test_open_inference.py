"""The Open Inference Protocol (KServe V2), driven by NVIDIA's own client, tritonclient.

Nothing here builds V2 requests by hand except the error cases: ``tritonclient.http``
(from PyPI) talks to a real gunicorn exactly as it talks to Triton, with its defaults
(binary tensor data) and without them (JSON).
"""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from app.batching import Deadline
from app.errors import DeadlineExceeded
from app.model_store import ModelStore
from app.protocols.open_inference import InferRequest, infer_response
from tests.restyle import encode, ink_on_paper


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as connection:
        yield connection


@pytest.fixture(scope="module")
def digits(mnist) -> tuple[np.ndarray, np.ndarray]:
    """64 real test digits as the model's input, [64, 28, 28, 1] FP32, and their labels."""
    return (mnist.x_test[:64, ..., None] / 255.0).astype(np.float32), mnist.y_test[:64]


@pytest.fixture(scope="module")
def reference(url, digits) -> np.ndarray:
    """/predict's probabilities for the same digits."""
    response = requests.post(url + "/predict", json={"instances": digits[0].tolist()},
                             timeout=30)
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


def tensor(array: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    infer_input = triton.InferInput("image", list(array.shape), datatype)
    infer_input.set_data_from_numpy(array, binary_data=binary)
    return infer_input


def assert_v2_error(response: requests.Response, status: int, *words: str) -> None:
    """The protocol's error format: {"error": "<message>"}."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    for word in words:
        assert word in body["error"], body["error"]


def test_server_is_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()


def test_server_metadata_names_the_extensions_spoken(client):
    metadata = client.get_server_metadata()
    assert metadata["name"] == "mnist-digits" and metadata["version"]
    assert set(metadata["extensions"]) == {"binary_tensor_data", "classification",
                                           "model_repository", "statistics"}


def test_the_repository_index_lists_every_served_version_as_ready(client, served_models):
    index = client.get_model_repository_index()
    on_disk = sorted((m.name, v.name) for m in served_models.iterdir() for v in m.iterdir())
    assert sorted((row["name"], row["version"]) for row in index) == on_disk
    assert {row["state"] for row in index} == {"READY"}


def test_the_repository_index_refuses_a_body_that_is_not_an_object(url):
    response = requests.post(f"{url}/v2/repository/index", data=b"[1]", timeout=10)
    assert_v2_error(response, 400, "JSON object")


def test_model_readiness(client):
    assert client.is_model_ready("mnist_cnn")
    assert client.is_model_ready("mnist_cnn", "1")
    assert not client.is_model_ready("mnist_cnn", "9")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_describes_the_saved_signature(client):
    assert client.get_model_metadata("mnist_cnn") == {
        "name": "mnist_cnn", "versions": ["1"], "platform": "tensorflow_savedmodel",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1]}],
        "outputs": [{"name": "output_0", "datatype": "FP32", "shape": [-1, 10]}]}


def test_binary_fp32_inference_on_real_digits(client, digits, reference):
    """tritonclient's defaults: binary tensor data both ways."""
    images, labels = digits
    result = client.infer("mnist_cnn", [tensor(images, "FP32")])
    probabilities = result.as_numpy("output_0")
    assert probabilities.shape == (64, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, reference, atol=1e-5)
    assert (probabilities.argmax(axis=1) == labels).mean() >= 0.9
    assert result.get_response()["model_version"] == "1"


def test_json_fp32_inference(client, digits, reference):
    images, _ = digits
    result = client.infer("mnist_cnn", [tensor(images[:8], "FP32", binary=False)],
                          outputs=[triton.InferRequestedOutput("output_0", binary_data=False)])
    output = result.get_response()["outputs"][0]
    assert output["shape"] == [8, 10] and output["datatype"] == "FP32"
    assert len(output["data"]) == 80  # flat, row-major
    np.testing.assert_allclose(result.as_numpy("output_0"), reference[:8], atol=1e-5)


def test_uint8_pixels_in_every_accepted_shape_are_the_same_digits(client, mnist, reference):
    pixels = mnist.x_test[:64]
    for array in (pixels, pixels.reshape(64, 784), pixels[:, None], pixels[..., None]):
        result = client.infer("mnist_cnn", [tensor(array, "UINT8")])
        np.testing.assert_allclose(result.as_numpy("output_0"), reference, atol=1e-5)


def test_bytes_tensors_of_encoded_images_are_preprocessed(client, mnist):
    """A BYTES tensor of PNG/JPEG files: the /predict path, through the V2 protocol."""
    rng = np.random.default_rng(2)
    files = [encode(ink_on_paper(digit, rng), fmt)
             for digit, fmt in zip(mnist.x_test[:16], ["PNG", "JPEG"] * 8, strict=True)]
    for binary in (True, False):  # raw bytes in binary; base64 strings in JSON
        blobs = np.array(files if binary else [base64.b64encode(f) for f in files],
                         dtype=object)
        result = client.infer("mnist_cnn", [tensor(blobs, "BYTES", binary)])
        predicted = result.as_numpy("output_0").argmax(axis=1)
        assert (predicted == mnist.y_test[:16]).mean() >= 15 / 16


def test_classification_extension_gives_the_top_k(client, digits):
    images = [tensor(digits[0][:4], "FP32")]
    full = client.infer("mnist_cnn", images).as_numpy("output_0")  # unrounded float32
    result = client.infer("mnist_cnn", images,
                          outputs=[triton.InferRequestedOutput("output_0", class_count=3)])
    top = result.as_numpy("output_0")
    assert top.shape == (4, 3)
    for row, expected in zip(top, full, strict=True):
        scores, classes = zip(*(entry.decode().split(":") for entry in row), strict=True)
        assert [int(c) for c in classes] == list(np.argsort(-expected, kind="stable")[:3])
        np.testing.assert_allclose([float(s) for s in scores],
                                   np.sort(expected)[::-1][:3], atol=1e-5)


def test_request_id_and_compression(client, digits, reference):
    images, _ = digits
    for algorithm in ("gzip", "deflate"):
        result = client.infer("mnist_cnn", [tensor(images[:2], "FP32")], request_id="req-7",
                              request_compression_algorithm=algorithm)
        assert result.get_response()["id"] == "req-7"
        np.testing.assert_allclose(result.as_numpy("output_0"), reference[:2], atol=1e-5)


def test_a_pinned_version_is_served_and_a_missing_one_is_404(client, digits):
    images, _ = digits
    result = client.infer("mnist_cnn", [tensor(images[:1], "FP32")], model_version="1")
    assert result.get_response()["model_version"] == "1"
    with pytest.raises(InferenceServerException) as missing:
        client.infer("mnist_cnn", [tensor(images[:1], "FP32")], model_version="9")
    assert missing.value.status() == "404" and "version 9" in missing.value.message()


def test_client_errors_carry_the_servers_message(client, digits):
    images, _ = digits
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no_such_model", [tensor(images[:1], "FP32")])
    assert unknown.value.status() == "404" and "no_such_model" in unknown.value.message()
    wrong_shape = triton.InferInput("image", [1, 27, 28], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 27, 28), np.float32))
    with pytest.raises(InferenceServerException) as shape:
        client.infer("mnist_cnn", [wrong_shape])
    assert shape.value.status() == "422" and "27×28" in shape.value.message()


INFER = "/v2/models/mnist_cnn/infer"
ZEROS = {"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}


@pytest.mark.parametrize(("body", "status", "word"), [
    ({"inputs": [{**ZEROS, "name": "x"}]}, 400, "'image'"),
    ({"inputs": [ZEROS, ZEROS]}, 400, "one input"),
    ({"inputs": [{**ZEROS, "data": [0.0] * 700}]}, 400, "784"),
    ({"inputs": [{**ZEROS, "datatype": "INT8"}]}, 400, "INT8"),
    ({"inputs": [{**ZEROS, "datatype": ["FP32"]}]}, 400, "not supported"),
    ({"inputs": [{**ZEROS, "shape": [1, -28, 28]}]}, 400, "shape"),
    ({"inputs": [{**ZEROS, "data": ["a"] * 784}]}, 400, "FP32 numbers"),
    ({"inputs": [{**ZEROS, "data": [2.0] * 784}]}, 422, "[0, 1]"),
    ({"inputs": [ZEROS], "outputs": [{"name": "probabilities"}]}, 400, "output_0"),
    ({"inputs": [ZEROS], "outputs": [{"name": "output_0",
                                      "parameters": {"classification": 11}}]}, 400, "1 to 10"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["!!"]}]},
     400, "base64"),
    ({"inputs": [{"name": "image", "shape": [2, 2], "datatype": "BYTES",
                  "data": ["AA==", "AA==", "AA==", "AA=="]}]}, 400, "[N]"),
    ({"instances": []}, 400, "inputs"),
])
def test_bad_inference_requests_get_the_protocols_error(url, body, status, word):
    assert_v2_error(requests.post(url + INFER, json=body, timeout=10), status, word)


def test_binary_data_must_match_its_declared_sizes(url):
    header = (b'{"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "FP32", '
              b'"parameters": {"binary_data_size": 3136}}]}')
    for extra, word in ((b"\0" * 100, "runs past"), (b"\0" * 4000, "belong to no input")):
        response = requests.post(url + INFER, data=header + extra, timeout=10, headers={
            "Inference-Header-Content-Length": str(len(header))})
        assert_v2_error(response, 400, word)
    response = requests.post(url + INFER, data=header, timeout=10,
                             headers={"Inference-Header-Content-Length": "99999"})
    assert_v2_error(response, 400, "Inference-Header-Content-Length")


def test_health_endpoints_answer_json(url):
    assert requests.get(url + "/v2/health/live", timeout=5).json() == {"live": True}
    assert requests.get(url + "/v2/health/ready", timeout=5).json() == {"ready": True}


def images_predicted(url: str) -> float:
    """images_predicted_total for mnist_cnn, summed over the workers: what the model ran."""
    text = requests.get(url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('images_predicted_total{model="mnist_cnn",'))


@pytest.mark.parametrize(("outputs", "word"), [
    ([{"name": "output_0"}] * 5000, "more than once"),  # was 13.6 s, +920 MB, 167 MB
    ([{"name": "output_0"}, {"name": "probabilities"}], "'probabilities'"),
    ([], "names no output"),  # was 200 with "outputs": [] after running the model
])
def test_outputs_name_each_known_output_once_or_are_refused_before_the_model_runs(
        url, outputs, word):
    before = images_predicted(url)
    response = requests.post(url + INFER, json={"inputs": [ZEROS], "outputs": outputs},
                             timeout=30)
    assert_v2_error(response, 400, word)
    assert len(response.content) < 200  # the answer does not grow with the list
    assert images_predicted(url) == before


def test_one_requested_output_answers_one_tensor_of_the_images_size(url):
    response = requests.post(url + INFER, timeout=30, json={
        "inputs": [{**ZEROS, "shape": [2, 784], "data": [0.0] * 1568}],
        "outputs": [{"name": "output_0", "parameters": {"classification": 3}}]})
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["shape"] == [2, 3] and len(output["data"]) == 6


@pytest.mark.parametrize("parameters", [
    {"parameters": {"binary_data_output": "false"}},  # was read as true
    {"parameters": {"binary_data_output": 0}},
    {"outputs": [{"name": "output_0", "parameters": {"binary_data": "false"}}]},
])
def test_flags_are_json_booleans(url, parameters):
    response = requests.post(url + INFER, json={"inputs": [ZEROS], **parameters}, timeout=30)
    assert_v2_error(response, 400, "true or false")


def test_false_flags_answer_json(url):
    response = requests.post(url + INFER, timeout=30, json={
        "inputs": [ZEROS], "parameters": {"binary_data_output": False},
        "outputs": [{"name": "output_0", "parameters": {"binary_data": False}}]})
    assert response.status_code == 200 and len(response.json()["outputs"][0]["data"]) == 10


@pytest.mark.parametrize("data", [[True] + [0.5] * 783, [0.5] * 783 + ["0.5"],
                                  [0.5] * 783 + [None]])
def test_pixels_among_numbers_that_are_not_numbers_are_400(url, data):
    """NumPy reads [true, 0.5, ...] as floats without a trace; the protocol does not."""
    response = requests.post(url + INFER, json={"inputs": [{**ZEROS, "data": data}]},
                             timeout=30)
    assert_v2_error(response, 400, "FP32 numbers")


def test_a_request_id_is_a_string(url):
    response = requests.post(url + INFER, json={"inputs": [ZEROS], "id": [1] * 1000},
                             timeout=30)
    assert_v2_error(response, 400, '"id" must be a string')


def test_a_bytes_tensor_is_sized_by_its_shape_before_its_elements_are_read(url):
    """Its N is held to MAX_BATCH before the data is looked at, and a binary split stops
    one element past N, however many the data holds."""
    response = requests.post(url + INFER, timeout=30, json={"inputs": [
        {"name": "image", "shape": [300], "datatype": "BYTES", "data": ["AA=="]}]})
    assert_v2_error(response, 413, "MAX_BATCH")
    data = b"\0\0\0\0" * 100_000  # 100,000 empty elements
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(data)}}]})
    response = requests.post(url + INFER, data=header.encode() + data, timeout=30,
                             headers={"Inference-Header-Content-Length": str(len(header))})
    assert_v2_error(response, 400, "shape [1] but 2 elements")


def test_an_answer_is_not_written_past_the_requests_deadline(served_models, tmp_path):
    """The answer is built only while its client still waits (REQUEST_TIMEOUT_MS)."""
    shutil.copytree(served_models / "mnist_tiny", tmp_path / "mnist_tiny")
    store = ModelStore(tmp_path, "mnist_tiny")
    store.load()
    model = store.get("mnist_tiny")
    probabilities = np.full((1, 10), 0.1, np.float32)
    header, _ = infer_response(model, InferRequest(), probabilities, Deadline(60))
    assert header["outputs"][0]["shape"] == [1, 10]
    with pytest.raises(DeadlineExceeded, match="while the answer was written"):
        infer_response(model, InferRequest(), probabilities, Deadline(0))
    store.close()


def test_an_index_request_of_many_values_is_refused_unparsed(url):
    body = b'{"ready": true, "x": [' + b",".join([b"[]"] * 3_000_000) + b"]}"
    response = requests.post(f"{url}/v2/repository/index", data=body, timeout=60)
    assert_v2_error(response, 400, "JSON object")
