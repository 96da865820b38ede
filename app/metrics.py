"""Prometheus metrics: requests by endpoint and status, latency, images, requests per
model version, model load time, rejected version folders, requests waiting for a
micro-batch, the shadow comparisons of app/shadow.py, the input drift index of
app/drift.py; gRPC calls by method and status
code, under the names py-grpc-prometheus and go-grpc-prometheus use.

Each app gets its own registry (so tests can build many apps). Under gunicorn the
workers are separate processes: ``app/gunicorn.conf.py`` sets PROMETHEUS_MULTIPROC_DIR
before forking, prometheus-client then writes every worker's values there, and /metrics
aggregates them, so a scrape sees the whole server and not one worker at random.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Label values come from a fixed set: a label fed from the request (3,000 invented methods)
# would grow every scrape and every worker's files without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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

        self.grpc_handled = Counter("grpc_server_handled_total", "gRPC calls by service, "
                                    "method and status code",
                                    ["grpc_service", "grpc_method", "grpc_code"],
                                    registry=self.registry)
        self.grpc_latency = Histogram("grpc_server_handling_seconds", "gRPC call latency",
                                      ["grpc_service", "grpc_method"],
                                      buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_grpc(self, service: str, method: str, code: str, seconds: float) -> None:
        """Count one gRPC call; the names come from the servicers, never the client."""
        self.grpc_handled.labels(service, method, code).inc()
        self.grpc_latency.labels(service, method).observe(seconds)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one request; an unknown method is counted as ``other``."""
        method = method if method in METHODS else "other"
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

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
