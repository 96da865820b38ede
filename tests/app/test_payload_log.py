"""Sampled payload logging (app/payload_log.py): CloudEvents to a real HTTP sink on
loopback from a real gunicorn, JSON lines to a file, sampling, and a sink that hangs."""

from __future__ import annotations

import base64
import http.server
import json
import math
import shutil
import threading
import time
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from tritonclient.grpc import service_pb2, service_pb2_grpc

from app import create_app
from app.config import Config, ConfigError
from app.payload_sinks import EVENT_TYPE, FileSink
from tests.app.test_api import metric
from tests.conftest import serving, start_server, stop_server, wait_until

QUEUE_IMAGES = 16  # each worker's backlog in the logged server: a hung sink fills it fast
TIMEOUT = 0.5  # its PAYLOAD_LOG_TIMEOUT_SECONDS
REQUESTS = 100  # to each server while the sink hangs
RECORDS = "payload_log_records_total{{outcome=\"{}\"}}"


class Sink(http.server.ThreadingHTTPServer):
    """A CloudEvents receiver: keeps each event's headers and body; while ``hang`` is
    set, it accepts a request and never answers (until ``release``)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Receiver)
        self.events: list[tuple[dict, dict]] = []
        self.hang, self.release = threading.Event(), threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/events"


class Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the logger's client expects

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.hang.is_set():
            self.server.release.wait(60)
            return
        self.server.events.append(({k.lower(): v for k, v in self.headers.items()},
                                   json.loads(body)))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def sink():
    with serving(Sink()) as receiver:
        yield receiver
        receiver.release.set()  # a hung request lets go, so shutdown does not wait on it


@pytest.fixture(scope="module")
def cnn_only(served_models, tmp_path_factory):
    """The trained CNN alone: one model to load."""
    folder = tmp_path_factory.mktemp("cnn")
    shutil.copytree(served_models / "mnist_cnn", folder / "mnist_cnn")
    return folder


@pytest.fixture(scope="module")
def logged(cnn_only, sink, tmp_path_factory):
    """gunicorn logging every request to ``sink``; two workers, as the session's
    server it is compared with."""
    running = start_server(cnn_only, tmp_path_factory.mktemp("payload") / "g.log",
                           PAYLOAD_LOG_URL=sink.url,
                           PAYLOAD_LOG_QUEUE_IMAGES=str(QUEUE_IMAGES),
                           PAYLOAD_LOG_TIMEOUT_SECONDS=str(TIMEOUT))
    yield running
    stop_server(running)
    assert "Traceback" not in running.log(), running.log()[-3000:]


def digits_of(mnist, count: int, start: int = 0) -> np.ndarray:
    return (mnist.x_test[start:start + count] / 255.0).astype(np.float32)


def grpc_infer(target: str, images: np.ndarray, request_id: str) -> list[int]:
    """The digits of one Open Inference Protocol ModelInfer call over gRPC."""
    request = service_pb2.ModelInferRequest(model_name="mnist_cnn", inputs=[
        service_pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype="FP32", shape=list(images.shape),
            contents=service_pb2.InferTensorContents(fp32_contents=images.ravel()))])
    with grpc.insecure_channel(target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=30, metadata=(("x-request-id", request_id),))
    (output,) = response.outputs
    answer = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(output.shape)
    return answer.argmax(axis=1).tolist()


def test_each_request_is_one_cloudevent_naming_its_request_and_answer(logged, sink, mnist):
    """REST (two protocols) and gRPC: one event a request, its ce-id the request id,
    its digits the answer's, no image (PAYLOAD_LOG_IMAGES is off)."""
    sent: dict[str, tuple[str, list[int]]] = {}
    for i in range(8):
        images = digits_of(mnist, 1 + i % 2, start=i)
        headers = {"X-Request-ID": f"client-{i}"} if i % 2 else {}
        if i % 4 == 3:
            response = requests.post(f"{logged.url}/v1/models/mnist_cnn:predict", timeout=30,
                                     json={"instances": images.tolist()}, headers=headers)
            digits = np.argmax(response.json()["predictions"], axis=1).tolist()
        else:
            response = requests.post(f"{logged.url}/predict", timeout=30, headers=headers,
                                     json={"instances": images.tolist()})
            digits = [p["digit"] for p in response.json()["predictions"]]
        assert response.status_code == 200
        sent[response.headers["X-Request-ID"]] = (response.request.path_url, digits)
    sent["grpc-call"] = ("grpc", grpc_infer(logged.grpc, digits_of(mnist, 2, 20), "grpc-call"))
    wait_until(lambda: len(sink.events) >= len(sent), "an event for every request", 30)
    assert len(sink.events) == len(sent)
    for headers, body in sink.events:
        assert headers["ce-specversion"] == "1.0"
        assert headers["ce-type"] == EVENT_TYPE
        assert headers["ce-source"].startswith("http://")
        assert headers["ce-inferenceservicename"] == body["model"] == "mnist_cnn"
        assert headers["ce-modelversion"] == str(body["version"]) == "1"
        assert headers["content-type"] == "application/json"
        path, digits = sent[headers["ce-id"]]
        assert body["request_id"] == headers["ce-id"]
        assert [one["digit"] for one in body["instances"]] == digits
        assert body["endpoint"] == {"/predict": "/predict", "grpc": "grpc",
                                    "/v1/models/mnist_cnn:predict":
                                    "/v1/models/<name>:predict"}[path]
        for one in body["instances"]:
            assert "image" not in one
            assert 0 < one["confidence"] <= 1 and 0 < one["ink_fraction"] < 0.5
            assert 0 < one["mean_intensity"] < 0.5 and 0.05 < one["bbox_size"] <= 1
    assert {h["ce-id"] for h, _ in sink.events} == set(sent)
    wait_until(lambda: metric(logged.url, RECORDS.format("sent")) == len(sent),
               "every event counted as sent", 10)  # counted once the sink has answered


