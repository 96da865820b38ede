"""Triton's statistics extension (``GET /v2/models[/<m>[/versions/<v>]]/stats``, gRPC
``ModelStatistics``): each version's counts and cumulative durations since start.

The numbers are read from the Prometheus samples of app/metrics.py, not kept apart:
under gunicorn each worker counts only its own requests, and the multiprocess files
are the one place where every worker's counts meet, so a stats answer covers the whole
server whichever worker gives it, and it can never disagree with /metrics. The mapping:

- ``success``: inference_request_duration_seconds; ``fail``:
  inference_failed_request_duration_seconds; ``queue``: inference_queue_duration_seconds;
  ``compute_input``: inference_preprocess_duration_seconds (reading and decoding);
- ``compute_infer`` and ``execution_count``: inference_model_duration_seconds, counted
  per model call (Triton counts it per request; a call here serves a whole batch);
- ``compute_output``: zero: writing the answer is not timed apart from the request;
  ``cache_hit`` zero: there is no response cache;
- ``inference_count``: images_predicted_total; ``last_inference``:
  inference_last_timestamp_seconds;
- ``batch_stats``: inference_batch_compute_seconds by batch size, the power of two the
  SavedModel runtime pads each call to.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from app.metrics import Metrics
from app.model_store import ModelStore
from app.servable import LoadedModel

DURATIONS = {  # Triton's field → the metric whose _count and _sum it is
    "success": "inference_request_duration_seconds",
    "fail": "inference_failed_request_duration_seconds",
    "queue": "inference_queue_duration_seconds",
    "compute_input": "inference_preprocess_duration_seconds",
    "compute_infer": "inference_model_duration_seconds",
}
BATCHES = "inference_batch_compute_seconds"
IMAGES, LAST = "images_predicted_total", "inference_last_timestamp_seconds"
NOT_TIMED = {"count": 0, "ns": 0}

Totals = dict[tuple[str, str], dict[str, Any]]


def served(store: ModelStore, name: str | None, version: int | None) -> list[LoadedModel]:
    """The versions a statistics request names: every loaded version of every model
    (no name), of ``name`` (no version), or that one; raises ModelNotFound (404) or
    ModelNotReady (503) as ``store.get`` does."""
    if name is None:
        return [model for versions in store.versions.values() for model in versions.values()]
    model = store.get(name, version)
    if version is not None:
        return [model]
    return list(store.versions.get(name, {model.version: model}).values())


def model_statistics(metrics: Metrics, models: list[LoadedModel]) -> dict[str, Any]:
    """``{"model_stats": [...]}`` for ``models``, in Triton's JSON shape."""
    totals = _totals(metrics, {(model.name, str(model.version)) for model in models})
    return {"model_stats": [_model_stat(model.name, str(model.version),
                                        totals[(model.name, str(model.version))])
                            for model in models]}


def _totals(metrics: Metrics, wanted: set[tuple[str, str]]) -> Totals:
    """(model, version) → sample name (with ``batch_size`` for the batches) → value,
    summed over the workers' samples."""
    totals: Totals = defaultdict(lambda: defaultdict(float))
    for sample in metrics.samples():
        key = (sample.labels.get("model"), sample.labels.get("version"))
        if key not in wanted:
            continue
        name = sample.name
        if name in (f"{BATCHES}_count", f"{BATCHES}_sum"):
            name = (name, int(sample.labels["batch_size"]))
        totals[key][name] += sample.value
    return totals


def _duration(values: dict, metric: str, size: int | None = None) -> dict[str, int]:
    count, seconds = (f"{metric}_count", f"{metric}_sum")
    if size is not None:
        count, seconds = (count, size), (seconds, size)
    return {"count": round(values[count]), "ns": round(values[seconds] * 1e9)}


def _model_stat(name: str, version: str, values: dict) -> dict[str, Any]:
    """One version's ``$model_stat``."""
    sizes = sorted({key[1] for key in values if isinstance(key, tuple)})
    return {
        "name": name,
        "version": version,
        "last_inference": round(values[LAST] * 1000),
        "inference_count": round(values[IMAGES]),
        "execution_count": round(values[f"{DURATIONS['compute_infer']}_count"]),
        "inference_stats": {**{field: _duration(values, metric)
                               for field, metric in DURATIONS.items()},
                            "compute_output": NOT_TIMED, "cache_hit": NOT_TIMED},
        "batch_stats": [{"batch_size": size, "compute_input": NOT_TIMED,
                         "compute_infer": _duration(values, BATCHES, size),
                         "compute_output": NOT_TIMED} for size in sizes],
    }
