"""CORS, opt-in: pages on the origins CORS_ALLOWED_ORIGINS lists may call the API.

flask-cors answers the preflight and adds the headers; nothing is sent when the setting is
empty, so browsers keep the same-origin rule. No credentials mode (cookies): the API's
only credential is the bearer token a page sends itself, so ``*`` is safe to allow.
"""

from __future__ import annotations

from flask import Flask
from flask_cors import CORS

# What a page may send and read: the token, the body's type, the request id; and the
# answers' id, back-off and challenge headers.
ALLOWED_HEADERS = ["Authorization", "Content-Type", "X-Request-ID"]
EXPOSED_HEADERS = ["X-Request-ID", "Retry-After", "WWW-Authenticate"]
PREFLIGHT_MAX_AGE = 600  # seconds a browser may reuse a preflight's answer


def init_app(app: Flask, origins: tuple[str, ...]) -> None:
    """Allow ``origins`` (exact, or ``*``); do nothing when there are none."""
    if not origins:
        return
    CORS(app, origins=list(origins), supports_credentials=False,
         allow_headers=ALLOWED_HEADERS, expose_headers=EXPOSED_HEADERS,
         methods=["GET", "POST", "OPTIONS"], max_age=PREFLIGHT_MAX_AGE)
