"""GET /models, /models/<name>, /summary and /models/<name>/summary.

A model's description lists the version folders present, those loaded, and those
rejected with the reason (a failed check, or a name that is no version number).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flask import Blueprint, Response, jsonify, request, url_for

from app.api.common import int_arg, metrics, store
from app.errors import InvalidInput, ModelNotFound
from app.servable import LoadedModel
from app.shadow import comparisons
from training.export_format import PLOT_LIMIT_BYTES, PLOTS_DIR, open_regular, read_regular
from training.summary import memory_estimate

PLOTS = {"history": "Accuracy and loss per epoch, training against validation",
         "confusion": "Confusion matrix on the 10,000 test images",
         "samples": "Test digits: predicted (true), green when right"}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
bp = Blueprint("models", __name__)


def describe(model: LoadedModel) -> dict:
    metadata = model.metadata
    routes = store().routes.get(model.name)
    return {
        "name": model.name,
        "version": model.version,
        "versions": store().present_versions(model.name),
        "loaded_versions": list(store().versions.get(model.name, {})),
        "rejected": store().rejected_versions(model.name),
        "arch": metadata.get("arch"),
        "created": metadata.get("created"),
        "test_accuracy": metadata.get("test", {}).get("accuracy"),
        "load_seconds": round(model.load_seconds, 3),
        "runtime": model.runtime.kind,
        "input": metadata.get("input"),
        "labels": routes.label_versions() if routes else {},
        "pending_labels": dict(routes.pending) if routes else {},
        "traffic": dict(routes.weights) if routes else {},
        "shadow": comparisons(metrics(), routes, model.name),
        "plots": [{"title": title, "url": url_for("models.plot", name=model.name, plot=plot)}
                  for plot, title in PLOTS.items() if _has_plot(model, plot)],
    }


def _has_plot(model: LoadedModel, plot: str) -> bool:
    if _listed(model, plot) is None:
        return False
    try:
        with open_regular(_plot_path(model, plot), PLOT_LIMIT_BYTES, inside=model.path):
            return True
    except OSError:
        return False


def _plot_path(model: LoadedModel, plot: str) -> Path:
    return model.path / PLOTS_DIR / f"{plot}.png"


def _listed(model: LoadedModel, plot: str) -> dict | None:
    """The plot's entry in the version's manifest (size and SHA-256), if it has one."""
    return model.metadata.get("files", {}).get(f"{PLOTS_DIR}/{plot}.png")


def _plot_bytes(model: LoadedModel, plot: str) -> bytes | None:
    """The PNG of ``plot`` when it is a regular file, within its size limit, that
    resolves inside the version folder and whose bytes are those its manifest lists;
    None otherwise (a link to /etc/passwd, a FIFO, a 1 GB file, a hard link to
    /etc/shadow put in its place, which nobody but its reader can hash): a plot is
    part of the export, never a way to read other files."""
    expected = _listed(model, plot)
    if expected is None:
        return None
    try:
        data = read_regular(_plot_path(model, plot), PLOT_LIMIT_BYTES, inside=model.path)
    except OSError:
        return None
    if not data.startswith(PNG_SIGNATURE) or \
            hashlib.sha256(data).hexdigest() != expected["sha256"]:
        return None
    return data


@bp.get("/models")
def list_models():
    models = store()
    return jsonify({
        "default": models.default_name,
        "models": [describe(m) for _, m in sorted(models.models.items())],
        "rejected": models.rejected,
    })


@bp.get("/models/<name>")
def show_model(name: str):
    return jsonify(describe(store().get(name)))


@bp.get("/summary")
@bp.get("/models/<name>/summary")
def summary(name: str | None = None):
    """The parameter table and memory estimates, scaled for ``?batch_size=N``."""
    model = store().get(name)
    batch_size = int_arg(request.args, "batch_size", default=1)
    figures = model.metadata["summary"]
    test = model.metadata.get("test", {})
    return jsonify({
        "model": {"name": model.name, "version": model.version},
        "arch": model.metadata.get("arch"),
        "layers": figures["layers"],
        "totals": figures["totals"],
        "memory": memory_estimate(figures["totals"], batch_size),
        "test_accuracy": test.get("accuracy"),
        "per_class_accuracy": test.get("per_class"),
        # What the table alone does not say, e.g. the article's Sequential quirk.
        "notes": figures.get("notes", []),
    })


@bp.get("/models/<name>/plots/<plot>.png")
def plot(name: str, plot: str):
    """A training plot exported with the served version."""
    model = store().get(name)
    if plot not in PLOTS:
        raise InvalidInput(f"no plot named {plot!r}; there are: {', '.join(PLOTS)}")
    data = _plot_bytes(model, plot)
    if data is None:
        raise ModelNotFound(f"version {model.version} of {model.name!r} has no {plot} plot")
    response = Response(data, mimetype="image/png")
    response.cache_control.max_age = 300
    return response
