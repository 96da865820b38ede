"""The service's settings: read from environment variables once, validated, then passed on.

Nothing else in ``app/`` reads ``os.environ``: the factory builds one ``Config`` and the
rest of the code receives it. (The OpenTelemetry SDK's own ``OTEL_*`` variables are the
exception: the SDK reads them itself, app/tracing.py only whether they ask for traces.)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from app.affinity import MODES
from app.version_policy import VersionPolicy
from training.export_format import CHECK_SECONDS, VERSION_LIMIT_BYTES

MAX_DRIFT_WINDOW = 1_000_000  # 4 MB of bin indices per loaded version and worker
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting is missing its right form; the message names the variable."""


@dataclass(frozen=True)
class Config:
    """Every setting, with the default a fresh clone runs with."""

    models_dir: Path = Path("models")
    model_name: str = "mnist_cnn"
    model_version_policy: str = "latest"  # or latest:N, all, or a list such as 1,3
    model_config_file: str = ""  # TF Serving's model_config_list: models, labels, canary
    model_poll_seconds: float = 2.0  # rescan MODELS_DIR this often; 0 turns the watch off
    prefer_tflite_model: bool = False  # serve model.tflite with LiteRT where a version has one
    model_max_bytes: int = VERSION_LIMIT_BYTES  # a version's listed files together
    model_check_seconds: float = CHECK_SECONDS  # hashing one version's files, at most
    port: int = 8000
    # gRPC (Open Inference Protocol, TF Serving) beside REST: Triton's pair is 8000/8001.
    grpc_port: int = 8001  # 0 turns gRPC off (app/grpc_server.py)
    max_content_length: int = 10 * 1024 * 1024  # bytes of request body
    max_batch: int = 256  # images in one request
    max_image_pixels: int = 40_000_000  # width × height, checked before decoding
    max_request_pixels: int = 160_000_000  # all images of one request together
    log_level: str = "INFO"
    batch_max_size: int = 64  # images per model call; 1 turns micro-batching off
    batch_timeout_ms: int = 2  # longest wait for requests already arriving
    request_timeout_ms: int = 30_000  # a request's deadline (TF Serving's REST default)
    queue_max_requests: int = 64  # requests waiting for one model; more get 503
    decode_budget_pixels: int = 40_000_000  # decoded image pixels in flight per worker
    tf_threads: int = 1  # TensorFlow intra-op threads per worker (workers × this ≤ cores)
    workers: int = 2  # gunicorn worker processes
    threads: int = 16  # gunicorn threads per worker (gthread): room for a batch to form
    cpu_affinity: str = "auto"  # pin each worker to one CPU: auto, on or off (app/affinity.py)
    auth_tokens_file: str = ""  # bearer tokens and their scopes (app/auth.py); empty: no auth
    cors_allowed_origins: str = ""  # origins, comma-separated, whose pages may call the API
    drift_window: int = 1000  # images per version and worker the drift index compares; 0: off
    drift_min_samples: int = 200  # images in a window before its index is exported
    prometheus_multiproc_dir: str = ""  # set by app/gunicorn.conf.py for multi-worker metrics
    # Sampled payload logs (app/payload_log.py): off unless one sink is set.
    payload_log_url: str = ""  # an HTTP(S) endpoint receiving CloudEvents
    payload_log_file: str = ""  # or a file of JSON lines, appended to by every worker
    payload_log_sample_rate: float = 1.0  # share of requests logged, 0 to 1
    payload_log_images: bool = False  # also log each 28×28 model input
    payload_log_queue_images: int = 1000  # images waiting per worker; more are dropped
    payload_log_timeout_seconds: float = 2.0  # connect/read timeout of a send, and exit flush

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build from variables named like the fields in upper case (MODELS_DIR, …)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = environ.get(field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(field.name.upper(), raw, type(getattr(cls, field.name)))
        return cls(**values).validated()

    def validated(self) -> Config:
        """Raise ConfigError for values the service cannot run with."""
        for name in ("port", "max_content_length", "max_batch", "max_image_pixels",
                     "max_request_pixels", "batch_max_size", "request_timeout_ms",
                     "queue_max_requests", "decode_budget_pixels",
                     "tf_threads", "workers", "threads", "model_max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.upper()} must be a positive integer, "
                                  f"got {getattr(self, name)}")
        if not 0 <= self.model_poll_seconds <= 86_400:
            raise ConfigError("MODEL_POLL_SECONDS must be between 0 (off) and 86400, "
                              f"got {self.model_poll_seconds}")
        if not 0 < self.model_check_seconds <= 3600:
            raise ConfigError("MODEL_CHECK_SECONDS must be above 0 and at most 3600, "
                              f"got {self.model_check_seconds}")
        if self.batch_timeout_ms < 0:
            raise ConfigError(f"BATCH_TIMEOUT_MS must be 0 or more, got {self.batch_timeout_ms}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"PORT must be between 1 and 65535, got {self.port}")
        if not 0 <= self.grpc_port <= 65535 or self.grpc_port == self.port:
            raise ConfigError("GRPC_PORT must be between 0 (off) and 65535 and differ from "
                              f"PORT, got {self.grpc_port}")
        try:
            VersionPolicy.parse(self.model_version_policy)
        except ValueError as err:
            raise ConfigError(f"MODEL_VERSION_POLICY: {err}") from None
        if self.cpu_affinity not in MODES:
            raise ConfigError(f"CPU_AFFINITY must be one of {', '.join(MODES)}, "
                              f"got {self.cpu_affinity!r}")
        if not 0 <= self.drift_window <= MAX_DRIFT_WINDOW:
            raise ConfigError(f"DRIFT_WINDOW must be between 0 (off) and {MAX_DRIFT_WINDOW}, "
                              f"got {self.drift_window}")
        if self.drift_window and not 1 <= self.drift_min_samples <= self.drift_window:
            raise ConfigError("DRIFT_MIN_SAMPLES must be between 1 and DRIFT_WINDOW "
                              f"({self.drift_window}), got {self.drift_min_samples}")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                              f"got {self.log_level!r}")
        self.cors_origins  # noqa: B018 - raises ConfigError for a malformed list
        self._validate_payload_log()
        return self

    def _validate_payload_log(self) -> None:
        """The PAYLOAD_LOG_* settings (app/payload_log.py); raises ConfigError."""
        if self.payload_log_url and self.payload_log_file:
            raise ConfigError("set PAYLOAD_LOG_URL or PAYLOAD_LOG_FILE, not both")
        if self.payload_log_url and not _SINK_URL.fullmatch(self.payload_log_url):
            raise ConfigError("PAYLOAD_LOG_URL must be http(s)://host[:port][/path], "
                              f"got {self.payload_log_url[:80]!r}")
        if not 0 <= self.payload_log_sample_rate <= 1:
            raise ConfigError("PAYLOAD_LOG_SAMPLE_RATE must be between 0 and 1, "
                              f"got {self.payload_log_sample_rate}")
        if self.payload_log_queue_images < 1:
            raise ConfigError("PAYLOAD_LOG_QUEUE_IMAGES must be a positive integer, "
                              f"got {self.payload_log_queue_images}")
        if not 0 < self.payload_log_timeout_seconds <= 60:
            raise ConfigError("PAYLOAD_LOG_TIMEOUT_SECONDS must be above 0 and at most 60, "
                              f"got {self.payload_log_timeout_seconds}")

    @property
    def payload_log_on(self) -> bool:
        """Whether a payload log sink is set (PAYLOAD_LOG_URL or PAYLOAD_LOG_FILE)."""
        return bool(self.payload_log_url or self.payload_log_file)

    @property
    def cors_origins(self) -> tuple[str, ...]:
        """CORS_ALLOWED_ORIGINS as exact origins (``scheme://host[:port]``), or ``("*",)``."""
        origins = tuple(o.strip() for o in self.cors_allowed_origins.split(",") if o.strip())
        if "*" in origins and len(origins) > 1:
            raise ConfigError("CORS_ALLOWED_ORIGINS: '*' allows every origin; list no other")
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ConfigError("CORS_ALLOWED_ORIGINS: each origin is scheme://host[:port] "
                                  f"with no path or trailing slash, got {origin[:80]!r}")
        return origins


_SINK_URL = re.compile(r"https?://[^\s/?#]+(/[^\s#]*)?")
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _parse(variable: str, raw: str, kind: type) -> object:
    if kind is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{variable} must be an integer, got {raw!r}") from None
    if kind is bool:
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{variable} must be true or false (1/0, yes/no, on/off), "
                          f"got {raw!r}")
    if kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{variable} must be a number, got {raw!r}") from None
        return value
    if issubclass(kind, Path):
        return Path(raw)
    return raw
