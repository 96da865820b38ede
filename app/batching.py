"""Adaptive micro-batching: concurrent requests' images run as one model call.

One model call has a large fixed cost (a few hundred microseconds of TensorFlow dispatch)
and a small cost per image, so running eight requests' images together is far cheaper
than eight calls. TensorFlow Serving and BentoML batch with a timeout, which makes a lone
request wait for company that never comes. Here the batcher knows which requests are
*arriving* (reading and preparing their images in other threads): it waits, at most
``timeout_ms``, only for those. A lone request — nobody arriving, nothing queued, the
model idle — runs at once in its own thread, without even a hand-over to the batcher.
A request that fills a batch by itself (``max_size`` images or more) runs at once too,
beside whatever batch is running: queueing it would only serialise two full model calls.

Overload is answered, not absorbed: every request carries a ``Deadline``
(REQUEST_TIMEOUT_MS); the queue holds at most ``max_queue`` requests and refuses more
with ``Overloaded`` (503), as TF Serving, Triton and Ray do; work whose deadline passed
while it waited is dropped before it reaches the model, and its client gets
``DeadlineExceeded`` (504). A batch that fails is re-run one request at a time, so a
poisoned request fails alone. If the batcher thread itself dies, every waiting and later
request is refused at once and the registered death handlers run (under gunicorn: the
worker stops taking requests and is replaced, see app/gunicorn.conf.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from app import tracing
from app.errors import DeadlineExceeded, ModelFailed, ModelNotReady, Overloaded

if TYPE_CHECKING:
    from prometheus_client import Gauge

log = logging.getLogger(__name__)
Predict = Callable[[np.ndarray], np.ndarray]
_death_handlers: list[Callable[[], None]] = []


def on_batcher_death(handler: Callable[[], None]) -> Callable[[], None]:
    """Run ``handler`` (once per death) when any batcher thread dies: a worker whose
    batcher is gone can only refuse requests, so it should be replaced. Returns the
    function that unregisters it."""
    _death_handlers.append(handler)
    return lambda: _death_handlers.remove(handler)


class Deadline:
    """The moment a request must be answered by, on the monotonic ``perf_counter`` clock
    (the one app/logs.py stamps requests with), so every stage checks the same budget."""

    def __init__(self, seconds: float, start: float | None = None):
        self.seconds = seconds
        self.expires = (time.perf_counter() if start is None else start) + seconds

    def remaining(self) -> float:
        return self.expires - time.perf_counter()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def error(self, stage: str) -> DeadlineExceeded:
        return DeadlineExceeded(f"no answer within {self.seconds * 1000:.0f} ms "
                                f"(REQUEST_TIMEOUT_MS): the deadline passed {stage}")

    def check(self, stage: str) -> None:
        """Raise DeadlineExceeded if the deadline has passed."""
        if self.expired():
            raise self.error(stage)


def run_direct(predict: Predict, images: np.ndarray, deadline: Deadline | None) -> np.ndarray:
    """One model call in the caller's thread: refused (504) if the request's deadline
    already passed, since its client has stopped waiting; a model failure on valid
    input is a ModelFailed (500), logged once with its traceback."""
    if deadline is not None:
        deadline.check("before the model ran")
    try:
        return tracing.model_call(predict, images, [tracing.admitted()])
    except Exception:
        log.exception("model call failed")
        raise ModelFailed("the model failed on this input") from None


@dataclass
class _Job:
    images: np.ndarray
    deadline: Deadline
    trace: tracing.Admission | None = field(default_factory=tracing.admitted)  # app/tracing.py
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None
    admitted: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its batch's model call started

    def finish(self, result: np.ndarray | None = None, error: BaseException | None = None):
        self.result, self.error = result, error
        self.done.set()


class MicroBatcher:
    """Queues requests for one model and runs them in batches on one thread."""

    def __init__(self, predict: Predict, max_size: int, timeout_ms: float,
                 deadline_s: float = 30.0, name: str = "model",
                 queue_gauge: Gauge | None = None,
                 on_wait: Callable[[float], None] | None = None):
        """``queue_gauge`` (``model_queue_requests``, app/metrics.py) follows the number
        of requests waiting for a batch; ``on_wait`` is told, in each request's own
        thread, the seconds it waited for its model call (0 when run at once)."""
        self.predict = predict
        self.max_size = max_size
        self.timeout = timeout_ms / 1000.0
        self.deadline = deadline_s  # for callers that bring no Deadline of their own
        self.name = name
        self._queue: deque[_Job] = deque()
        self._queue_gauge = queue_gauge
        self._on_wait = on_wait or untold
        self._running: list[_Job] = []
        self._arriving = 0
        self._busy = False  # a model call (batched or direct) is running
        self._closed = False
        self._dead = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """False once the batcher thread has died or been closed: nothing can run."""
        return self._thread.is_alive() and not (self._dead or self._closed)

    @contextmanager
    def arriving(self) -> Iterator[Ticket]:
        """Wrap the reading of a request's images; ``ticket.run(images)`` inside it.

        While inside, the request counts as arriving and a forming batch may wait for it.
        """
        with self._cond:
            self._arriving += 1
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            if not ticket.used:
                with self._cond:
                    self._arriving -= 1
                    self._wake()

    def run(self, images: np.ndarray, arrived: bool = False, deadline: Deadline | None = None,
            max_queue: int | None = None) -> np.ndarray:
        """Predict ``images`` at once if alone, else in the next batch; blocks until done
        or until the deadline (DeadlineExceeded). Raises Overloaded when ``max_queue``
        requests already wait, ModelNotReady when closed or dead."""
        deadline = deadline or Deadline(self.deadline)
        job = _Job(images, deadline)
        lane = self._admit(job, arrived, max_queue)
        if lane != "queued":
            self._on_wait(0.0)
            try:
                return run_direct(self.predict, images, deadline)
            finally:
                if lane == "alone":
                    self._idle()
        if not job.done.wait(max(0.0, deadline.remaining())):
            raise deadline.error("while the request waited for the model")
        if job.started is not None:
            self._on_wait(job.started - job.admitted)
        if job.error is not None:
            raise job.error
        return job.result

    def _admit(self, job: _Job, arrived: bool, max_queue: int | None) -> str:
        """Which way a request goes: "full" (a batch by itself, so waiting for others
        cannot make its call cheaper: it runs at once, beside any batch), "alone" (the
        model is idle and nobody is coming: it runs at once and holds the model), or
        "queued" for the next batch."""
        with self._cond:
            if arrived:  # it stops arriving the moment it is queued, in one step
                self._arriving -= 1
                self._wake()
            if self._dead:
                raise ModelNotReady(f"the batcher of {self.name!r} has stopped; "
                                    "this worker is being replaced")
            if self._closed:
                raise ModelNotReady("the server is shutting down")
            if len(job.images) >= self.max_size:
                return "full"
            if not (self._busy or self._queue or self._arriving):
                self._busy = True
                return "alone"
            if max_queue is not None and len(self._queue) >= max_queue:
                raise Overloaded(f"{len(self._queue)} requests already wait for model "
                                 f"{self.name!r} (QUEUE_MAX_REQUESTS); retry later")
            self._queue.append(job)
            self._count_queued(1)
            self._cond.notify_all()
            return "queued"

    def _count_queued(self, change: int) -> None:
        """Move the queue gauge by ``change`` (``_cond`` held); increments, not the
        length, so that a model's versions (each with its batcher) add up."""
        if self._queue_gauge is not None:
            self._queue_gauge.inc(change)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests, answer those already queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _idle(self) -> None:
        with self._cond:
            self._busy = False
            self._wake()

    def _wake(self) -> None:
        """Wake the batcher thread (``_cond`` held) only when it has something to do: a
        queue to batch, or a close to finish. Waking it at each step of a lone request
        cost that request ~0.4 ms of GIL hand-offs (BENCHMARKS.md), the very cost the
        lone lane exists to avoid."""
        if self._queue or self._closed:
            self._cond.notify_all()

    def _take(self) -> list[_Job]:
        """Wait for work and an idle model, then for arriving requests (bounded), then
        pop one batch of requests still within their deadlines and mark the model busy;
        [] once closed and drained."""
        with self._cond:
            while True:
                while (not self._queue or self._busy) and not (self._closed and not self._busy):
                    self._cond.wait()
                if not self._queue:
                    return []
                limit = time.monotonic() + self.timeout
                while (self._arriving and self._queued_images() < self.max_size
                       and (left := limit - time.monotonic()) > 0):
                    self._cond.wait(left)
                batch = self._pop_batch()
                if batch:
                    self._busy = True
                    self._running = batch
                    return batch

    def _pop_batch(self) -> list[_Job]:
        """Up to max_size images of queued requests, in order; expired ones are answered
        DeadlineExceeded here, so the model never computes an answer nobody awaits."""
        batch: list[_Job] = []
        size = 0
        while self._queue:
            job = self._queue[0]
            if job.deadline.expired():
                self._queue.popleft()
                self._count_queued(-1)
                job.finish(error=job.deadline.error("while the request was queued"))
                continue
            if batch and size + len(job.images) > self.max_size:
                break
            batch.append(self._queue.popleft())
            self._count_queued(-1)
            size += len(job.images)
        return batch

    def _queued_images(self) -> int:
        return sum(len(job.images) for job in self._queue)

    def _loop(self) -> None:
        try:
            while batch := self._take():
                started = time.perf_counter()
                for job in batch:
                    job.started = started
                try:
                    self._execute(batch)
                finally:
                    self._idle()
                self._running = []  # kept when the batch killed the thread: _die answers it
        except BaseException:  # whatever killed it, no request may wait for it
            log.critical("the batcher of %r died; refusing its requests", self.name,
                         exc_info=True)
            self._die()

    def _die(self) -> None:
        """Answer every request still waiting, refuse later ones, tell the handlers."""
        with self._cond:
            self._dead = True
            waiting = [*self._running, *self._queue]
            self._count_queued(-len(self._queue))
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            if not job.done.is_set():
                job.finish(error=ModelNotReady(f"the batcher of {self.name!r} stopped"))
        for handler in _death_handlers:
            handler()

    def _execute(self, batch: list[_Job]) -> None:
        try:
            images = np.concatenate([job.images for job in batch])
            outputs = tracing.model_call(self.predict, images, [job.trace for job in batch])
        except Exception:
            if len(batch) == 1:
                log.exception("model call failed")
                batch[0].finish(error=ModelFailed("the model failed on this input"))
                return
            for job in batch:
                self._execute([job])
            return
        start = 0
        for job in batch:
            job.finish(result=outputs[start:start + len(job.images)])
            start += len(job.images)


def untold(seconds: float) -> None:
    """No one to tell."""


class Ticket:
    """One request's place among the arriving; ``run`` queues its images."""

    def __init__(self, batcher: MicroBatcher):
        self.batcher = batcher
        self.used = False

    def run(self, images: np.ndarray, deadline: Deadline | None = None,
            max_queue: int | None = None) -> np.ndarray:
        self.used = True
        return self.batcher.run(images, arrived=True, deadline=deadline, max_queue=max_queue)
