"""Which loaded version answers a request: labels, canary weights, sticky clients.

TF Serving's ``version_labels`` name versions (``stable``, ``canary``); KServe's
``canaryTrafficPercent`` splits traffic between two. Here both: a request that names a
label gets the label's version; one that names neither version nor label is split by
the weights of MODEL_CONFIG_FILE (app/model_config.py), the rest going to ``stable``
(or, with no ``stable``, to the highest loaded version, as without a config).

A client keeps its side: the split is decided by a hash of the client's key (the
``X-Client-ID`` header, else ``X-Request-ID``), not by chance, so one user does not
flip between two models from one request to the next. The weights are laid out as
ranges of [0, 100) in the file's order of labels, so raising a canary from 10 to 20
keeps every client that was on it there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from app.servable import LoadedModel

STABLE = "stable"
EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class Routes:
    """One model's labels as in force, published whole by the store's poll thread.

    Labels point at loaded version objects, never at numbers: a reader holding this
    needs no second lookup that a swap could change under it.
    """

    labels: Mapping[str, LoadedModel] = field(default_factory=lambda: EMPTY)
    weights: tuple[tuple[str, float], ...] = ()  # (label, percent), labels in force only
    shadows: tuple[tuple[str, float], ...] = ()
    pending: Mapping[str, str] = field(default_factory=lambda: EMPTY)  # label → why not

    def label_versions(self) -> dict[str, int]:
        """label → version, for the model information endpoints."""
        return {label: model.version for label, model in self.labels.items()}


def bucket(model: str, key: str) -> float:
    """Where ``key`` falls in [0, 100) for ``model``: the same key, the same place."""
    digest = hashlib.blake2b(f"{model}\0{key}".encode("utf-8", "backslashreplace"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * 100


def split(routes: Routes, model: str, key: str) -> LoadedModel | None:
    """The weighted label's version ``key`` falls on, or None for the default one."""
    if not routes.weights:
        return None
    point, edge = bucket(model, key), 0.0
    for label, percent in routes.weights:
        edge += percent
        if point < edge:
            return routes.labels[label]
    return None


def default(routes: Routes | None) -> LoadedModel | None:
    """``stable``'s version when labelled; None: the highest loaded version."""
    return None if routes is None else routes.labels.get(STABLE)


def pick_shadows(routes: Routes, serving: LoadedModel, draw: float
                 ) -> list[LoadedModel]:
    """The shadow versions a request drawn at ``draw`` (in [0, 100)) is copied to:
    each shadow label whose percent is above the draw, unless it is the serving one."""
    return [routes.labels[label] for label, percent in routes.shadows
            if draw < percent and routes.labels[label] is not serving]
