"""The gunicorn worker: gthread, whose graceful stop drops no connection it was sent, and
which leaves each new connection to the worker holding the fewest.

gunicorn's gthread worker stops accepting when it is told to stop (SIGTERM, a worker
restart), but closes its copy of the listening socket only after its last request: every
connection the kernel completes meanwhile (clients reconnecting after a "Connection:
close", new clients) waits in the listen backlog and is reset at that close — requests
sent and never answered. This worker instead accepts what is already queued, then closes
its copy at once: queued connections are served, and once the master and every worker
have closed theirs, new ones are refused, which a client knows it may retry.

All workers wait on one listening socket, so which of them accepts a connection is a
race that one worker often wins many times over, and a keep-alive connection stays
where it landed: stock gthread was measured splitting 32 clients 31/1, 22/10 and 21/11
between two workers, the first with 30% less throughput than an even split. So every
worker publishes how many
connections it holds in a table the master shares with all of them (``ConnectionTable``),
and accepts at once only while it holds no more than any sibling; a busier worker waits
ACCEPT_DELAY for the least busy one to take the connection, and takes it itself if it is
still waiting then (least-connections balancing, as proxies do it, without a proxy).

A reload (SIGHUP) starts new workers and at once tells the old ones to stop, while the new
ones still load their models (15 s on a loaded machine): a stock worker stops accepting
then, and for a whole boot nobody takes a connection. So a worker told to stop while a
sibling is still booting and no sibling serves keeps serving (``handle_exit``) until one
does, or until ``graceful_timeout`` has passed; the table says which workers serve.

Both lean on gthread's private event loop, not on an extension point gunicorn documents:
``check_config`` (called by the master at start) refuses a gunicorn outside the versions
this was measured on (``GUNICORN_VERSIONS``; requirements.txt pins one) or whose loop lacks
what is overridden here (``loop_differences``), so an upgrade stops loudly at start
instead of leaving a worker that silently never accepts.
"""

from __future__ import annotations

import inspect
import mmap
import os
import select
import time

import gunicorn
import numpy as np
from gunicorn.workers.gthread import ThreadWorker

ACCEPT_DELAY = 0.01  # seconds a busier worker leaves a connection to the least busy one
SLOTS = 1024  # workers alive at once that the table can tell apart
NOT_ACCEPTING = 1 << 62  # the count of a worker that cannot accept: booting or stopping
BOOTING, SERVING, STOPPING = 1, 2, 3  # a worker's state in the table (0: a free slot)
# The gunicorn releases whose gthread loop this worker was read against and tested with:
# from the first, up to but not including the second (requirements.txt pins one inside).
GUNICORN_VERSIONS = ((27, 0, 1), (27, 1))
# gthread's private loop as this worker uses it: the methods it overrides or calls (with
# their parameters), the state it reads, and the calls ``ThreadWorker.run`` must make.
LOOP_METHODS = {"accept": ["self", "listener"],
                "set_accept_enabled": ["self", "enabled"],
                "wait_for_and_dispatch_events": ["self", "timeout"],
                "handle_exit": ["self", "sig", "frame"]}
LOOP_STATE = ("nr_conns", "worker_connections", "_accepting", "alive", "sockets",
              "method_queue")
LOOP_CALLS = ("self.set_accept_enabled(can_accept)",
              "self.wait_for_and_dispatch_events(timeout=")


