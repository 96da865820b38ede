"""gRPC beside REST, driven by the clients nobody here wrote: ``tritonclient.grpc`` for
the Open Inference Protocol and tensorflow-serving-api's stubs for TF Serving, against
the session's real gunicorn (its workers each serve GRPC_PORT), answers compared with
the same server's REST endpoints on real test digits. Overload and deadlines use the
real app and batcher in process, served by the same ``app.grpc_server.start``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from app import create_app, grpc_server
from app.config import Config
from tests.conftest import ROOT, free_port, hold_model, wait_until
from tests.restyle import encode, ink_on_paper

MODEL = "mnist_cnn"


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.grpc) as connection:
        yield connection


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc) as opened:
        yield opened


@pytest.fixture(scope="module")
def digits(mnist) -> tuple[np.ndarray, np.ndarray]:
    """16 real test digits, [16, 28, 28, 1] FP32, and their labels."""
    return (mnist.x_test[:16, ..., None] / 255.0).astype(np.float32), mnist.y_test[:16]


@pytest.fixture(scope="module")
def rest_v2(url, digits) -> np.ndarray:
    """The REST Open Inference Protocol's probabilities for the digits."""
    images = digits[0]
    response = requests.post(f"{url}/v2/models/{MODEL}/infer", timeout=30, json={"inputs": [
        {"name": "image", "datatype": "FP32", "shape": list(images.shape),
         "data": images.ravel().tolist()}]})
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.array(output["data"], np.float32).reshape(output["shape"])


def infer_input(array: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("image", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def probabilities(result: triton.InferResult) -> np.ndarray:
    (output,) = result.get_response().outputs
    return result.as_numpy(output.name)


# --- inference.GRPCInferenceService, through tritonclient.grpc -------------------------------

def test_server_and_model_health_and_metadata_match_rest_v2(client, url):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    served = client.get_server_metadata(as_json=True)
    rest = requests.get(f"{url}/v2", timeout=10).json()
    assert (served["name"], served["version"], served["extensions"]) == \
        (rest["name"], rest["version"], rest["extensions"])
    metadata = client.get_model_metadata(MODEL, as_json=True)
    rest = requests.get(f"{url}/v2/models/{MODEL}", timeout=10).json()
    for tensor in (*metadata["inputs"], *metadata["outputs"]):
        tensor["shape"] = [int(size) for size in tensor["shape"]]  # int64 is a JSON string
    assert metadata == rest


def test_the_repository_index_matches_rest_v2(client, url):
    index = client.get_model_repository_index(as_json=True)["models"]
    rest = requests.post(f"{url}/v2/repository/index", json={}, timeout=10).json()
    assert index == rest
    assert {row["name"] for row in index if row["state"] == "READY"} >= {MODEL, "mnist_tiny"}


def test_raw_fp32_in_both_digit_shapes_is_the_rest_v2_answer(client, digits, rest_v2):
    images, labels = digits
    for array in (images, images[..., 0]):  # [N, 28, 28, 1] and [N, 28, 28]
        answer = probabilities(client.infer(MODEL, [infer_input(array)]))
        np.testing.assert_allclose(answer, rest_v2, atol=1e-6)
    assert (rest_v2.argmax(1) == labels).mean() >= 0.9


def test_fp32_contents_are_read_like_raw_contents(channel, digits, rest_v2):
    """tritonclient always sends raw_input_contents; other clients send ``contents``."""
    images = digits[0][..., 0]
    request = service_pb2.ModelInferRequest(model_name=MODEL, inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype="FP32", shape=list(images.shape),
            contents=service_pb2.InferTensorContents(fp32_contents=images.ravel()))])
    response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    (output,) = response.outputs
    answer = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(output.shape)
    np.testing.assert_allclose(answer, rest_v2, atol=1e-6)


def test_bytes_pngs_are_preprocessed_like_predict(client, url, mnist):
    rng = np.random.default_rng(25)
    pngs = [encode(ink_on_paper(image, rng), "PNG") for image in mnist.x_test[:4]]
    tensor = infer_input(np.array(pngs, dtype=object), "BYTES")
    answer = probabilities(client.infer(MODEL, [tensor]))
    rest = requests.post(f"{url}/predict", timeout=30,
                         files=[("image", (f"{i}.png", png, "image/png"))
                                for i, png in enumerate(pngs)]).json()["predictions"]
    np.testing.assert_allclose(answer, [p["probabilities"] for p in rest], atol=1e-5)
    assert list(answer.argmax(1)) == [p["digit"] for p in rest]


def test_classification_gives_the_top_k_as_triton_does(client, digits, rest_v2):
    output = triton.InferRequestedOutput("output_0", class_count=3)
    result = client.infer(MODEL, [infer_input(digits[0][:2])], outputs=[output])
    top = result.as_numpy("output_0")
    assert top.shape == (2, 3)
    assert [int(item.split(b":")[1]) for item in top[:, 0]] == list(rest_v2[:2].argmax(1))


