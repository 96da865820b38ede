"""The store (TF Serving's *Manager*): which versions of which models this worker serves.

Every ``poll_seconds`` (MODEL_POLL_SECONDS) a background thread rescans MODELS_DIR
(app/repository.py) and reconciles what it finds with what is served, model by model,
under the version policy (app/version_policy.py):

- a new version is loaded and warmed in that thread (app/saved_model.py, or
  app/litert_runtime.py with PREFER_TFLITE_MODEL) while the old
  one keeps answering, and only then swapped in, atomically (one reference replaced);
- a version no longer wanted (a newer one won, or its folder was removed) is *retired*:
  requests already holding it finish on it, and it is released after the last one
  (app/servable.py);
- a folder that fails a check is logged once with its reason, listed with it, and tried
  again only when its contents change (or, when it could not be checked within
  MODEL_CHECK_SECONDS, at the next poll); the next lower version is served meanwhile;
- candidates are tried newest first, each checked by its files before it is loaded
  (export_format.servable), and a pass that finds a newer version published while it
  loads stops loading older ones: the next poll starts from the newest, so versions
  that fail only once loaded, however many, cost a good new one a single load.

With MODEL_CONFIG_FILE (app/model_config.py) the models are those the file lists, each
with its own version policy and labels, and the file is read again at each poll: a
label moved (``stable`` back to the last version: a rollback) takes effect at the next
poll, and a bad file is logged with its line while the last good one stays in force.
Which version answers a request — a version, a label, a canary split — is ``resolve``'s
one decision (app/rollout.py), whatever the protocol.

Nothing in one folder can stop the others from loading: every failure of a version
becomes a rejection with a reason, and the poll thread survives anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from app.errors import ModelNotFound, ModelNotReady
from app.litert_runtime import load_litert
from app.memory import reclaim
from app.model_config import ConfigWatcher, ModelConfig
from app.repository import Fingerprint, ModelFolder, Scanner, Snapshot, VersionFolder
from app.rollout import Routes, default, split
from app.saved_model import load_saved_model
from app.servable import LoadedModel, VersionRejected
from app.version_policy import VersionPolicy
from training.export_format import (
    DEFAULT_BOUNDS,
    TFLITE_FILE,
    Bounds,
    list_versions,
    read_metadata,
    servable,
)

log = logging.getLogger(__name__)

READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"


@dataclass(frozen=True)
class VersionState:
    """One row of the repository index: a version folder and what became of it."""

    name: str
    version: str  # the folder's name: not every folder is a number
    state: str
    reason: str = ""


def load_version(name: str, found: VersionFolder, warm_up_to: int,
                 prefer_tflite: bool = False, threads: int = 1,
                 bounds: Bounds = DEFAULT_BOUNDS) -> LoadedModel:
    """Check (within ``bounds``) and load one version folder, on LiteRT when preferred
    and the version has a model.tflite, else on TensorFlow; raises VersionRejected."""
    if found.error:
        raise VersionRejected(found.error)
    check = servable(found.path, bounds=bounds)
    if not check:
        raise VersionRejected(check.reason, retry=check.retry)
    started = time.perf_counter()
    try:
        metadata = read_metadata(found.path)
    except ValueError as err:  # changed since servable() read it
        raise VersionRejected(str(err)) from None
    if prefer_tflite and (found.path / TFLITE_FILE).is_file():
        runtime = load_litert(found.path, metadata, warm_up_to, threads)
    else:
        runtime = load_saved_model(found.path, metadata, warm_up_to, threads)
    return LoadedModel(name, found.version, found.path, metadata, runtime,
                       found.fingerprint, time.perf_counter() - started)


def _newer_published(folder: ModelFolder) -> bool:
    """True when ``folder`` now holds a version above every one its scan found."""
    return max(list_versions(folder.path), default=-1) > max(folder.versions, default=-1)


class ModelStore:
    """The models this worker serves, looked up by name and version, kept in step with
    MODELS_DIR. Flask-style extension: ``init_app`` attaches it; ``load`` runs in each
    worker after the fork."""

    def __init__(self, models_dir: Path, default_name: str, tf_threads: int = 1,
                 batch_max_size: int = 1, batch_timeout_ms: float = 0.0,
                 policy: VersionPolicy | None = None, poll_seconds: float = 0.0,
                 metrics: Any = None, prefer_tflite: bool = False,
                 bounds: Bounds = DEFAULT_BOUNDS, config_file: Path | None = None):
        self.models_dir = Path(models_dir)
        # MODELS_DIR as error messages may spell it, longest first (see _relative).
        self._roots = sorted({str(p).rstrip("/") + "/" for p in (
            self.models_dir, self.models_dir.absolute(), self.models_dir.resolve())},
            key=len, reverse=True)
        self.default_name = default_name
        self.tf_threads = tf_threads
        self.batch_max_size = batch_max_size
        self.batch_timeout_ms = batch_timeout_ms
        self.policy = policy or VersionPolicy.parse("latest")
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self.prefer_tflite = prefer_tflite
        self.bounds = bounds  # MODEL_MAX_BYTES, MODEL_CHECK_SECONDS
        # Each mapping below is written by the poll thread and read by request threads:
        # it is replaced whole, never mutated, so a reader that took it iterates one
        # consistent state (a mutation under a reader's loop is a 500).
        self.versions: dict[str, dict[int, LoadedModel]] = {}
        self.routes: dict[str, Routes] = {}  # labels in force, by model
        self._config = None if config_file is None else ConfigWatcher(config_file,
                                                                      self.models_dir)
        self._config_error: str | None = None
        self._config_seen: ModelConfig | None = None
        self._policies: dict[str, VersionPolicy] = {}  # by model, from MODEL_CONFIG_FILE
        self._scanner = Scanner(self.models_dir)
        self._snapshot = Snapshot({}, {})
        self._rejections: dict[tuple[str, str], tuple[Fingerprint | None, str]] = {}
        self._odd: dict[tuple[str, str], str] = {}  # (model, folder) → why it is no version
        self._missing: dict[str, frozenset[int]] = {}  # versions the policy names, absent
        self._loading: frozenset[tuple[str, int]] = frozenset()
        self._scan_error: str | None = None
        self._refreshing = threading.Lock()
        self._loaded = threading.Event()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        # Told the name of each model a version of which retired (DriftMonitor.forget).
        self.on_retire: list[Callable[[str], None]] = []

    def init_app(self, app) -> None:
        app.extensions["model_store"] = self

    def load(self) -> None:
        """Load what MODELS_DIR holds now, then keep watching it if polling is on."""
        self.refresh()
        self._loaded.set()
        if self.poll_seconds > 0 and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="model-poll", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # the watch must outlive any one bad pass
                log.exception("rescanning %s failed; trying again in %.1f s",
                              self.models_dir, self.poll_seconds)

    def refresh(self) -> None:
        """One pass: scan MODELS_DIR, load what is new, swap, retire what is gone; then
        free what the versions retired idle held (app/memory.py)."""
        with self._refreshing:
            served = self.versions
            config = self._read_config()
            if config is None:
                snapshot = self._scanner.scan()
            else:
                self._policies = {n: e.policy for n, e in config.models.items()}
                snapshot = self._scanner.scan_folders(
                    {name: entry.base_path for name, entry in config.models.items()})
            if snapshot.error:
                if snapshot.error != self._scan_error:
                    log.warning("%s; serving what is loaded", snapshot.error)
                self._scan_error = snapshot.error
                return
            self._scan_error = None
            self._note_odd(snapshot)
            self._snapshot = snapshot
            for folder in snapshot.models.values():
                self._swap(folder.name, self._reconcile(folder))
            for name in set(self.versions) - set(snapshot.models):
                log.info("model folder %s is gone: unloading it", self.models_dir / name)
                self._swap(name, {})
            self._route(config)
            self._count_rejections()
            swapped = self.versions is not served
            del served  # the retired versions must be unreachable when reclaim() runs
        if swapped:
            reclaim()

    def _read_config(self) -> ModelConfig | None:
        """MODEL_CONFIG_FILE as last read well (None without one); a refused file is
        logged once with its reason. Raises ModelConfigError when none was ever good."""
        if self._config is None:
            return None
        try:
            config = self._config.read()
            if config is not self._config_seen:
                log.info("MODEL_CONFIG_FILE %s in force: %s", self._config.path, "; ".join(
                    f"{e.name} ({e.policy.text}; labels "
                    f"{', '.join(f'{k}={v}' for k, v in e.labels.items()) or 'none'})"
                    for e in config.models.values()) or "no model")
                self._config_seen = config
            return config
        finally:
            if self._config.error != self._config_error and self._config.error:
                log.warning("%s; %s", self._config.error,
                            "the last good one stays in force" if self._config.config
                            else "no model config in force")
            self._config_error = self._config.error

    def _policy(self, name: str) -> VersionPolicy:
        """``name``'s version policy: its config's, else MODEL_VERSION_POLICY."""
        return self._policies.get(name, self.policy)

    def _route(self, config: ModelConfig | None) -> None:
        """Point each label at its loaded version and publish the routes whole.

        A label may only point at a loaded version (TF Serving's rule): one whose
        version is not loaded keeps its last version while that stays loaded, and says
        why either way (``Routes.pending``)."""
        routes: dict[str, Routes] = {}
        for name, entry in (config.models if config else {}).items():
            loaded, before = self.versions.get(name, {}), self.routes.get(name, Routes())
            labels, pending = {}, {}
            for label, version in entry.labels.items():
                if version in loaded:
                    labels[label] = loaded[version]
                    continue
                pending[label] = f"version {version} is not loaded"
                kept = before.labels.get(label)
                if kept is not None and loaded.get(kept.version) is kept:
                    labels[label] = kept
                    pending[label] += f"; still version {kept.version}"
            routes[name] = Routes(
                MappingProxyType(labels),
                tuple((label, p) for label, p in entry.weights.items() if label in labels),
                tuple((label, p) for label, p in entry.shadows.items() if label in labels),
                MappingProxyType(pending))
            if routes[name].label_versions() != before.label_versions():
                log.info("%s labels now %s", name, ", ".join(
                    f"{label}={v}" for label, v in routes[name].label_versions().items())
                    or "none")
            for label, why in pending.items():
                if before.pending.get(label) != why:
                    log.warning("%s label %s: %s", name, label, why)
        if routes != self.routes:
            self.routes = routes

    def _reconcile(self, folder: ModelFolder) -> dict[int, LoadedModel]:
        """The versions to serve: the policy's candidates that are loaded or load now.

        Once a newer version than this scan saw has appeared, nothing more is loaded in
        this pass: what is loaded stays, and the next poll begins with the newcomer."""
        current = self.versions.get(folder.name, {})
        self._note_missing(folder)
        chosen: dict[int, LoadedModel] = {}
        loads, deferred = 0, False
        policy = self._policy(folder.name)
        for version in policy.candidates(list(folder.versions)):
            if policy.satisfied(len(chosen)):
                break
            found = folder.versions[version]
            model = current.get(version)
            if model is not None and model.fingerprint == found.fingerprint:
                chosen[version] = model
                continue
            if self._rejected_as_is(folder.name, found):
                continue
            deferred = deferred or (loads > 0 and _newer_published(folder))
            if not deferred:
                loads += 1
                if (model := self._try_load(folder.name, found)) is not None:
                    chosen[version] = model
        return chosen

    def _note_missing(self, folder: ModelFolder) -> None:
        """Log once each version the policy lists that the folder does not have."""
        policy = self._policy(folder.name)
        missing = (policy.versions or frozenset()) - set(folder.versions)
        if missing and self._missing.get(folder.name) != missing:
            log.warning("%s has no version %s (version policy %s)", folder.name,
                        ", ".join(map(str, sorted(missing))), policy.text)
        self._missing = {**self._missing, folder.name: missing}

    def _rejected_as_is(self, name: str, found: VersionFolder) -> bool:
        """True when ``found`` was rejected and has not changed since."""
        rejection = self._rejections.get((name, str(found.version)))
        return rejection is not None and rejection[0] == found.fingerprint

    def _try_load(self, name: str, found: VersionFolder) -> LoadedModel | None:
        """Load ``found``; None if it fails a check (its rejection is remembered)."""
        key = (name, str(found.version))
        self._loading = self._loading | {(name, found.version)}
        try:
            model = load_version(name, found, self.batch_max_size, self.prefer_tflite,
                                 self.tf_threads, self.bounds)
        except VersionRejected as rejected:
            self._reject(key, found, str(rejected), rejected.detail, rejected.retry)
            return None
        except Exception as err:  # a folder must never stop the worker
            log.exception("loading %s failed", found.path)
            self._reject(key, found, f"load failed ({type(err).__name__})")
            return None
        finally:
            self._loading = self._loading - {(name, found.version)}
        if key in self._rejections:
            self._rejections = {k: v for k, v in self._rejections.items() if k != key}
        if self.batch_max_size > 1:
            model.start_batching(self.batch_max_size, self.batch_timeout_ms, None
                                 if self.metrics is None else self.metrics.queued.labels(name))
        log.info("loaded %s version %d in %.2f s", name, found.version, model.load_seconds)
        if self.metrics is not None:
            self.metrics.load_seconds.labels(name, str(found.version)).set(model.load_seconds)
            self.metrics.warmup_seconds.labels(name, str(found.version)).set(
                model.runtime.warmup_seconds)
            model.meters = self.metrics.version(name, found.version)
        return model

    def _reject(self, key: tuple[str, str], found: VersionFolder, reason: str,
                detail: str | None = None, retry: bool = False) -> None:
        """Remember why ``found`` is not served; the reason is listed to clients, so
        it names files relative to MODELS_DIR, and the detail goes to the log only.
        One to ``retry`` is remembered with no fingerprint: it is tried at the next poll."""
        log.warning("not serving %s: %s%s", found.path, reason,
                    f" [{detail}]" if detail else "")
        reason = self._relative(reason)[:300]
        fingerprint = None if retry else found.fingerprint
        self._rejections = {**self._rejections, key: (fingerprint, reason)}

    def _relative(self, text: str) -> str:
        """``text`` with MODELS_DIR's own path taken out of every path it names."""
        for root in self._roots:
            text = text.replace(root, "")
        return text

    def _swap(self, name: str, chosen: dict[int, LoadedModel]) -> None:
        """Make ``chosen`` what ``name`` serves, in one step, and retire the rest."""
        old = self.versions.get(name, {})
        if self.metrics is not None:
            self.metrics.ready.labels(name).set(1 if chosen else 0)
        if chosen == old:
            return
        versions = {k: v for k, v in self.versions.items() if k != name}
        if chosen:
            versions[name] = dict(sorted(chosen.items()))
        self.versions = dict(sorted(versions.items()))
        if set(chosen) != set(old):
            log.info("%s now serves version(s) %s", name,
                     ", ".join(map(str, sorted(chosen))) or "none")
        retired = [model for version, model in old.items() if chosen.get(version) is not model]
        for model in retired:
            model.retire()
        for listener in self.on_retire if retired else ():
            listener(name)

    def _note_odd(self, snapshot: Snapshot) -> None:
        """Log each folder that is no model or version once; forget versions gone."""
        odd = {(name, ""): reason for name, reason in snapshot.odd.items()}
        for folder in snapshot.models.values():
            odd.update({(folder.name, entry): reason for entry, reason in folder.odd.items()})
        for key, reason in odd.items():
            if self._odd.get(key) != reason:
                log.warning("ignoring %s: %s", self.models_dir.joinpath(*key), reason)
        self._odd = odd
        present = {(name, str(v)) for name, folder in snapshot.models.items()
                   for v in folder.versions}
        self._rejections = {k: v for k, v in self._rejections.items() if k in present}

    def _count_rejections(self) -> None:
        if self.metrics is None:
            return
        for name in self._snapshot.models:
            self.metrics.rejected.labels(name).set(len(self.rejected_versions(name)))

    def close(self) -> None:
        """Stop watching, answer queued requests and stop the batchers (worker exit)."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=30)
        for versions in self.versions.values():
            for model in versions.values():
                model.retire()

    @property
    def models(self) -> dict[str, LoadedModel]:
        """Each model's default version (``stable``, else the highest loaded)."""
        routes = self.routes
        return {name: default(routes.get(name)) or versions[max(versions)]
                for name, versions in self.versions.items()}

    @property
    def ready(self) -> bool:
        """True once the first load finished and the default model is servable."""
        return self._loaded.is_set() and self.default_name in self.versions

    @property
    def rejected(self) -> dict[str, str]:
        """Models present on disk with no servable version, and why."""
        out = {}
        for name in sorted(set(self._snapshot.models) - set(self.versions)):
            reasons = self.rejected_versions(name)
            out[name] = "; ".join(f"{v}: {r}" for v, r in reasons.items()) or \
                "no version folder"
        out.update({name: reason for name, reason in self._snapshot.odd.items()})
        return out

    def rejected_versions(self, name: str) -> dict[str, str]:
        """Folder name → why it is not served, for each folder of ``name`` that failed a
        check or is no version."""
        rejections, odd = self._rejections, self._odd  # each taken once: see __init__
        reasons = {entry: reason for (model, entry), (_, reason) in rejections.items()
                   if model == name}
        reasons.update({entry: reason for (model, entry), reason in odd.items()
                        if model == name and entry})
        return dict(sorted(reasons.items(), key=lambda item: (len(item[0]), item[0])))

    def present_versions(self, name: str) -> list[int]:
        """The version folders of ``name`` on disk at the last scan, ascending."""
        folder = self._snapshot.models.get(name)
        return sorted(folder.versions) if folder else []

    def index(self) -> list[VersionState]:
        """Every model and version folder with its state: the repository index."""
        served, loading, rows = self.versions, self._loading, []
        for name, folder in sorted(self._snapshot.models.items()):
            rejected = self.rejected_versions(name)
            for version in sorted(folder.versions):
                if version in served.get(name, {}):
                    rows.append(VersionState(name, str(version), READY))
                elif (name, version) in loading:
                    rows.append(VersionState(name, str(version), LOADING))
                else:
                    reason = rejected.get(str(version)) or \
                        f"not selected by MODEL_VERSION_POLICY {self._policy(name).text}"
                    rows.append(VersionState(name, str(version), UNAVAILABLE, reason))
            rows += [VersionState(name, entry or ".", UNAVAILABLE, reason)
                     for entry, reason in sorted(folder.odd.items())]
        # Top-level entries that are no model: listed as in /models, without a version.
        rows += [VersionState(name, "", UNAVAILABLE, reason)
                 for name, reason in sorted(self._snapshot.odd.items())]
        return rows

    def get(self, name: str | None = None, version: int | None = None) -> LoadedModel:
        """The named (or default) model at ``version`` (or its highest loaded one);
        raises ModelNotFound or ModelNotReady."""
        name = name or self.default_name
        versions = self.versions.get(name)
        if versions is not None:
            if version is None:
                return default(self.routes.get(name)) or versions[max(versions)]
            if version in versions:
                return versions[version]
            raise ModelNotFound(
                f"version {version} of {name!r} is not loaded (loaded: "
                f"{', '.join(map(str, versions))}; version policy {self._policy(name).text})")
        if not self._loaded.is_set():
            raise ModelNotReady("models are still loading")
        reasons = f" ({self.rejected[name]})" if name in self._snapshot.models else ""
        if name == self.default_name:
            raise ModelNotReady(f"the default model {name!r} has no servable version in "
                                f"MODELS_DIR{reasons}; train one with `make train`")
        if reasons:
            raise ModelNotReady(f"{name!r} has no servable version{reasons}")
        known = ", ".join(sorted(self.versions)) or "none"
        raise ModelNotFound(f"no model named {name!r} (served: {known})")

    def labelled(self, name: str | None, label: str) -> LoadedModel:
        """The version ``label`` points at; raises ModelNotFound (or the model's own
        error when the model itself is not served)."""
        name = name or self.default_name
        routes = self.routes.get(name)
        model = routes.labels.get(label) if routes else None
        if model is not None:
            return model
        self.get(name)  # an unknown or unready model answers as such
        why = routes.pending.get(label) if routes else None
        known = ", ".join(f"{k}={v}" for k, v in
                          (routes.label_versions() if routes else {}).items()) or "none"
        shown = label[:40] + ("…" if len(label) > 40 else "")
        raise ModelNotFound(f"{name!r} has no version label {shown!r} in force"
                            f"{f' ({why})' if why else ''} (labels: {known})")

    def resolve(self, name: str | None = None, version: int | None = None,
                label: str | None = None, client: str | None = None) -> LoadedModel:
        """The version that answers a request, for every protocol (REST, gRPC): the one
        it names by ``version`` or ``label``, else the canary split of MODEL_CONFIG_FILE
        decided by the ``client`` key (app/rollout.py), else the default version."""
        if label is not None:
            return self.labelled(name, label)
        if version is not None or client is None:
            return self.get(name, version)
        name = name or self.default_name
        routes = self.routes.get(name)
        chosen = split(routes, name, client) if routes is not None else None
        return chosen if chosen is not None else self.get(name)
