"""Where payload log records go (app/payload_log.py): an HTTP endpoint receiving
CloudEvents, or a file of JSON lines.

Each sink has ``send(record, body)``, called from the logger's own thread only, which
raises on failure (OSError, http.client.HTTPException or SinkError), and ``close()``.
"""

from __future__ import annotations

import http.client
import os
import socket
from urllib.parse import urlsplit

# KServe's logger types (pkg/logger/worker.go); ours sends one event a request, after the
# answer, carrying the inputs' statistics beside the predictions.
EVENT_TYPE = "org.kubeflow.serving.inference.response"
# How much of a sink's answer is read: its body means nothing here, and read whole, a
# sink answering a 2 GB body (or streaming one) would be held in the worker's memory.
RESPONSE_LIMIT_BYTES = 64 << 10


class SinkError(Exception):
    """The sink answered, but did not take the record."""


class HttpSink:
    """POSTs each record as a CloudEvent in binary content mode (the ``ce-*`` headers
    carry the event's attributes, the body is the record), as KServe's logger does: the
    event id is the request id, so a record joins the request's access log line. One
    keep-alive connection, opened again after any failure (or an answer longer than
    RESPONSE_LIMIT_BYTES); every connect and read is bounded by ``timeout`` so a sink
    that hangs costs the thread that long, no more."""

    def __init__(self, url: str, timeout: float, source: str):
        parts = urlsplit(url)
        self._connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                                  else http.client.HTTPConnection)
        self._host, self._port = parts.hostname or "", parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout
        self._source = source
        self._connection: http.client.HTTPConnection | None = None

    def headers(self, record: dict) -> dict[str, str]:
        """The CloudEvents attributes of ``record``, as HTTP headers."""
        return {"Content-Type": "application/json", "ce-specversion": "1.0",
                "ce-id": record["request_id"], "ce-type": EVENT_TYPE,
                "ce-source": self._source, "ce-time": record["time"],
                "ce-inferenceservicename": record["model"],
                "ce-modelversion": str(record["version"])}

    def send(self, record: dict, body: bytes) -> None:
        """Deliver one record; raises when the sink fails, times out or answers non-2xx."""
        if self._connection is None:
            self._connection = self._connection_class(self._host, self._port,
                                                      timeout=self._timeout)
        try:
            self._connection.request("POST", self._path, body, self.headers(record))
            response = self._connection.getresponse()
            response.read(RESPONSE_LIMIT_BYTES)
            if not response.isclosed():  # more is left: drop it with the connection
                self.close()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if not 200 <= response.status < 300:
            raise SinkError(f"the sink answered {response.status} {response.reason}")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class FileSink:
    """Appends each record as one JSON line. The file is opened with O_APPEND and each
    line goes out in one write(2): on a local filesystem the kernel appends it whole, so
    the lines of several workers, each with its own descriptor, never interleave (NFS
    gives no such promise)."""

    def __init__(self, path: str):
        # Non-blocking for the open alone: opening a FIFO no process reads would block
        # the worker's boot for ever, where this raises ENXIO (the worker does not boot,
        # saying why); the writes then block as on any file.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                           | os.O_NONBLOCK, 0o644)
        os.set_blocking(self._fd, True)

    def send(self, record: dict, body: bytes) -> None:
        line = body + b"\n"
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk; the fragment stays, the count says so
            raise SinkError(f"wrote {written} of {len(line)} bytes")

    def close(self) -> None:
        os.close(self._fd)


def event_source(port: int) -> str:
    """The CloudEvents ``source`` of this server: its host name and port, as a URI."""
    return f"http://{socket.gethostname()}:{port}/"
