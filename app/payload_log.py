"""Sampled payload logging, KServe's inference logger idea: for a share of requests
(PAYLOAD_LOG_SAMPLE_RATE), one record goes to PAYLOAD_LOG_URL (a CloudEvent) or
PAYLOAD_LOG_FILE (a JSON line): request id, time, model, version, endpoint, and per
image the digit, its probability and the input's statistics (app/input_stats.py); the
28×28 input itself only with PAYLOAD_LOG_IMAGES.

Never on the request's path: the request thread draws the sample and hands references
to arrays it already holds to a queue bounded in images (PAYLOAD_LOG_QUEUE_IMAGES), and
returns. One thread per worker, started on first use (after gunicorn's fork), builds and
sends the records. A full queue drops the record, a failed send loses it, and both are
counted (``payload_log_records_total{outcome}``: sent, dropped, failed). At worker exit
what is queued gets PAYLOAD_LOG_TIMEOUT_SECONDS to go out, no more.
"""

from __future__ import annotations

import base64
import collections
import logging
import random
import threading
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import orjson
from flask import Flask, current_app, g, has_request_context, request

from app.config import Config
from app.input_stats import bbox_size, ink_fraction, mean_intensity
from app.payload_sinks import FileSink, HttpSink, event_source
from app.servable import LoadedModel

log = logging.getLogger(__name__)
OUTCOMES = ("sent", "dropped", "failed")


class Entry(NamedTuple):
    """What the request thread hands over: references, nothing computed."""

    request_id: str
    time: float
    model: str
    version: int
    endpoint: str
    images: np.ndarray
    probabilities: np.ndarray


class Backlog:
    """A FIFO of entries holding at most ``max_images`` images, so its memory is bounded
    (1,000 model inputs are 3 MB) whatever the requests' batch sizes."""

    def __init__(self, max_images: int):
        self.max_images = max_images
        self._entries: collections.deque[Entry] = collections.deque()
        self._images = 0
        self._busy = False
        self._changed = threading.Condition()

    def offer(self, entry: Entry) -> bool:
        """Queue ``entry`` if its images fit; never blocks."""
        with self._changed:
            if self._images + len(entry.images) > self.max_images:
                return False
            self._entries.append(entry)
            self._images += len(entry.images)
            self._changed.notify_all()
        return True

    def take(self) -> Entry:
        """The oldest entry, once there is one; ``done`` must follow."""
        with self._changed:
            self._changed.wait_for(lambda: self._entries)
            entry = self._entries.popleft()
            self._images -= len(entry.images)
            self._busy = True
            return entry

    def done(self) -> None:
        with self._changed:
            self._busy = False
            self._changed.notify_all()

    def drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every entry to be taken and done."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._entries and not self._busy,
                                          timeout)


def record(entry: Entry, with_images: bool) -> dict:
    """The record of one request: its identity, and per image the answer and the
    input's statistics (plus the input as base64 of 784 bytes with ``with_images``)."""
    probabilities = entry.probabilities
    columns = zip(probabilities.argmax(axis=1).tolist(),
                  probabilities.max(axis=1).round(6).tolist(),
                  ink_fraction(entry.images).round(4).tolist(),
                  mean_intensity(entry.images).round(4).tolist(),
                  bbox_size(entry.images).round(4).tolist(), strict=True)
    instances = [{"digit": digit, "confidence": confidence, "ink_fraction": ink,
                  "mean_intensity": mean, "bbox_size": box}
                 for digit, confidence, ink, mean, box in columns]
    if with_images:
        pixels = np.rint(np.clip(entry.images, 0, 1) * 255).astype(np.uint8)
        for instance, image in zip(instances, pixels, strict=True):
            instance["image"] = base64.b64encode(image.tobytes()).decode("ascii")
    stamp = datetime.fromtimestamp(entry.time, UTC).isoformat(timespec="milliseconds")
    return {"request_id": entry.request_id, "time": stamp, "model": entry.model,
            "version": entry.version, "endpoint": entry.endpoint, "instances": instances}


class PayloadLogger:
    """One worker's sampler, backlog and sending thread."""

    def __init__(self, sink: Any, metrics: Any, sample_rate: float, with_images: bool,
                 max_images: int, flush_seconds: float):
        self.sink, self.metrics = sink, metrics
        self.sample_rate, self.with_images = sample_rate, with_images
        self.flush_seconds = flush_seconds
        self.backlog = Backlog(max_images)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failing = False
        for outcome in OUTCOMES:  # each series exists, at 0, from the start
            metrics.payload_records.labels(outcome)

    def offer(self, model: LoadedModel, images: np.ndarray, probabilities: np.ndarray
              ) -> None:
        """Draw the sample and queue this request's references; never blocks."""
        if self.sample_rate < 1 and random.random() >= self.sample_rate:
            return
        endpoint = (request.url_rule.rule if has_request_context() and request.url_rule
                    else "grpc")
        entry = Entry(g.get("request_id") or "", time.time(), model.name, model.version,
                      endpoint, images, probabilities)
        if self._thread is None:
            self._start()
        if not self.backlog.offer(entry):
            self.metrics.payload_records.labels("dropped").inc()

    def _start(self) -> None:
        """The thread starts on first use: in the worker, after gunicorn's fork."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="payload-log",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            entry = self.backlog.take()
            try:
                self.send(entry)
            finally:
                self.backlog.done()

    def send(self, entry: Entry) -> None:
        """Build and deliver one record, and count how it went."""
        try:
            built = record(entry, self.with_images)
            self.sink.send(built, orjson.dumps(built))
        except Exception as err:  # noqa: BLE001 - a bad sink must not stop the thread
            self.metrics.payload_records.labels("failed").inc()
            if not self._failing:  # once a failing streak, not once a record
                log.warning("payload log: a record could not be sent (%s: %s); failures "
                            "are counted in payload_log_records_total",
                            type(err).__name__, err)
            self._failing = True
            return
        self.metrics.payload_records.labels("sent").inc()
        if self._failing:
            log.info("payload log: records are being sent again")
        self._failing = False

    def close(self) -> None:
        """At worker exit: give what is queued ``flush_seconds`` to go out."""
        if self._thread is not None and not self.backlog.drained(self.flush_seconds):
            log.warning("payload log: records still queued after %.1f s at exit are lost",
                        self.flush_seconds)


def init_app(app: Flask, config: Config, metrics: Any) -> None:
    """``app.extensions["payload_log"]``: a PayloadLogger when a sink is set, else None
    (the request path then costs one lookup). An unwritable PAYLOAD_LOG_FILE raises
    here, so the worker does not boot."""
    logger = None
    if config.payload_log_on:
        sink = (HttpSink(config.payload_log_url, config.payload_log_timeout_seconds,
                         event_source(config.port)) if config.payload_log_url
                else FileSink(config.payload_log_file))
        logger = PayloadLogger(sink, metrics, config.payload_log_sample_rate,
                               config.payload_log_images, config.payload_log_queue_images,
                               config.payload_log_timeout_seconds)
    app.extensions["payload_log"] = logger


def log_payload(model: LoadedModel, images: np.ndarray, probabilities: np.ndarray) -> None:
    """Offer this request to the payload log, if there is one (``run_model`` calls this
    once the probabilities are known; REST and gRPC alike)."""
    logger = current_app.extensions.get("payload_log")
    if logger is not None:
        logger.offer(model, images, probabilities)
