"""Who may call: bearer tokens with scopes, read from the file AUTH_TOKENS_FILE names.

The file has one ``<token> <scope>[,<scope>...]`` a line; ``#`` starts a comment and blank
lines are skipped. A token is written as itself or as ``sha256:<64 hex digits>``, its
SHA-256, so the file need not be a secret (``printf %s "$TOKEN" | sha256sum``). Scopes:

- ``predict``: inference and read-only model information (every endpoint not listed below);
- ``admin``: the repository index, /metrics, and any operation that changes state.

A token has exactly the scopes its line lists (write ``predict,admin`` for both). Probes
(/health, /ready, /v2/health/*), the web pages with their static files, and the OpenAPI
document stay open: a page asks for the token itself (app/static/auth.js).

``check`` is the one decision, a plain function of the Authorization value and the scope
an endpoint needs, so any protocol can call it: the REST hook below does, and a gRPC
interceptor passes the ``authorization`` metadata value the same way and maps
``Unauthenticated`` to UNAUTHENTICATED and ``PermissionDenied`` to PERMISSION_DENIED.

The file is re-read when it changes (rotation without a restart, as model versions are);
a change that does not parse is refused and the tokens in force stay, never "auth off".
A file that does not parse at start stops the server, naming the line.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from app.errors import PermissionDenied, Unauthenticated
from training.export_format import read_regular

log = logging.getLogger(__name__)

PREDICT, ADMIN = "predict", "admin"
SCOPES = frozenset({PREDICT, ADMIN})
REALM = "mnist-digits"
TOKENS_LIMIT_BYTES = 1 << 20  # ~10,000 token lines; a larger file is refused, not read
MIN_TOKEN_CHARS = 16  # shorter tokens are guessable; the file refuses them
# RFC 6750's b64token: what may follow "Bearer " on the wire, hence in the file.
TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")

# Endpoints (Flask endpoint names) open to all, and those that need ``admin``; every
# other one, an unknown path included, needs ``predict``: a new endpoint is closed
# until listed here.
OPEN_ENDPOINTS = frozenset({
    "operations.health", "operations.ready", "open_inference.live", "open_inference.ready",
    "pages.index", "pages.model", "static", "operations.openapi",
})
# The statistics (app/statistics.py) are /metrics' numbers in Triton's shape: the same
# scope, or a predict token would read what /metrics keeps for admin.
ADMIN_ENDPOINTS = frozenset({"open_inference.repository_index",
                             "open_inference.statistics", "operations.prometheus_metrics"})
# The same for gRPC methods (app/api/grpc_common.py), by name: the server probes as the
# REST ones, the repository index and statistics for admin. grpc.health.v1 is its own
# service, open.
OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})
ADMIN_RPCS = frozenset({"RepositoryIndex", "ModelStatistics"})


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class TokenTable:
    """The parsed file: each token's SHA-256 and its scopes. Only digests are kept, so
    a plain and a hashed entry are compared the same way."""

    entries: tuple[tuple[bytes, frozenset[str]], ...]

    @classmethod
    def parse(cls, text: str, source: str = "AUTH_TOKENS_FILE") -> TokenTable:
        """Read the file's text; raise TokenFileError naming ``source`` and the line."""
        entries: list[tuple[bytes, frozenset[str]]] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue

            def fail(why: str, line_number: int = number) -> TokenFileError:
                return TokenFileError(f"{source}, line {line_number}: {why}")

            fields = line.split()
            if len(fields) != 2:
                raise fail("expected '<token> <scope>[,<scope>...]'")
            token, scope_list = fields
            digest = _digest_of_entry(token)
            if digest is None:
                raise fail("the token must be 'sha256:' and 64 hex digits, or at least "
                           f"{MIN_TOKEN_CHARS} characters of A-Z a-z 0-9 - . _ ~ + / "
                           "(and trailing =)")
            scopes = scope_list.split(",")
            unknown = [scope for scope in scopes if scope not in SCOPES]
            if unknown:
                raise fail(f"unknown scope {unknown[0][:40]!r} (scopes: "
                           f"{', '.join(sorted(SCOPES))})")
            if any(digest == known for known, _ in entries):
                raise fail("this token is listed twice")
            entries.append((digest, frozenset(scopes)))
        if not entries:
            raise TokenFileError(f"{source}: no tokens (every request would be refused; "
                                 "unset AUTH_TOKENS_FILE to turn authentication off)")
        return cls(tuple(entries))

    @classmethod
    def read(cls, path: Path) -> TokenTable:
        """Read and parse the file at ``path``."""
        try:
            # Not path.read_text(): a FIFO there would block the open, with the reload
            # lock held, and wedge every authenticated call; a huge file would be read
            # whole. read_regular opens non-blocking and refuses both (any folder: a
            # Secret's or a symlinked file is fine, the operator chose the path).
            text = read_regular(path, TOKENS_LIMIT_BYTES, inside=Path("/")).decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TokenFileError(f"AUTH_TOKENS_FILE {path}: cannot be read ({err})") from None
        return cls.parse(text, f"AUTH_TOKENS_FILE {path}")

    def scopes_of(self, token: str) -> frozenset[str] | None:
        """The token's scopes, or None when it is not listed. Every entry is compared,
        each in constant time, so the answer's timing does not tell which one matched."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: frozenset[str] | None = None
        for known, scopes in self.entries:
            if hmac.compare_digest(digest, known):
                found = scopes
        return found


def _digest_of_entry(token: str) -> bytes | None:
    hashed = HASHED.fullmatch(token)
    if hashed:
        return bytes.fromhex(hashed.group(1))
    if TOKEN.fullmatch(token) and len(token) >= MIN_TOKEN_CHARS:
        return hashlib.sha256(token.encode()).digest()
    return None


def only_one(authorization: list[str]) -> str | None:
    """The request's one Authorization value (REST header or gRPC metadata), None without
    one. Several are refused whatever they hold: which one a proxy or a library picks
    differs, so no answer may depend on their order."""
    if len(authorization) > 1:
        raise Unauthenticated("send one Authorization header, not several", REALM,
                              "invalid_request")
    return authorization[0] if authorization else None


def check(table: TokenTable, authorization: str | None, scope: str) -> frozenset[str]:
    """The caller's scopes when ``authorization`` ("Bearer <token>") grants ``scope``.

    Raises Unauthenticated (401) when there is no usable bearer token or it is not
    listed, PermissionDenied (403) when it lacks ``scope``.
    """
    if not authorization:
        raise Unauthenticated("this endpoint needs a token: send 'Authorization: Bearer "
                              "<token>'", REALM)
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'", REALM,
                              "invalid_request")
    scopes = table.scopes_of(token)
    if scopes is None:
        raise Unauthenticated("the token is not valid", REALM, "invalid_token")
    if scope not in scopes:
        raise PermissionDenied(f"the token lacks the {scope!r} scope this endpoint needs",
                               REALM, scope)
    return scopes


def required_scope(endpoint: str | None) -> str | None:
    """The scope an endpoint needs, None for an open one."""
    if endpoint in OPEN_ENDPOINTS:
        return None
    return ADMIN if endpoint in ADMIN_ENDPOINTS else PREDICT


def rpc_scope(method: str) -> str | None:
    """The scope a gRPC method (its bare name) needs, None for an open one."""
    if method in OPEN_RPCS:
        return None
    return ADMIN if method in ADMIN_RPCS else PREDICT


_NOTHING = object()


class TokenFile:
    """The tokens in force, re-read when the file changes (its inode, size or mtime).

    A stat per request costs about a microsecond; a reload that fails keeps the tokens
    in force and logs the reason once per version of the file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._stamp = self._stat()
        self.table = TokenTable.read(path)  # raises: a bad file at start stops the server
        self._lock = threading.Lock()
        self._refused: object = _NOTHING  # the stamp of a version refused already

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def current(self) -> TokenTable:
        """The table for this request, re-read first if the file has changed."""
        stamp = self._stat()
        if stamp == self._stamp or stamp == self._refused:
            return self.table
        with self._lock:
            if stamp != self._stamp and stamp != self._refused:
                try:
                    self.table = TokenTable.read(self.path)
                    self._stamp, self._refused = stamp, _NOTHING
                    log.info("AUTH_TOKENS_FILE re-read: %d tokens", len(self.table.entries))
                except TokenFileError as err:
                    self._refused = stamp
                    log.error("%s; the tokens read before stay in force", err)
        return self.table


def is_loopback(host: str) -> bool:
    """Whether a bind host is reachable only from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def init_app(app, path: str) -> None:
    """Require tokens on the app's requests when ``path`` (AUTH_TOKENS_FILE) is set."""
    from flask import request

    if not path:
        return
    tokens = TokenFile(Path(path))
    app.extensions["auth"] = tokens

    @app.before_request
    def require_token() -> None:
        # A CORS preflight never carries credentials; Flask answers it without a view.
        if request.method == "OPTIONS":
            return
        scope = required_scope(request.endpoint)
        if scope is not None:
            check(tokens.current(), only_one(request.headers.getlist("Authorization")),
                  scope)