# --- tensorflow.serving.PredictionService / ModelService, through TF Serving's stubs --------

def test_tf_serving_predict_metadata_and_status_match_rest(channel, url, digits):
    import tensorflow as tf
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = MODEL, "serving_default"
    request.model_spec.version.value = 1
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(digits[0]))
    response = stub.Predict(request, timeout=30)
    rest = requests.post(f"{url}/v1/models/{MODEL}/versions/1:predict", timeout=30,
                         json={"instances": digits[0].tolist()}).json()["predictions"]
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["output_0"]), rest, atol=1e-6)
    assert (response.model_spec.name, response.model_spec.version.value) == (MODEL, 1)

    metadata = stub.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=request.model_spec, metadata_field=["signature_def"]), timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert metadata.metadata["signature_def"].Unpack(signatures)
    rest = requests.get(f"{url}/v1/models/{MODEL}/metadata", timeout=10).json()
    assert signatures == json_format.ParseDict(rest["metadata"]["signature_def"],
                                               get_model_metadata_pb2.SignatureDefMap())
    assert "serving_default" in signatures.signature_def

    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec=request.model_spec), timeout=10)
    rest = requests.get(f"{url}/v1/models/{MODEL}/versions/1", timeout=10).json()
    assert json_format.MessageToDict(status)["model_version_status"] == \
        [{"version": row["version"], "state": row["state"], "status": {}}
         for row in rest["model_version_status"]]


# --- status codes ----------------------------------------------------------------------------

def raw_infer(channel, shape, datatype="FP32", raw=b"", model=MODEL, version=""):
    request = service_pb2.ModelInferRequest(
        model_name=model, model_version=version, raw_input_contents=[raw],
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype=datatype, shape=shape)])
    return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


@pytest.mark.parametrize(("call", "code", "word"), [
    (dict(shape=[2, 28, 28], raw=bytes(784 * 4)), "INVALID_ARGUMENT", "needs 6272 bytes"),
    (dict(shape=[1, 28, 28], datatype="INT8", raw=bytes(784)), "INVALID_ARGUMENT",
     "not supported"),
    (dict(shape=[1, 27, 29], raw=bytes(27 * 29 * 4)), "INVALID_ARGUMENT", "expected N×28×28"),
    (dict(shape=[2**63 - 1, 28, 28], raw=bytes(16)), "INVALID_ARGUMENT", "MAX_BATCH"),
    (dict(shape=[257, 784], raw=bytes(257 * 784)), "INVALID_ARGUMENT", "MAX_BATCH"),
    (dict(shape=[1, 28, 28], raw=np.full(784, 2, "<f4").tobytes()), "INVALID_ARGUMENT",
     "[0, 1]"),
    (dict(shape=[1, 28, 28], raw=bytes(3136), model="nope"), "NOT_FOUND", "no model"),
    # a name echoed whole would make the status's details over gRPC's 16 KiB metadata
    # limit, and the client would see RESOURCE_EXHAUSTED ("Stream removed") instead
    (dict(shape=[1, 28, 28], raw=bytes(3136), model="n" * 20000), "NOT_FOUND", "no model"),
    (dict(shape=[1, 28, 28], raw=bytes(3136), version="9"), "NOT_FOUND", "version 9"),
    (dict(shape=[1, 28, 28], raw=bytes(3136), version="v1"), "INVALID_ARGUMENT", "version"),
])
def test_bad_calls_get_the_anchors_status_codes(channel, call, code, word):
    with pytest.raises(grpc.RpcError) as caught:
        raw_infer(channel, **call)
    assert caught.value.code().name == code, caught.value.details()
    assert word in caught.value.details()


def test_a_message_over_max_content_length_is_refused_by_grpc_itself(channel):
    with pytest.raises(grpc.RpcError) as caught:
        raw_infer(channel, [1, 28, 28], raw=bytes(10 * 1024 * 1024 + 1))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_tritonclient_reports_the_servers_message(client, digits):
    with pytest.raises(InferenceServerException, match="no model named 'nope'") as caught:
        client.infer("nope", [infer_input(digits[0][:1])])
    assert caught.value.status() == "StatusCode.NOT_FOUND"


# --- health, reflection, metrics, access lines ------------------------------------------------

def test_health_per_model_and_reflection_list_every_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", MODEL, "mnist_tiny", "inference.GRPCInferenceService",
                    "tensorflow.serving.PredictionService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=10)
    assert {s.name for s in answer.list_services_response.service} == {
        "inference.GRPCInferenceService", "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService", "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection"}


