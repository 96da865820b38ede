"""The web pages: ``/`` (draw or upload a digit) and ``/model`` (the served model).

Plain HTML, CSS and JavaScript from app/templates and app/static: no build step and no
CDN, so the pages work offline. They call the same JSON API as any client.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template

bp = Blueprint("pages", __name__)

# The pages run only this origin's scripts and styles (none inline), show its images and
# the data: PNG of what the model saw, call only its API, and cannot be framed. Every
# answer carries them: an API answer opened in a browser is then as inert as the pages.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@bp.get("/")
def index():
    return render_template("index.html")


@bp.get("/model")
def model():
    return render_template("model.html")


@bp.after_app_request
def security_headers(response: Response) -> Response:
    """The headers above on every answer of the app, pages, API and errors alike."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
