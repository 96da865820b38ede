"""Structured logs: every line is one JSON object; each request gets one access line.

A client's ``X-Request-ID`` is honoured when it is sane (printable ASCII, at most 128
characters) and otherwise generated; it is echoed in the response and in the log line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime

from flask import Flask, g, request

access_log = logging.getLogger("app.access")
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # whole value: fullmatch
ACCESS_FIELDS = ("request_id", "method", "path", "status", "ms", "bytes_in", "remote")


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, plus an access line's fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: getattr(record, key) for key in ACCESS_FIELDS if hasattr(record, key)})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str) -> None:
    """Send the app's logs to stderr as JSON (gunicorn collects stderr)."""
    logger = logging.getLogger("app")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_app_json", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._app_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def request_id_from(header: str | None) -> str:
    return header if header and REQUEST_ID.fullmatch(header) else uuid.uuid4().hex


def init_app(app: Flask, metrics) -> None:
    """Time every request, count it in the metrics, log it and echo its request id."""

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()
        g.request_id = request_id_from(request.headers.get("X-Request-ID"))

    @app.after_request
    def record(response):
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.observe(endpoint, request.method, response.status_code, seconds)
        request_id = g.get("request_id") or request_id_from(None)
        response.headers["X-Request-ID"] = request_id
        if not access_log.isEnabledFor(logging.INFO):  # e.g. LOG_LEVEL=WARNING
            return response
        access_log.info("%s %s %d", request.method, request.path, response.status_code, extra={
            "request_id": request_id, "method": request.method, "path": request.path,
            "status": response.status_code, "ms": round(seconds * 1000, 2),
            "bytes_in": request.content_length or 0, "remote": request.remote_addr,
        })
        return response