def handled(url: str, method: str, code: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf'^grpc_server_handled_total\{{grpc_code="{code}",grpc_method='
                      rf'"{method}",grpc_service="[^"]+"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_calls_are_counted_by_method_and_code_and_logged_as_rest_requests(server, channel):
    before = handled(server.url, "ModelInfer", "NOT_FOUND")
    with pytest.raises(grpc.RpcError):
        raw_infer(channel, [1, 28, 28], raw=bytes(3136), model="counted")
    assert handled(server.url, "ModelInfer", "NOT_FOUND") == before + 1
    wait_until(lambda: '"path": "/inference.GRPCInferenceService/ModelInfer", '
               '"status": "NOT_FOUND"' in server.log(), "the access line", timeout=10)


def test_a_second_server_refuses_a_grpc_port_the_first_holds(server, tmp_path):
    """SO_REUSEPORT would let it share the port (and half the calls) silently."""
    environment = {**os.environ, "MODELS_DIR": str(tmp_path), "PORT": str(free_port()),
                   "GRPC_PORT": server.grpc.rsplit(":", 1)[1]}
    second = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py",
                             "app:create_app()"], cwd=ROOT, env=environment, timeout=60,
                            capture_output=True, text=True)
    assert second.returncode == 1
    assert f"GRPC_PORT {environment['GRPC_PORT']} is in use" in second.stderr


# --- the same batcher and deadline, in process -------------------------------------------------

@pytest.fixture
def serve_app(fit_run):
    """The real app on the trained export, with its gRPC server on a free port."""
    made = []

    def build(**settings):
        app = create_app(Config(models_dir=fit_run.models_dir, grpc_port=free_port(),
                                **settings))
        made.append((app, grpc_server.start(app)))
        return app, made[-1][1]

    yield build
    for app, running in made:
        running.stop(0)
        app.extensions["model_store"].close()


def test_a_full_queue_is_unavailable_and_a_passed_deadline_drops_the_work(serve_app, mnist):
    app, running = serve_app(queue_max_requests=2, batch_timeout_ms=0)
    batcher = app.extensions["model_store"].get().batcher
    gate, calls = hold_model(app)
    digit = (mnist.x_test[:1] / 255.0).astype("<f4").tobytes()
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, \
            ThreadPoolExecutor(2) as pool:
        first = pool.submit(raw_infer, channel, [1, 28, 28], raw=digit)
        wait_until(lambda: calls, "the first model call")
        second = pool.submit(raw_infer, channel, [1, 28, 28], raw=digit)
        wait_until(lambda: len(batcher._queue) == 1, "one queued")
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        late = service_pb2.ModelInferRequest(
            model_name=MODEL, raw_input_contents=[digit], inputs=[
                service_pb2.ModelInferRequest.InferInputTensor(name="image", datatype="FP32",
                                                               shape=[1, 28, 28])])
        with pytest.raises(grpc.RpcError) as expired:
            stub.ModelInfer(late, timeout=0.5)  # queued behind the held model past it
        with pytest.raises(grpc.RpcError) as refused:
            raw_infer(channel, [1, 28, 28], raw=digit)  # two wait: the queue is full
        gate.set()
        assert first.result(60).outputs and second.result(60).outputs
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "QUEUE_MAX_REQUESTS" in refused.value.details()
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    handled = app.extensions["metrics"].grpc_handled
    assert handled.labels("inference.GRPCInferenceService", "ModelInfer",
                          "DEADLINE_EXCEEDED")._value.get() == 1  # the server's own answer
    wait_until(lambda: len(calls) == 2, "the second call")
    assert calls == [1, 1]  # the expired call never reached the model


def test_a_stop_finishes_the_call_in_flight_and_refuses_new_ones(serve_app, mnist):
    """What worker_exit does on SIGTERM (app/gunicorn.conf.py): stop(grace)."""
    app, running = serve_app(batch_timeout_ms=0)
    gate, calls = hold_model(app)
    digit = (mnist.x_test[:1] / 255.0).astype("<f4").tobytes()
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, \
            ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(raw_infer, channel, [1, 28, 28], raw=digit)
        wait_until(lambda: calls, "the call in flight")
        stopping = pool.submit(running.stop, 30)

        live = service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive

        def refused() -> bool:  # ServerLive never waits for the model
            try:
                live(service_pb2.ServerLiveRequest(), timeout=10)
            except grpc.RpcError as err:
                return err.code() == grpc.StatusCode.UNAVAILABLE
            return False

        wait_until(refused, "a new call refused while the one in flight is held")
        with pytest.raises(grpc.RpcError) as inference:
            raw_infer(channel, [1, 28, 28], raw=digit)
        assert not in_flight.done()
        gate.set()
        assert in_flight.result(60).outputs  # answered, not cut
        stopping.result(60)
    assert inference.value.code() == grpc.StatusCode.UNAVAILABLE
    assert calls == [1]  # the refused call never reached the model
