"""One loaded version as requests see it: its runtime, metadata and batcher, and the
bookkeeping that lets it be retired while requests still use it.

TensorFlow Serving hands requests a *handle* that keeps a version alive; here the handle
is the object itself. ``slot()`` counts the requests inside it; ``retire()`` (called by
the store when a newer version has been swapped in, or the folder was removed) stops new
micro-batches, and the batcher thread ends when the last request leaves. The weights are
freed when the last reference goes, so a request that started on a version finishes on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from app.batching import Deadline, MicroBatcher, run_direct, untold

if TYPE_CHECKING:
    from prometheus_client import Gauge

    from app.metrics import VersionMetrics

log = logging.getLogger(__name__)


class VersionRejected(Exception):
    """A version folder failed a check. The message is the reason clients see (in
    ``/models`` and the repository index): no paths, no exception text; ``detail``,
    when set, is what only the log gets; ``retry`` when the folder may pass unchanged
    (it could not be checked in time), so it is tried again at the next poll."""

    def __init__(self, reason: str, detail: str | None = None, retry: bool = False):
        super().__init__(reason)
        self.detail = detail
        self.retry = retry

    @classmethod
    def because(cls, what: str, err: BaseException) -> VersionRejected:
        """``what`` failed with ``err``: the error's type is the reason, its text (which
        may name files or internals) the detail."""
        return cls(f"{what} ({type(err).__name__})", f"{type(err).__name__}: {err}")


class Runtime(Protocol):
    """What the store needs of a runtime: predict, warm up, and describe its signature."""

    kind: str  # "savedmodel" or "litert"
    warmup_seconds: float  # of its load, set by the loader (model_warmup_seconds)
    input_name: str
    output_name: str
    signature_defs: dict[str, Any]

    def predict(self, images: np.ndarray) -> np.ndarray: ...

    def warm_up(self, largest: int) -> None: ...


def check_warm_up(predict: Callable[[np.ndarray], np.ndarray], size: int) -> None:
    """Run ``size`` blank images; anything but finite (size, 10) probabilities rejects
    the version before a request can meet it."""
    outputs = predict(np.zeros((size, 28, 28, 1), np.float32))
    if outputs.shape != (size, 10):
        raise VersionRejected(f"warm-up gave outputs of shape {outputs.shape}, "
                              f"expected ({size}, 10)")
    if not np.all(np.isfinite(outputs)):
        raise VersionRejected("warm-up on blank images gave NaN or infinite outputs")


@dataclass(eq=False)
class LoadedModel:
    """One servable version: name, version, folder, metadata and the runtime it runs on."""

    name: str
    version: int
    path: Path
    metadata: dict[str, Any] = field(repr=False)
    runtime: Runtime = field(repr=False)
    fingerprint: tuple = field(default=(), repr=False)  # the folder as it was loaded
    load_seconds: float = 0.0
    batcher: MicroBatcher | None = field(default=None, repr=False)
    meters: VersionMetrics | None = field(default=None, repr=False)
    _users: int = field(default=0, repr=False)
    _retired: bool = field(default=False, repr=False)
    _released: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def input_name(self) -> str:
        return self.runtime.input_name

    @property
    def output_name(self) -> str:
        return self.runtime.output_name

    @property
    def signature_defs(self) -> dict[str, Any]:
        return self.runtime.signature_defs

    @property
    def retired(self) -> bool:
        return self._retired

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 28, 28, 1) in [0, 1] → (N, 10) probabilities, one direct call,
        timed into ``meters`` when it succeeds: every model call, batched or not, is here."""
        started = time.perf_counter()
        outputs = self.runtime.predict(images)
        if self.meters is not None:
            self.meters.model_call(len(images), time.perf_counter() - started)
        return outputs

    def start_batching(self, max_size: int, timeout_ms: float,
                       queue_gauge: Gauge | None = None) -> None:
        """Share model calls between concurrent requests (app/batching.py)."""
        self.batcher = MicroBatcher(self.predict, max_size, timeout_ms, name=self.name,
                                    queue_gauge=queue_gauge, on_wait=self._waited)

    def _waited(self, seconds: float) -> None:
        """A request waited ``seconds`` for its model call."""
        if self.meters is not None:
            self.meters.queue.observe(seconds)

    @contextmanager
    def slot(self) -> Iterator[Any]:
        """Read a request's images inside; ``slot.run(images)`` predicts them, batched
        with concurrent requests while the version is current, directly once retired."""
        with self._lock:
            self._users += 1
            batcher = None if self._retired else self.batcher
        try:
            if batcher is None:
                yield _Direct(self.predict, self._waited)
            else:
                with batcher.arriving() as ticket:
                    yield ticket
        finally:
            with self._lock:
                self._users -= 1
                last = self._retired and self._users == 0
            if last:
                self._release()

    def retire(self) -> None:
        """No new batches; released now if idle, else when its last request leaves."""
        with self._lock:
            self._retired = True
            idle = self._users == 0
        if idle:
            self._release()

    def _release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        if self.batcher is not None:
            self.batcher.close()
        log.info("released %s version %d", self.name, self.version)


@dataclass(frozen=True)
class _Direct:
    """Batching off (or the version retired): run calls the model at once, in the
    request's thread, with the same deadline and failure handling as a batch
    (app/batching.py)."""

    predict: Any
    on_wait: Callable[[float], None] = untold

    def run(self, images: np.ndarray, deadline: Deadline | None = None,
            max_queue: int | None = None) -> np.ndarray:
        """``max_queue`` is accepted for the batcher's interface; nothing queues here."""
        self.on_wait(0.0)
        return run_direct(self.predict, images, deadline)
