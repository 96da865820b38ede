"""How numbers in the URL are read, in paths and queries alike.

Every number a client sends in a path or a query is a whole number in ASCII digits
without a leading zero, read by ``parse_version`` (the rule version folders follow): in
paths by the converter below, in queries by ``app.api.common.int_arg``. Python's
``int()``, ``str.isdigit()`` and Werkzeug's ``<int:>`` (``\\d+``) also take "۵۰۰۰",
"５０００", "1_000", " 5" and "+5", and "01" would reach version 1.
"""

from __future__ import annotations

from typing import Any

from werkzeug.routing import BaseConverter, ValidationError

from training.export_format import parse_version


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
