"""How the URL itself is read: numbers in paths and queries, and runs of slashes.

Every number a client sends in a path or a query is a whole number in ASCII digits
without a leading zero, read by ``parse_version`` (the rule version folders follow): in
paths by the converter below, in queries by ``app.api.common.int_arg``. Python's
``int()``, ``str.isdigit()`` and Werkzeug's ``<int:>`` (``\\d+``) also take "۵۰۰۰",
"５０００", "1_000", " 5" and "+5", and "01" would reach version 1.

Werkzeug answers a path with ``//`` by a 308 to an absolute URL built from the ``Host``
header (a redirect to any host a client names, with an HTML body, even for a POST);
``merged_slashes`` answers the path with its slashes merged instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.routing import BaseConverter, ValidationError

from training.export_format import parse_version

SLASHES = re.compile(r"//+")


class WholeNumberConverter(BaseConverter):
    """``<int:...>`` in this app: ASCII digits, no leading zero; anything else is no
    match, hence a 404."""

    regex = r"[0-9]+"  # ASCII only: \d takes every script's digits
    weight = 50  # Werkzeug's own number converters' weight: rules keep their order
    part_isolating = True

    def to_python(self, value: str) -> int:
        number = parse_version(value)
        if number is None:
            raise ValidationError()
        return number

    def to_url(self, value: Any) -> str:
        return str(int(value))


WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


def merged_slashes(wsgi_app: WsgiApp) -> WsgiApp:
    """WSGI middleware: ``/models//x`` is answered as ``/models/x``, never redirected."""

    def middleware(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if "//" in path:
            environ["PATH_INFO"] = SLASHES.sub("/", path)
        return wsgi_app(environ, start_response)

    return middleware
