"""Flask's JSON, encoded by orjson: several times faster on responses of float lists."""

from __future__ import annotations

from typing import Any

import orjson
from flask.json.provider import JSONProvider


class OrjsonProvider(JSONProvider):
    """dumps/loads through orjson; NumPy scalars and arrays serialise natively."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any):
        data = self._prepare_response_obj(args, kwargs)
        body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
        return self._app.response_class(body, mimetype="application/json")