def p99s(session: requests.Session, urls: list[str], body: dict) -> list[float]:
    """Each server's p99 over REQUESTS requests, sent in turn (the same load on both)."""
    latencies: dict[str, list[float]] = {url: [] for url in urls}
    for _ in range(REQUESTS):
        for url in urls:
            started = time.perf_counter()
            response = session.post(f"{url}/predict", json=body, timeout=30)
            latencies[url].append(time.perf_counter() - started)
            assert response.status_code == 200
    return [float(np.percentile(latencies[url], 99)) for url in urls]


def test_a_sink_that_hangs_costs_requests_nothing_and_drops_are_counted(
        logged, server, sink, mnist):
    """With the sink accepting and never answering, requests keep the latency of a
    server logging nothing (same run, interleaved); the backlog fills and the rest is
    dropped, counted. A send on the request's path would cost each request 0.5 s: a
    round over the margin is noise on a shared machine, and gets two more tries."""
    body = {"instances": digits_of(mnist, 1).tolist()}
    sent = metric(logged.url, RECORDS.format("sent"))
    with requests.Session() as session:
        for _ in range(10):  # warm both up alike (connections, first calls after idling)
            for url in (logged.url, server.url):
                session.post(f"{url}/predict", json=body, timeout=30)
        wait_until(lambda: metric(logged.url, RECORDS.format("sent")) >= sent + 10,
                   "the warm-up's records sent", 10)
        dropped = metric(logged.url, RECORDS.format("dropped"))
        sink.hang.set()
        started = time.perf_counter()
        rounds = []
        for _ in range(3):
            hung, off = p99s(session, [logged.url, server.url], body)
            rounds.append(f"{hung * 1000:.1f} vs {off * 1000:.1f} ms")
            if hung <= 1.5 * off + 0.020:
                break
    print(f"p99 with a hung sink vs without a payload log: {rounds}")
    assert hung <= 1.5 * off + 0.020, rounds
    # each worker's backlog holds 16, and its thread takes one more at each timeout
    taken = 1 + int((time.perf_counter() - started) / TIMEOUT)
    assert (metric(logged.url, RECORDS.format("dropped")) - dropped
            >= REQUESTS * len(rounds) - 2 * (QUEUE_IMAGES + taken))
    wait_until(lambda: metric(logged.url, RECORDS.format("failed")) >= 1,
               "a timed-out send counted as failed", 10)


def test_a_hung_sink_holds_the_worker_exit_one_timeout_at_most(logged, sink):
    """A backlog is full and the sink still hangs: sending it would take 16 × 0.5 s;
    the worker gives it one PAYLOAD_LOG_TIMEOUT_SECONDS after its models are released
    (app/gunicorn.conf.py's worker_exit), says what it lost, and goes."""
    assert sink.hang.is_set()
    stop_server(logged)
    assert logged.process.returncode == 0
    lines = [json.loads(line) for line in logged.log().splitlines() if line.startswith("{")]
    stamps = {"released": [], "lost": []}
    for line in lines:
        if line["message"].startswith("released mnist_cnn"):
            stamps["released"].append(datetime.fromisoformat(line["time"]))
        elif "still queued after 0.5 s at exit are lost" in line["message"]:
            stamps["lost"].append(datetime.fromisoformat(line["time"]))
    assert stamps["lost"], "no worker gave up on its queue"  # those the requests reached
    for lost in stamps["lost"]:
        released = max(t for t in stamps["released"] if t <= lost)
        print(f"flush gave up {(lost - released).total_seconds():.2f} s after release")
        assert (lost - released).total_seconds() <= TIMEOUT + 1.5


