"""The gunicorn worker: gthread, whose graceful stop drops no connection it was sent.

gunicorn's gthread worker stops accepting when it is told to stop (SIGTERM, a worker
restart), but closes its copy of the listening socket only after its last request: every
connection the kernel completes meanwhile (clients reconnecting after a "Connection:
close", new clients) waits in the listen backlog and is reset at that close — requests
sent and never answered. This worker instead accepts what is already queued, then closes
its copy at once: queued connections are served, and once the master and every worker
have closed theirs, new ones are refused, which a client knows it may retry.
"""

from __future__ import annotations

import select

from gunicorn.workers.gthread import ThreadWorker


class DrainingThreadWorker(ThreadWorker):
    """``worker_class = "app.worker.DrainingThreadWorker"`` (app/gunicorn.conf.py)."""

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:  # stopping, not merely at worker_connections
            self.drain_and_close_listeners()

    def drain_and_close_listeners(self) -> None:
        """Hand every connection already in a listener's backlog to the thread pool,
        then close the listener (the kernel completes no more connections on it once
        every process holding it has closed it)."""
        for listener in self.sockets:
            while select.select([listener], [], [], 0)[0]:
                # Non-blocking: enqueues the connection, or finds it taken by another
                # worker or aborted by its client (then the backlog is read again).
                self.accept(listener)
            listener.close()
