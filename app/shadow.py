"""Shadow comparison: a sampled share of requests also run on a *shadow* version, after
their answer has been sent, to tell how often a new version agrees with the one serving
before it takes any traffic (Seldon's shadow deployments, measured).

A ``# rollout: <model> <label> shadow <percent>`` line of MODEL_CONFIG_FILE marks the
label's version as a shadow. The view has answered from the serving version; once the
answer is written (``call_on_close``), the images and the serving probabilities go into
a bounded queue, and one thread per worker runs them on the shadow version and counts:
images compared, images with the same digit, and the summed mean absolute difference of
the ten probabilities (app/metrics.py), per (serving, shadow) version pair. A full queue
drops the copy and counts it: the shadow never slows or fails a request.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from typing import Any

import numpy as np

from app.rollout import Routes, pick_shadows
from app.servable import LoadedModel

log = logging.getLogger(__name__)
QUEUE_MAX_REQUESTS = 64  # copies waiting per worker; more are dropped, and counted


class ShadowRunner:
    """One worker's queue of shadow copies and the thread that runs them."""

    def __init__(self, metrics: Any, max_queue: int = QUEUE_MAX_REQUESTS):
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, routes: Routes, serving: LoadedModel, images: np.ndarray,
               probabilities: np.ndarray) -> None:
        """Queue a copy for each shadow this request is sampled for; never blocks."""
        shadows = pick_shadows(routes, serving, random.random() * 100)
        if not shadows:
            return
        self._start()
        try:
            self._queue.put_nowait((serving, shadows, images, probabilities))
        except queue.Full:
            self.metrics.shadow_dropped.labels(serving.name).inc()

    def _start(self) -> None:
        """The thread starts on first use: in the worker, after gunicorn's fork."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="shadow",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            serving, shadows, images, expected = self._queue.get()
            for shadow in shadows:
                try:
                    with shadow.slot() as slot:
                        answer = slot.run(images)
                except Exception as err:  # noqa: BLE001 - a shadow must not stop the thread
                    log.warning("shadow %s version %d failed: %s", shadow.name,
                                shadow.version, type(err).__name__)
                    continue
                self.record(serving, shadow, expected, answer)

    def record(self, serving: LoadedModel, shadow: LoadedModel, expected: np.ndarray,
               answer: np.ndarray) -> None:
        """Count one comparison of ``answer`` (shadow) with ``expected`` (serving)."""
        pair = (serving.name, str(serving.version), str(shadow.version))
        agreed = int(np.sum(answer.argmax(axis=1) == expected.argmax(axis=1)))
        difference = float(np.abs(answer - expected).mean(axis=1).sum())
        self.metrics.shadow_images.labels(*pair).inc(len(answer))
        self.metrics.shadow_agreed.labels(*pair).inc(agreed)
        self.metrics.shadow_difference.labels(*pair).inc(difference)


def comparisons(metrics: Any, routes: Routes | None, model: str) -> list[dict]:
    """Each (serving, shadow) version pair compared so far, with its agreement rate and
    mean absolute difference; ``label`` and ``percent`` when a shadow label points at
    the shadow version now."""
    labels = {} if routes is None else {
        routes.labels[label].version: (label, percent) for label, percent in routes.shadows}
    rows = []
    for (serving, shadow), totals in sorted(metrics.shadow_totals(model).items()):
        label, percent = labels.get(int(shadow), ("", 0.0))
        images = int(totals["images"])
        rows.append({"label": label, "percent": percent, "serving": int(serving),
                     "shadow": int(shadow), "compared": images,
                     "agreement": totals["agreed"] / images if images else None,
                     "mean_abs_difference": totals["difference"] / images if images
                     else None})
    return rows
