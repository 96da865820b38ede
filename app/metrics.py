"""Prometheus metrics: requests by endpoint and status, latency, images, requests per
model version, model load and warm-up time, rejected version folders, requests waiting
for a micro-batch, the shadow comparisons of app/shadow.py, the input drift index of
app/drift.py; gRPC calls by method and status code, under the names py-grpc-prometheus
and go-grpc-prometheus use; and where an inference spends its time (preprocessing,
queue, model, end to end), batch sizes, failures by reason, requests in flight and
readiness per model (``VersionMetrics``). The statistics endpoint (app/statistics.py)
is computed from these same samples.

Each app gets its own registry (so tests can build many apps). Under gunicorn the
workers are separate processes: ``app/gunicorn.conf.py`` sets PROMETHEUS_MULTIPROC_DIR
before forking, prometheus-client then writes every worker's values there, and /metrics
aggregates them, so a scrape sees the whole server and not one worker at random.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
    multiprocess,
)

from app.errors import error_code

# Label values come from a fixed set: a label fed from the request (3,000 invented methods)
# would grow every scrape and every worker's files without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Stages of one inference: a queue wait or a small model call is often under a millisecond.
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MODEL_LABELS = ["model", "version"]


class Metrics:
    """The service's metrics, registered in one registry."""

    def __init__(self, multiprocess_dir: str = ""):
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("http_request_duration_seconds", "Request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.images = Counter("images_predicted_total", "Images classified",
                              ["model", "version"], registry=self.registry)
        self.version_requests = Counter(
            "model_version_requests_total", "Prediction requests answered, by the version "
            "that answered (canary splits show here)", ["model", "version"],
            registry=self.registry)
        pair = ["model", "serving", "shadow"]
        self.shadow_images = Counter(
            "shadow_images_total", "Images run on a shadow version as well as the serving "
            "one, after the answer was sent", pair, registry=self.registry)
        self.shadow_agreed = Counter(
            "shadow_agreed_images_total", "Of those, images both versions gave the same "
            "digit (agreement rate: this over shadow_images_total)", pair,
            registry=self.registry)
        self.shadow_difference = Counter(
            "shadow_abs_difference_total", "Sum over those images of the mean absolute "
            "difference of the ten probabilities (over shadow_images_total: the mean)",
            pair, registry=self.registry)
        self.shadow_dropped = Counter(
            "shadow_dropped_requests_total", "Requests not copied to a shadow version "
            "because its queue was full", ["model"], registry=self.registry)
        self.payload_records = Counter(
            "payload_log_records_total", "Payload log records (app/payload_log.py) by "
            "outcome: sent, dropped (the queue was full) or failed (the sink did not "
            "take it)", ["outcome"], registry=self.registry)
        self.load_seconds = Gauge("model_load_seconds", "Seconds to load and warm a model",
                                  ["model", "version"], registry=self.registry,
                                  multiprocess_mode="max")
        self.rejected = Gauge("model_versions_rejected",
                              "Version folders of a model that failed a check (or are no "
                              "version), by the last scan", ["model"], registry=self.registry,
                              multiprocess_mode="livemax")
        self.drift_psi = Gauge(
            "input_drift_psi", "Population-stability index of the last DRIFT_WINDOW inputs "
            "against the version's validation set, by statistic (app/drift.py): below 0.1 "
            "stable, 0.25 and above a significant shift", ["model", "statistic"],
            registry=self.registry, multiprocess_mode="livemax")
        self.queued = Gauge("model_queue_requests", "Requests waiting for a micro-batch "
                            "(QUEUE_MAX_REQUESTS bounds it per worker)", ["model"],
                            registry=self.registry, multiprocess_mode="livesum")

        self._add_inference_metrics()
        self._versions: dict[tuple[str, int], VersionMetrics] = {}

        self.grpc_handled = Counter("grpc_server_handled_total", "gRPC calls by service, "
                                    "method and status code",
                                    ["grpc_service", "grpc_method", "grpc_code"],
                                    registry=self.registry)
        self.grpc_latency = Histogram("grpc_server_handling_seconds", "gRPC call latency",
                                      ["grpc_service", "grpc_method"],
                                      buckets=LATENCY_BUCKETS, registry=self.registry)

    def _add_inference_metrics(self) -> None:
        """The stages of an inference (issue 28's names), and three series only the
        statistics endpoint needs: Triton's fail, per-batch-size and last-inference
        fields, which no histogram above can give."""
        def stage(name: str, what: str, buckets: tuple = STAGE_BUCKETS) -> Histogram:
            return Histogram(name, what, MODEL_LABELS, buckets=buckets, registry=self.registry)

        self.request_seconds = stage("inference_request_duration_seconds", "One inference "
                                     "request end to end in the app, answered", LATENCY_BUCKETS)
        self.preprocess_seconds = stage("inference_preprocess_duration_seconds", "Reading "
                                        "and decoding a request's body into model input")
        self.queue_seconds = stage("inference_queue_duration_seconds", "Waiting for a "
                                   "micro-batch (0 for a request run at once)")
        self.model_seconds = stage("inference_model_duration_seconds", "One model call")
        self.batch_size = stage("inference_batch_size", "Images per model call",
                                BATCH_BUCKETS)
        self.failures = Counter("inference_failures_total", "Failed inference requests by "
                                "error code", ["model", "reason"], registry=self.registry)
        self.in_flight = Gauge("inference_requests_in_flight", "Inference requests being "
                               "answered", ["model"], registry=self.registry,
                               multiprocess_mode="livesum")
        self.ready = Gauge("model_ready", "1 when every worker serves a version of the "
                           "model", ["model"], registry=self.registry,
                           multiprocess_mode="livemin")
        self.warmup_seconds = Gauge("model_warmup_seconds", "Seconds of a version's load "
                                    "spent warming it up", MODEL_LABELS,
                                    registry=self.registry, multiprocess_mode="max")
        self.failed_seconds = Summary("inference_failed_request_duration_seconds",
                                      "Failed inference requests end to end", MODEL_LABELS,
                                      registry=self.registry)
        self.batch_seconds = Summary("inference_batch_compute_seconds", "Model calls by "
                                     "batch size (padded to a power of two)",
                                     [*MODEL_LABELS, "batch_size"], registry=self.registry)
        self.last_inference = Gauge("inference_last_timestamp_seconds", "When a version "
                                    "last answered an inference request (Unix time)",
                                    MODEL_LABELS, registry=self.registry,
                                    multiprocess_mode="max")

    def version(self, name: str, version: int) -> VersionMetrics:
        """``name`` version ``version``'s metrics, bound once and kept: the request path
        then observes without a label lookup."""
        key = (name, version)
        if key not in self._versions:  # a race builds it twice: labels() is idempotent
            self._versions[key] = VersionMetrics(self, name, str(version))
        return self._versions[key]

    def observe_grpc(self, service: str, method: str, code: str, seconds: float) -> None:
        """Count one gRPC call; the names come from the servicers, never the client."""
        self.grpc_handled.labels(service, method, code).inc()
        self.grpc_latency.labels(service, method).observe(seconds)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one request; an unknown method is counted as ``other``."""
        method = method if method in METHODS else "other"
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def samples(self) -> Iterator[Any]:
        """Every sample, aggregated over all workers under gunicorn."""
        for metric in self._whole().collect():
            yield from metric.samples

    def _whole(self) -> CollectorRegistry:
        """This worker's registry, or one aggregating every worker's under gunicorn."""
        if not self.multiprocess_dir:
            return self.registry
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return registry

    def exposition(self) -> tuple[bytes, str]:
        """The text format, aggregated over all workers when running under gunicorn."""
        return generate_latest(self._whole()), CONTENT_TYPE_LATEST

    def shadow_totals(self, model: str) -> dict[tuple[str, str], dict[str, float]]:
        """(serving, shadow) version → images, agreed and difference sums for
        ``model``, over every worker: what the model page shows."""
        wanted = {"shadow_images_total": "images", "shadow_agreed_images_total": "agreed",
                  "shadow_abs_difference_total": "difference"}
        totals: dict[tuple[str, str], dict[str, float]] = {}
        for metric in self._whole().collect():
            for sample in metric.samples:
                key = wanted.get(sample.name)
                if key is None or sample.labels.get("model") != model:
                    continue
                pair = (sample.labels["serving"], sample.labels["shadow"])
                row = totals.setdefault(pair, {"images": 0.0, "agreed": 0.0,
                                               "difference": 0.0})
                row[key] += sample.value
        return totals


class VersionMetrics:
    """One version's metric children, and the points of an inference that feed them."""

    def __init__(self, metrics: Metrics, name: str, version: str):
        labels = (name, version)
        self.name = name
        self._failures, self._batch_seconds = metrics.failures, metrics.batch_seconds
        self._labels = labels
        self.request = metrics.request_seconds.labels(*labels)
        self.preprocess = metrics.preprocess_seconds.labels(*labels)
        self.queue = metrics.queue_seconds.labels(*labels)
        self.model = metrics.model_seconds.labels(*labels)
        self.batch_size = metrics.batch_size.labels(*labels)
        self.failed = metrics.failed_seconds.labels(*labels)
        self.last_inference = metrics.last_inference.labels(*labels)
        self.in_flight = metrics.in_flight.labels(name)
        self._batches: dict[int, Any] = {}

    @contextmanager
    def counting(self, started: float) -> Iterator[None]:
        """Count the request in flight; a failure is counted by its error code
        (app/errors.py) and its duration kept, then re-raised."""
        self.in_flight.inc()
        try:
            yield
        except Exception as err:
            self._failures.labels(self.name, error_code(err)).inc()
            self.failed.observe(time.perf_counter() - started)
            raise
        finally:
            self.in_flight.dec()

    def answered(self, started: float) -> None:
        """One request answered: its duration from ``started`` (perf_counter)."""
        self.request.observe(time.perf_counter() - started)
        self.last_inference.set(time.time())

    def model_call(self, images: int, seconds: float) -> None:
        """One model call of ``images`` images; its batch size as the power of two the
        SavedModel runtime pads it to (app/saved_model.py), a label from a small set."""
        self.model.observe(seconds)
        self.batch_size.observe(images)
        size = 1 << max(0, images - 1).bit_length()
        if size not in self._batches:
            self._batches[size] = self._batch_seconds.labels(*self._labels, str(size))
        self._batches[size].observe(seconds)
