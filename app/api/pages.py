"""The web pages: ``/`` (draw or upload a digit) and ``/model`` (the served model).

Plain HTML, CSS and JavaScript from app/templates and app/static: no build step and no
CDN, so the pages work offline. They call the same JSON API as any client.
"""

from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def index():
    return render_template("index.html")


@bp.get("/model")
def model():
    return render_template("model.html")