class ConnectionTable:
    """(worker age, connections held, state) per slot, in memory shared across the fork.

    Slots are taken and given back by the master alone (when it creates a worker, and
    when it reaps one), so no two workers ever race for one; each worker writes only its
    own count and state, aligned 8-byte stores.
    """

    def __init__(self, slots: int = SLOTS):
        self._memory = mmap.mmap(-1, slots * 24)  # anonymous and shared: kept by children
        self._table = np.frombuffer(self._memory, dtype=np.int64).reshape(slots, 3)

    def claim(self, age: int) -> int | None:
        """In the master: a free slot for a new worker, or None when all are taken."""
        free = np.flatnonzero(self._table[:, 0] == 0)
        if free.size == 0:
            return None
        slot = int(free[0])
        # Until its accept loop runs (the model takes seconds to load), the new worker
        # reads as full: siblings must not wait for a worker that cannot accept yet.
        self._table[slot] = (age, NOT_ACCEPTING, BOOTING)
        return slot

    def release(self, slot: int | None) -> None:
        """In the master, once the worker is gone (however it died)."""
        if slot is not None:
            self._table[slot] = (0, 0, 0)

    def publish(self, slot: int, connections: int) -> None:
        self._table[slot, 1] = connections

    def mark(self, slot: int, state: int) -> None:
        """In the worker: it serves, or it was told to stop (BOOTING, SERVING, STOPPING)."""
        self._table[slot, 2] = state

    def state(self, slot: int) -> int:
        return int(self._table[slot, 2])

    def any_elsewhere(self, slot: int, state: int) -> bool:
        """Whether a live worker other than ``slot``'s is in ``state``."""
        live = self._table[:, 0] != 0
        live[slot] = False
        return bool((self._table[live, 2] == state).any())

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections any other live worker holds, None if it is alone."""
        live = self._table[:, 0] != 0
        live[slot] = False
        return int(self._table[live, 1].min()) if live.any() else None


TABLE = ConnectionTable()  # created at import, in the master, before any worker forks


class UnsupportedGunicorn(RuntimeError):
    """gunicorn prints a RuntimeError from the master's start as "Error: ..." and exits 1."""


def loop_differences(base: type = ThreadWorker,
                     version: tuple = tuple(gunicorn.version_info), config=None) -> list[str]:
    """What keeps ``base`` (gthread's worker in ``version``) from being the loop this
    worker was written against; empty when it is that loop."""
    lowest, beyond = GUNICORN_VERSIONS
    found = [] if lowest <= version < beyond else [
        f"gunicorn {'.'.join(map(str, version))} is outside the tested range "
        f">={'.'.join(map(str, lowest))},<{'.'.join(map(str, beyond))}"]
    for name, parameters in LOOP_METHODS.items():
        method = getattr(base, name, None)
        if not callable(method):
            found.append(f"{base.__name__}.{name} is missing")
        elif list(inspect.signature(method).parameters) != parameters:
            found.append(f"{base.__name__}.{name} takes {inspect.signature(method)}, "
                         f"not ({', '.join(parameters)})")
    return found + missing_calls(base) + missing_state(base, config)


def missing_calls(base: type) -> list[str]:
    """The calls of LOOP_CALLS that ``base.run`` (the loop, read as source) no longer makes."""
    try:
        run = inspect.getsource(base.run)
    except (AttributeError, OSError, TypeError):  # no run, or installed without sources
        return [f"{base.__name__}.run cannot be read to check the calls it makes"]
    return [f"{base.__name__}.run no longer calls {call}...)" for call in LOOP_CALLS
            if call not in run]


def missing_state(base: type, config) -> list[str]:
    """The attributes of LOOP_STATE that a new ``base`` worker lacks (they are set in
    ``__init__``, so one is built: in the master, it touches nothing process-wide)."""
    from gunicorn.config import Config

    try:
        worker = base(0, os.getpid(), [], None, 30, config or Config(), None)
    except Exception as error:  # noqa: BLE001 - any failure is the difference to report
        return [f"{base.__name__} cannot be built as before: {error!r}"]
    worker.tmp.close()
    return [f"{base.__name__} has no {name}" for name in LOOP_STATE
            if not hasattr(worker, name)]


