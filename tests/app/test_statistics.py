"""The statistics extension (app/statistics.py) and the inference metrics behind it
(app/metrics.py), read by NVIDIA's own clients from the session's real gunicorn (two
workers). Other tests share that server, so every check is on a difference: what this
module sent, between two readings taken while nothing else was sending."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

MODEL = "mnist_tiny"
SIZES = (1, 4, 8)  # one request each, sent one at a time: each is its own model call
BAD = 2  # bodies that are no request: invalid_input
BURST = 24  # single images at once, so that some wait for a micro-batch


def stats(client: triton.InferenceServerClient, version: str) -> dict:
    (stat,) = client.get_inference_statistics(MODEL, version)["model_stats"]
    return stat


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """/metrics as (sample name, labels) → value."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def one_image(url: str) -> None:
    """One blank digit on a connection of its own: both workers take some."""
    body = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32",
                        "data": [0.0] * 784}]}
    response = requests.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text


def infer(client: triton.InferenceServerClient, images: int) -> None:
    tensor = triton.InferInput("image", [images, 28, 28, 1], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(images).random(
        (images, 28, 28, 1), dtype=np.float32))
    client.infer(MODEL, [tensor])


class Reading(NamedTuple):
    stats: dict
    metrics: dict


class Exchange(NamedTuple):
    version: str
    before: Reading
    sent: Reading  # after SIZES and BAD, one request at a time
    burst: Reading  # after BURST more, at once
    started_ms: float
    finished_ms: float


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.url.removeprefix("http://")) as connection:
        yield connection


@pytest.fixture(scope="module")
def exchange(client, url) -> Exchange:
    """Send known requests, reading the statistics and /metrics around them."""
    version = client.get_model_metadata(MODEL)["versions"][-1]

    def read() -> Reading:
        return Reading(stats(client, version), scrape(url))

    before, started = read(), time.time() * 1000
    for size in SIZES:
        infer(client, size)
    for _ in range(BAD):
        response = requests.post(f"{url}/v2/models/{MODEL}/infer", data=b"{not json",
                                 timeout=10)
        assert response.status_code == 400, response.text
    sent = read()
    with ThreadPoolExecutor(BURST) as pool:
        list(pool.map(lambda _: one_image(url), range(BURST)))
    return Exchange(version, before, sent, read(), started, time.time() * 1000)


def grew(after: dict, before: dict, *path: str) -> float:
    for key in path:
        after, before = after[key], before[key]
    return after - before


def batch_counts(stat: dict) -> dict[int, int]:
    return {row["batch_size"]: row["compute_infer"]["count"] for row in stat["batch_stats"]}


def test_stats_count_exactly_the_requests_sent(exchange):
    before, after = exchange.before.stats, exchange.sent.stats
    assert (after["name"], after["version"]) == (MODEL, exchange.version)
    assert grew(after, before, "inference_stats", "success", "count") == len(SIZES)
    assert grew(after, before, "inference_stats", "fail", "count") == BAD
    assert grew(after, before, "inference_count") == sum(SIZES)
    assert grew(after, before, "execution_count") == len(SIZES)
    for stage in ("queue", "compute_input", "compute_infer"):
        assert grew(after, before, "inference_stats", stage, "count") == len(SIZES), stage
    old, new = batch_counts(before), batch_counts(after)
    assert {size: new.get(size, 0) - old.get(size, 0) for size in {*new, *SIZES}} == \
        {size: 1 if size in SIZES else 0 for size in {*new, *SIZES}}, (old, new)
    assert exchange.started_ms <= after["last_inference"] <= exchange.finished_ms


def test_requests_run_alone_wait_nothing_and_batched_ones_wait(exchange):
    before, alone, burst = exchange.before.stats, exchange.sent.stats, exchange.burst.stats
    assert grew(alone, before, "inference_stats", "queue", "ns") == 0
    assert grew(burst, alone, "inference_stats", "queue", "count") == BURST
    assert grew(burst, alone, "inference_stats", "queue", "ns") > 0
    executions = grew(burst, alone, "execution_count")
    assert executions < BURST, "no two requests shared a model call"
    old, new = batch_counts(alone), batch_counts(burst)
    assert sum(new.values()) - sum(old.values()) == executions


def test_stage_durations_add_up(exchange):
    """Each duration is positive and fits inside the requests' own time."""
    before, after = exchange.before.stats, exchange.burst.stats
    ns = {stage: grew(after, before, "inference_stats", stage, "ns")
          for stage in ("success", "fail", "queue", "compute_input", "compute_infer")}
    assert all(value > 0 for value in ns.values()), ns
    assert ns["queue"] + ns["compute_input"] + ns["compute_infer"] <= ns["success"], ns
    batch_ns = sum(row["compute_infer"]["ns"] for row in after["batch_stats"]) - \
        sum(row["compute_infer"]["ns"] for row in before["batch_stats"])
    assert batch_ns == pytest.approx(ns["compute_infer"], abs=10)


def test_metrics_count_the_same_requests(exchange):
    before, after = exchange.before.metrics, exchange.burst.metrics
    version = {"model": MODEL, "version": exchange.version}
    requests_sent = len(SIZES) + BURST

    def rose(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after[key] - before.get(key, 0.0)

    for stage in ("request", "preprocess", "queue"):
        assert rose(f"inference_{stage}_duration_seconds_count", **version) == requests_sent
    executions = grew(exchange.burst.stats, exchange.before.stats, "execution_count")
    assert rose("inference_model_duration_seconds_count", **version) == executions
    assert rose("inference_batch_size_count", **version) == executions
    assert rose("inference_batch_size_sum", **version) == sum(SIZES) + BURST
    singles = batch_counts(exchange.burst.stats).get(1, 0) - \
        batch_counts(exchange.before.stats).get(1, 0)
    assert rose("inference_batch_size_bucket", **version, le="1.0") == singles
    assert rose("inference_failures_total", model=MODEL, reason="invalid_input") == BAD
    assert after[("inference_requests_in_flight", frozenset({("model", MODEL)}))] == 0
    assert after[("model_ready", frozenset({("model", MODEL)}))] == 1
    assert after[("model_warmup_seconds", frozenset(version.items()))] > 0


def test_grpc_answers_what_rest_does(server, client, exchange):
    with triton_grpc.InferenceServerClient(server.grpc) as connection:
        over_grpc = connection.get_inference_statistics(MODEL, exchange.version,
                                                        as_json=True)["model_stats"][0]
    over_rest = stats(client, exchange.version)
    assert int(over_grpc["inference_count"]) == over_rest["inference_count"]
    assert int(over_grpc["inference_stats"]["success"]["ns"]) == \
        over_rest["inference_stats"]["success"]["ns"]


def test_stats_of_every_model_and_of_none(url, client, served_models):
    every = requests.get(url + "/v2/models/stats", timeout=10).json()["model_stats"]
    assert {row["name"] for row in every} == {path.name for path in served_models.iterdir()}
    for path in ("/v2/models/nothing/stats", f"/v2/models/{MODEL}/versions/999/stats"):
        response = requests.get(url + path, timeout=10)
        assert response.status_code == 404 and list(response.json()) == ["error"], path
    with pytest.raises(InferenceServerException, match="nothing"):
        client.get_inference_statistics("nothing")
