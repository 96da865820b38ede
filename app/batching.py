"""Adaptive micro-batching: concurrent requests' images run as one model call.

One model call has a large fixed cost (a few hundred microseconds of TensorFlow dispatch)
and a small cost per image, so running eight requests' images together is far cheaper
than eight calls. TensorFlow Serving and BentoML batch with a timeout, which makes a lone
request wait for company that never comes. Here the batcher knows which requests are
*arriving* (reading and preparing their images in other threads): it waits, at most
``timeout_ms``, only for those. A lone request — nobody arriving, nothing queued, the
model idle — runs at once in its own thread, without even a hand-over to the batcher.

Every wait has a deadline; a batch that fails is re-run one request at a time, so a
poisoned request fails alone and the others still get their answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from app.errors import BatchTimeout, ModelFailed, ModelNotReady

log = logging.getLogger(__name__)


@dataclass
class _Job:
    images: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None

    def finish(self, result: np.ndarray | None = None, error: BaseException | None = None):
        self.result, self.error = result, error
        self.done.set()


class MicroBatcher:
    """Queues requests for one model and runs them in batches on one thread."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_size: int,
                 timeout_ms: float, deadline_s: float = 30.0, name: str = "model"):
        self.predict = predict
        self.max_size = max_size
        self.timeout = timeout_ms / 1000.0
        self.deadline = deadline_s
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent sizes, for tests and metrics
        self._queue: deque[_Job] = deque()
        self._arriving = 0
        self._busy = False  # a model call (batched or direct) is running
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

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
                    self._cond.notify_all()

    def run(self, images: np.ndarray, arrived: bool = False) -> np.ndarray:
        """Predict ``images`` at once if alone, else in the next batch; blocks until done
        or, when queued behind others, until the deadline."""
        job = _Job(images)
        with self._cond:
            if arrived:  # it stops arriving the moment it is queued, in one step
                self._arriving -= 1
            if self._closed:
                self._cond.notify_all()
                raise ModelNotReady("the server is shutting down")
            alone = not (self._busy or self._queue or self._arriving)
            if alone:
                self._busy = True
            else:
                self._queue.append(job)
            self._cond.notify_all()
        if alone:
            return self._direct(images)
        if not job.done.wait(self.deadline):
            raise BatchTimeout(f"no answer from the model within {self.deadline:.0f} s")
        if job.error is not None:
            raise job.error
        return job.result

    def queued(self) -> int:
        """Requests waiting for a batch right now."""
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking requests, answer those already queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _direct(self, images: np.ndarray) -> np.ndarray:
        """A lone request's call, in its own thread; the batcher waits until it is done."""
        try:
            self.batch_sizes.append(len(images))
            return self.predict(images)
        except Exception:
            log.exception("model call failed")
            raise ModelFailed("the model failed on this input") from None
        finally:
            self._idle()

    def _idle(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _take(self) -> list[_Job]:
        """Wait for work and an idle model, then for arriving requests (bounded), then
        pop one batch and mark the model busy."""
        with self._cond:
            while (not self._queue or self._busy) and not (self._closed and not self._busy):
                self._cond.wait()
            if not self._queue:
                return []
            limit = time.monotonic() + self.timeout
            while (self._arriving and self._queued_images() < self.max_size
                   and (left := limit - time.monotonic()) > 0):
                self._cond.wait(left)
            batch = [self._queue.popleft()]
            size = len(batch[0].images)
            while self._queue and size + len(self._queue[0].images) <= self.max_size:
                size += len(self._queue[0].images)
                batch.append(self._queue.popleft())
            self._busy = True
            return batch

    def _queued_images(self) -> int:
        return sum(len(job.images) for job in self._queue)

    def _loop(self) -> None:
        while batch := self._take():
            try:
                self._execute(batch)
            finally:
                self._idle()

    def _execute(self, batch: list[_Job]) -> None:
        self.batch_sizes.append(sum(len(job.images) for job in batch))
        try:
            outputs = self.predict(np.concatenate([job.images for job in batch]))
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


class Ticket:
    """One request's place among the arriving; ``run`` queues its images."""

    def __init__(self, batcher: MicroBatcher):
        self.batcher = batcher
        self.used = False

    def run(self, images: np.ndarray) -> np.ndarray:
        self.used = True
        return self.batcher.run(images, arrived=True)