@pytest.fixture(scope="module")
def tiny_models(served_models, tmp_path_factory):
    """The trained tiny net alone, served with LiteRT: quick to load in this process."""
    folder = tmp_path_factory.mktemp("tiny")
    shutil.copytree(served_models / "mnist_tiny", folder / "mnist_tiny")
    return folder


def test_half_the_requests_go_to_a_json_lines_file_with_their_images(
        tiny_models, tmp_path, mnist):
    path = tmp_path / "payloads.jsonl"
    app = create_app(Config(models_dir=tiny_models, model_name="mnist_tiny",
                            prefer_tflite_model=True, payload_log_file=str(path),
                            payload_log_sample_rate=0.5, payload_log_images=True))
    client, images = app.test_client(), digits_of(mnist, 200)
    answers = {}
    for i, image in enumerate(images):
        response = client.post("/predict", json={"instances": [image.tolist()]},
                               headers={"X-Request-ID": f"r{i}"})
        answers[f"r{i}"] = (i, response.json["predictions"][0]["digit"])
    app.extensions["payload_log"].close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # binomial(200, 0.5): 100 ± 7.1; five standard deviations either side
    assert abs(len(lines) - 100) <= 5 * math.sqrt(200 * 0.25), len(lines)
    assert len({line["request_id"] for line in lines}) == len(lines)
    for line in lines:
        i, digit = answers[line["request_id"]]
        (instance,) = line["instances"]
        assert (line["model"], line["version"], line["endpoint"]) == ("mnist_tiny", 1,
                                                                      "/predict")
        assert instance["digit"] == digit
        pixels = np.frombuffer(base64.b64decode(instance["image"]), np.uint8)
        np.testing.assert_array_equal(pixels.reshape(28, 28), mnist.x_test[i])


def test_lines_of_several_writers_never_interleave(tmp_path):
    """Two descriptors on one file, as two gunicorn workers hold, writing records of
    200 KB (a batch with its images) at once: every line comes back whole."""
    path = str(tmp_path / "shared.jsonl")
    sinks = [FileSink(path), FileSink(path)]

    def write(sink: FileSink, writer: int) -> None:
        for n in range(40):
            record = {"writer": writer, "n": n, "padding": "x" * 200_000}
            sink.send(record, json.dumps(record).encode())

    threads = [threading.Thread(target=write, args=(sink, i)) for i, sink in enumerate(sinks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sink in sinks:
        sink.close()
    lines = [json.loads(line) for line in Path(path).read_bytes().splitlines()]
    assert sorted((line["writer"], line["n"]) for line in lines) == [
        (w, n) for w in range(2) for n in range(40)]


@pytest.mark.parametrize(("environ", "message"), [
    ({"PAYLOAD_LOG_URL": "http://sink/", "PAYLOAD_LOG_SAMPLE_RATE": "1.5"},
     "PAYLOAD_LOG_SAMPLE_RATE must be between 0 and 1"),
    ({"PAYLOAD_LOG_SAMPLE_RATE": "nan"}, "PAYLOAD_LOG_SAMPLE_RATE must be between 0 and 1"),
    ({"PAYLOAD_LOG_URL": "http://sink/", "PAYLOAD_LOG_FILE": "/tmp/p.jsonl"}, "not both"),
    ({"PAYLOAD_LOG_URL": "sink:8080"}, "PAYLOAD_LOG_URL must be http(s)://"),
    ({"PAYLOAD_LOG_QUEUE_IMAGES": "0"}, "PAYLOAD_LOG_QUEUE_IMAGES must be a positive"),
    ({"PAYLOAD_LOG_TIMEOUT_SECONDS": "0"}, "PAYLOAD_LOG_TIMEOUT_SECONDS must be above 0"),
])
def test_bad_payload_log_settings_refuse_to_start(environ, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.from_env(environ)


def test_no_sink_means_no_logger(url):
    """The session's server sets no sink: no logger, so no record counts either."""
    assert not Config.from_env({"PAYLOAD_LOG_SAMPLE_RATE": "0.5"}).payload_log_on
    assert "payload_log_records_total{" not in requests.get(f"{url}/metrics", timeout=5).text
