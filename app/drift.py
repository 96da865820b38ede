"""Input drift: how far each model version's live inputs have moved from the images it
was validated on, as a population-stability index (PSI) per statistic.

Training records in metadata.json's ``drift_reference`` (training/reference.py) how its
validation images fall into bins of four statistics: the predicted digit, and the ink
fraction, mean intensity and bounding-box size of app/input_stats.py, each with its bin
edges. Each worker keeps, per loaded version, the bins of the last DRIFT_WINDOW images
it answered: a ring of bin indices and the counts per bin, so memory is fixed (4 bytes
an image). A request only queues its images; a thread per worker bins whatever has
queued in one pass, so nothing is computed on a request's path and the cost per image
falls as traffic rises. Once the window holds DRIFT_MIN_SAMPLES images,
``input_drift_psi{model, statistic}`` is

    PSI = Σ over bins of (p_live − p_ref) · ln(p_live / p_ref)

with any share below EPSILON raised to it (an empty bin would make it infinite); it is
set again after each twentieth of a window. Below 0.1 the inputs are stable, 0.1–0.25 a
moderate shift, 0.25 and above a significant one (the alert's threshold). With several
versions of a model loaded the gauge shows the largest index among them; across
workers, the largest among the live ones. A version with no reference (an export older
than the reference) is not tracked and exports nothing. Once no version the model
serves holds enough images (the versions that had them retired; the new one still
filling its window, or without a reference, or no version at all), the worker sets its
gauge back to 0 when a version retires and on the model's next requests: an index, and
its alert, never outlive the versions it measured.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flask import current_app

from app.input_stats import bbox_size, ink_fraction, mean_intensity
from training.export_format import DRIFT_REFERENCE, reference_problem

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from app.servable import LoadedModel

log = logging.getLogger(__name__)
EPSILON = 1e-4  # the smallest share of a bin: an empty one adds ~p_ref · ln(p_ref / EPSILON)
DIGIT = "digit"
STATISTICS: Mapping[str, Callable[[np.ndarray], np.ndarray]] = {
    "ink_fraction": ink_fraction, "mean_intensity": mean_intensity, "bbox_size": bbox_size}
NAMES = (DIGIT, *STATISTICS)  # the gauge's statistic label: a fixed set
UPDATES_PER_WINDOW = 20
_EMPTY = 255  # a ring slot no image has filled yet (bins are fewer than 255)
# Images waiting for the drift thread, at most (float32: 3 KB each, so 12.5 MB): it
# keeps up with any traffic a worker serves, so the bound only matters when it stalls.
QUEUE_MAX_IMAGES = 4096


def bin_indices(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each value: bin i holds edges[i] <= value < edges[i + 1], and values
    beyond the outer edges fall into the outer bins."""
    return np.searchsorted(np.asarray(edges)[1:-1], values, side="right")