class DrainingThreadWorker(ThreadWorker):
    """``worker_class = "app.worker.DrainingThreadWorker"`` (app/gunicorn.conf.py)."""

    @classmethod
    def check_config(cls, cfg, log) -> None:
        """Refuse to start on a gthread loop other than the one this worker overrides."""
        super().check_config(cfg, log)
        differences = loop_differences(ThreadWorker, tuple(gunicorn.version_info), cfg)
        if differences:
            raise UnsupportedGunicorn(
                "app.worker.DrainingThreadWorker relies on gunicorn's gthread internals, "
                "which differ here: " + "; ".join(differences) + ". Install the gunicorn "
                "of requirements.txt, or run stock gthread (-k gthread) until app/worker.py "
                "is checked against this release.")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # runs in the master, before the fork
        self.slot = TABLE.claim(self.age)
        self._accept_at: float | None = None  # end of the current wait for a sibling
        self._retrying = False  # that wait is over: take what the sibling left
        self._stop_by: float | None = None  # told to stop: serve until relieved or then

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM: stop, unless this worker serves while a sibling is still booting and
        none serves (a reload: gunicorn stops the old workers as it starts the new
        ones). Then keep serving, marked STOPPING, until a sibling serves or
        ``graceful_timeout`` has passed (``relieved``), so connections are taken all
        along; the stop itself (drain, then finish what is in flight) follows as usual.
        A second SIGTERM, or one while booting, stops at once."""
        if self.slot is None or TABLE.state(self.slot) != SERVING:
            super().handle_exit(sig, frame)
            return
        TABLE.mark(self.slot, STOPPING)
        self._stop_by = time.monotonic() + self.cfg.graceful_timeout
        self.method_queue.defer(lambda: None)  # wake the loop to look at once

    def relieved(self) -> bool:
        """Whether a worker told to stop may stop now: no sibling is booting, one
        serves, or it has waited ``graceful_timeout``."""
        return (self._stop_by is not None
                and (time.monotonic() >= self._stop_by
                     or not TABLE.any_elsewhere(self.slot, BOOTING)
                     or TABLE.any_elsewhere(self.slot, SERVING)))

    def accept(self, listener) -> None:
        """Accept at once unless a sibling holds fewer connections; then wait
        ACCEPT_DELAY first and take what it left in the backlog."""
        if self._leave_to_sibling():
            self._accept_at = time.monotonic() + ACCEPT_DELAY
            super().set_accept_enabled(False)
            return
        super().accept(listener)
        self.publish()

    def _leave_to_sibling(self) -> bool:
        if self.slot is None or not self.alive or self._retrying:
            return False
        fewest = TABLE.fewest_elsewhere(self.slot)
        return fewest is not None and fewest < self.nr_conns

    def publish(self) -> None:
        if self.slot is not None:
            TABLE.publish(self.slot, self.nr_conns)

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled and self._accept_at is not None:
            if time.monotonic() < self._accept_at:
                return  # still leaving the backlog to a less busy sibling
            self._accept_at, self._retrying = None, True
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:  # stopping, not merely at worker_connections
            self.drain_and_close_listeners()

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """Publish the count (requests finish and connections close between calls; the
        first call, as the accept loop starts, ends the "full" of ``claim``), and wake
        when a wait for a sibling ends, to look at the backlog again."""
        self.publish()
        self._serve_or_stop()
        left = None if self._accept_at is None else self._accept_at - time.monotonic()
        if left is not None and left > 0:
            timeout = min(timeout, left)
        super().wait_for_and_dispatch_events(timeout)
        self._retrying = False  # one look at the backlog after a wait, not more

    def _serve_or_stop(self) -> None:
        """On the first pass of the accept loop, mark this worker SERVING (siblings told
        to stop wait for that); once a worker told to stop is ``relieved``, stop."""
        if self.slot is None:
            return
        if self._stop_by is None and TABLE.state(self.slot) == BOOTING:
            TABLE.mark(self.slot, SERVING)
            self.log.info("Worker %s accepting connections", self.pid)
        elif self.alive and self.relieved():
            self._stop_by = None
            self.alive = False

    def drain_and_close_listeners(self) -> None:
        """Hand the connections in a listener's backlog to the thread pool until it is
        empty, then close the listener (the kernel completes no more connections on it
        once every process holding it has closed it, and resets those still queued: a
        request already sent on one is lost, so the backlog is taken to its end, not
        only as it stood when the stop began). At most ``worker_connections`` in all:
        clients that keep arriving cannot hold a stopping worker past it; they are
        refused at the close, which a client may retry."""
        taken = 0
        for listener in self.sockets:
            while taken < self.worker_connections:
                if not select.select([listener], [], [], 0)[0]:
                    break  # the backlog is empty (a sibling took the rest)
                # Non-blocking: enqueues the connection, or finds it taken by another
                # worker or aborted by its client.
                super().accept(listener)
                taken += 1
            listener.close()
        self.leave_table()

    def leave_table(self) -> None:
        """A worker that no longer accepts must not be waited for: it reads as full."""
        if self.slot is not None:
            TABLE.publish(self.slot, NOT_ACCEPTING)
            TABLE.mark(self.slot, STOPPING)
            self.slot = None