def psi(live: np.ndarray, reference: np.ndarray) -> float:
    """The population-stability index of ``live`` against ``reference``: counts (or
    shares) over the same bins, neither all zero. 0 when the shares are equal."""
    p = np.maximum(live / live.sum(), EPSILON)
    q = np.maximum(reference / reference.sum(), EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


@dataclass(frozen=True)
class Reference:
    """A version's recorded distributions: counts per bin of every statistic, and the
    bin edges of the three input statistics."""

    counts: dict[str, np.ndarray]
    edges: dict[str, np.ndarray]

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Reference | None:
        """The reference in metadata.json, or None. The schema has typed it when the
        version loaded; the counts and edges are checked again here (as servable does)
        in case the file changed between that check and the read that loaded it."""
        recorded = metadata.get(DRIFT_REFERENCE)
        if recorded is None or reference_problem(recorded):
            return None
        statistics = recorded["statistics"]
        return cls({name: np.asarray(statistics[name]["counts"], np.float64)
                    for name in NAMES},
                   {name: np.asarray(statistics[name]["edges"], np.float64)
                    for name in STATISTICS})

    def bins(self, images: np.ndarray, digits: np.ndarray) -> np.ndarray:
        """(N, 4) bin indices, columns in NAMES order, for model inputs and digits."""
        columns = [digits] + [bin_indices(compute(images), self.edges[name])
                              for name, compute in STATISTICS.items()]
        return np.stack(columns, axis=1).astype(np.uint8)


class Window:
    """The bins of the last ``size`` images of one version: a ring of bin indices and
    the counts per bin, kept in step (not thread-safe: DriftMonitor locks it)."""

    def __init__(self, reference: Reference, size: int):
        self.reference = reference
        self.ring = np.full((size, len(NAMES)), _EMPTY, np.uint8)
        self.counts = [np.zeros(len(reference.counts[name]), np.int64) for name in NAMES]
        self.filled = 0
        self.pending = 0  # images added since the gauge was last set
        self._next = 0

    def add(self, bins: np.ndarray) -> None:
        """Add a batch's bins, dropping the oldest images beyond the window's size."""
        size = len(self.ring)
        bins = bins[-size:]
        positions = (self._next + np.arange(len(bins))) % size
        old = self.ring[positions]
        old = old[old[:, 0] != _EMPTY]
        for column, counts in enumerate(self.counts):
            counts -= np.bincount(old[:, column], minlength=len(counts))
            counts += np.bincount(bins[:, column], minlength=len(counts))
        self.ring[positions] = bins
        self._next = (self._next + len(bins)) % size
        self.filled = min(size, self.filled + len(bins))
        self.pending += len(bins)

    def psi(self) -> dict[str, float]:
        """The index of every statistic, window against reference."""
        return {name: psi(counts, self.reference.counts[name])
                for name, counts in zip(NAMES, self.counts, strict=True)}


class DriftMonitor:
    """One worker's windows, one per loaded version with a reference, the gauge they
    set, and the thread that fills them. ``size`` 0 turns it off."""

    def __init__(self, gauge: Gauge, size: int, min_samples: int):
        self.gauge = gauge
        self.size = size
        self.min_samples = min_samples
        self.every = max(1, size // UPDATES_PER_WINDOW)
        # Weak: a version's window goes when the store has let the version go.
        self._windows: weakref.WeakKeyDictionary[LoadedModel, Window | None] = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # images waiting in the queue
        self._thread: threading.Thread | None = None
        self._shown: set[str] = set()  # models whose gauge this worker has set

    def window(self, model: LoadedModel) -> Window | None:
        """The version's window, made on its first request; None when it has no
        reference or drift is off."""
        with self._lock:
            if model not in self._windows:
                reference = Reference.from_metadata(model.metadata) if self.size else None
                self._windows[model] = None if reference is None else \
                    Window(reference, self.size)
            return self._windows[model]

    def submit(self, model: LoadedModel, images: np.ndarray, probabilities: np.ndarray
               ) -> None:
        """Queue a request's images and answers for the drift thread; never blocks.
        Past QUEUE_MAX_IMAGES waiting (the thread behind), they are left out: the
        window is a sample of the traffic, and a smaller one is no worse."""
        if self.window(model) is None:
            self.forget(model.name)  # its index may be a retired version's
            return
        with self._lock:
            if self._queued + len(images) > QUEUE_MAX_IMAGES:
                return
            self._queued += len(images)
        self._put(model, images, probabilities)

    def forget(self, name: str) -> None:
        """A version of ``name`` retired, or one without a reference served: the drift
        thread sets the gauge again from what the model still serves (0 when nothing
        holds enough images). Called by the model store for every retired version, so
        that a removed model's index does not wait for requests that never come."""
        with self._lock:  # _show marks a name under it: no reset slips between
            shown = name in self._shown
        if shown:
            self._put(name, None, None)

    def _put(self, *item: object) -> None:
        if self._thread is None:  # checked again under the lock; once per worker
            with self._lock:
                if self._thread is None:  # started in the worker, after gunicorn's fork
                    self._thread = threading.Thread(target=self._run, name="drift",
                                                    daemon=True)
                    self._thread.start()
        self._queue.put(item)

    def _run(self) -> None:
        """Take whatever has queued and add it, one batch per version: under load a
        pass covers many requests, so the cost per image falls as traffic rises."""
        while True:
            waiting = [self._queue.get()]
            while not self._queue.empty():
                waiting.append(self._queue.get())
            with self._lock:
                self._queued -= sum(len(images) for _, images, _ in waiting
                                    if images is not None)
            for key in dict.fromkeys(key for key, _, _ in waiting):
                try:
                    if isinstance(key, str):  # a model's name, from ``forget``
                        with self._lock:
                            self._show(key)
                        continue
                    mine = [(images, answers) for m, images, answers in waiting if m is key]
                    self.observe(key, np.concatenate([i for i, _ in mine]),
                                 np.concatenate([a for _, a in mine]))
                except Exception:  # the thread must outlive any one batch or reset
                    log.exception("drift index of %s failed", key if isinstance(key, str)
                                  else f"{key.name} version {key.version}")

    def observe(self, model: LoadedModel, images: np.ndarray, probabilities: np.ndarray
                ) -> None:
        """Add images (float32 (N, 28, 28, 1)) and their answers to the version's
        window; set the gauge when a twentieth of a window has passed."""
        window = self.window(model)
        if window is None:
            return
        bins = window.reference.bins(images, probabilities.argmax(axis=1))
        with self._lock:
            window.add(bins)
            filling = window.filled < self.min_samples
            if filling and model.name in self._shown:  # a retired version's index
                self._show(model.name)  # until this window fills, or another one shows
                return
            if filling or window.pending < self.every:
                return
            window.pending = 0
            self._show(model.name)

    def _show(self, name: str) -> None:
        """Set the model's gauge from its serving versions (under the lock); back to 0
        when none holds enough images and this worker had set it."""
        largest = self._largest(name)
        if largest:
            self._shown.add(name)
        elif name in self._shown:
            for statistic in NAMES:
                self.gauge.labels(name, statistic).set(0.0)
            self._shown.discard(name)  # once written: a reset that failed is tried again
        for statistic, value in largest.items():
            self.gauge.labels(name, statistic).set(value)

    def _largest(self, name: str) -> dict[str, float]:
        """Per statistic, the largest index among the model's serving versions whose
        windows hold enough images (under the lock)."""
        indices = [window.psi() for model, window in list(self._windows.items())
                   if model.name == name and not model.retired and window is not None
                   and window.filled >= self.min_samples]
        return {statistic: max(index[statistic] for index in indices)
                for statistic in NAMES} if indices else {}


def observe_drift(model: LoadedModel, images: np.ndarray, probabilities: np.ndarray
                  ) -> None:
    """Hand a request's images and answers to this worker's drift thread: a queue put,
    nothing computed on the request's path (a version with no reference costs one
    dictionary look-up)."""
    monitor: DriftMonitor | None = current_app.extensions.get("drift")
    if monitor is not None:
        monitor.submit(model, images, probabilities)
