"""Load every exported model under MODELS_DIR, TensorFlow Serving's ``<name>/<version>/``.

Which versions of a model are served is the version policy's choice (default: the
highest, see app/version_policy.py); each must be *complete*: a SavedModel and a readable
``metadata.json`` whose parameter total matches the SavedModel's variables. A version
that fails any check is skipped with a logged reason and the next lower one is tried, so
a half-copied or corrupt folder is never half-loaded.

TensorFlow is imported here, lazily, inside ``load``: gunicorn forks its workers from
the master process, and TensorFlow's thread pools and runtime state do not survive a
fork. Each worker therefore builds its own store after the fork (see app/gunicorn.conf.py,
which keeps ``preload_app`` off), and the master never initialises TensorFlow.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from app.batching import Deadline, MicroBatcher, run_direct
from app.errors import ModelNotFound, ModelNotReady
from app.version_policy import VersionPolicy

log = logging.getLogger(__name__)
METADATA_FILE = "metadata.json"
SIGNATURE = "serving_default"


class VersionRejected(Exception):
    """A version folder failed a check; the message says which."""


@dataclass
class LoadedModel:
    """One servable version: its callable signature and its metadata."""

    name: str
    version: int
    path: Path
    metadata: dict[str, Any]
    load_seconds: float
    available_versions: list[int]
    signature_defs: dict[str, Any] = field(repr=False)  # as saved, in protobuf's JSON form
    _signature: Any = field(repr=False)
    _loaded: Any = field(repr=False)  # owns the variables the signature reads
    batcher: MicroBatcher | None = field(default=None, repr=False)

    @cached_property
    def input_name(self) -> str:
        """The serving signature's one input (``image`` for our exports)."""
        (name,) = self._signature.structured_input_signature[1]
        return name

    @cached_property
    def output_name(self) -> str:
        """The serving signature's one output (``output_0`` for Keras exports)."""
        (name,) = self.signature_defs[SIGNATURE]["outputs"]
        return name

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 28, 28, 1) in [0, 1] → (N, 10) probabilities, one direct call.

        The batch is padded with blank images up to a power of two (TF Serving's
        ``allowed_batch_sizes``): each new batch size costs TensorFlow a slow first call,
        and with nine sizes all of them are paid once, at warm-up, not by a client.
        """
        import tensorflow as tf

        count = len(images)
        size = padded_size(count)
        if size != count:
            images = np.concatenate([images, np.zeros((size - count, *images.shape[1:]),
                                                      np.float32)])
        # By keyword: a positional call first fails to bind, and TensorFlow formats the
        # whole input tensor into the error it then discards (~4 ms of a 5 ms call).
        outputs = self._signature(**{self.input_name: tf.constant(images, dtype=tf.float32)})
        return next(iter(outputs.values())).numpy()[:count]

    def warm_up(self, largest: int) -> None:
        """Run every padded batch size up to ``largest`` once."""
        size = 1
        while size <= padded_size(largest):
            self.predict(np.zeros((size, 28, 28, 1), np.float32))
            size *= 2

    @contextmanager
    def slot(self) -> Iterator[Any]:
        """Read a request's images inside; ``slot.run(images)`` predicts them, batched
        with concurrent requests when batching is on (see app/batching.py)."""
        if self.batcher is None:
            yield _Direct(self.predict)
        else:
            with self.batcher.arriving() as ticket:
                yield ticket


@dataclass(frozen=True)
class _Direct:
    """Batching off: run calls the model at once, in the request's thread, with the same
    deadline and failure handling as a batch (app/batching.py)."""

    predict: Any

    def run(self, images: np.ndarray, deadline: Deadline | None = None,
            max_queue: int | None = None) -> np.ndarray:
        """``max_queue`` is accepted for the batcher's interface; nothing queues here."""
        return run_direct(self.predict, images, deadline)


def padded_size(count: int) -> int:
    """The power of two at or above ``count``."""
    return 1 << max(0, count - 1).bit_length()


def limit_threads(threads: int) -> None:
    """Cap TensorFlow's pools so that workers × threads does not oversubscribe the cores.

    Only possible before TensorFlow's runtime starts; later calls (a second app in the
    same process, as in tests) keep the first setting.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        log.debug("TensorFlow already initialised; thread pools left as they are")


def version_folders(model_dir: Path) -> list[int]:
    """Version numbers present, highest first; names that are not numbers are ignored."""
    return sorted((int(p.name) for p in model_dir.iterdir()
                   if p.is_dir() and p.name.isdigit()), reverse=True)


def read_metadata(folder: Path) -> dict[str, Any]:
    """The version's metadata.json, or VersionRejected saying what is wrong."""
    if not (folder / "saved_model.pb").is_file():
        raise VersionRejected("no saved_model.pb (incomplete export?)")
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VersionRejected(f"no {METADATA_FILE}") from None
    except (OSError, ValueError) as err:
        raise VersionRejected(f"unreadable {METADATA_FILE}: {err}") from None
    if not isinstance(metadata, dict) or "summary" not in metadata:
        raise VersionRejected(f"{METADATA_FILE} has no parameter summary")
    return metadata


def read_signature_defs(folder: Path) -> dict[str, Any]:
    """The SavedModel's SignatureDefs as TensorFlow Serving reports them: tensor names,
    DT_ dtypes and shapes straight from saved_model.pb, so the metadata endpoints of both
    protocols describe what was exported rather than what we believe was."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((folder / "saved_model.pb").read_bytes())
    return {name: json_format.MessageToDict(signature, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
            for name, signature in saved.meta_graphs[0].signature_def.items()}


def load_version(name: str, version: int, folder: Path, versions: list[int],
                 warm_up_to: int = 1) -> LoadedModel:
    """Load and check one version folder; raises VersionRejected."""
    import tensorflow as tf

    metadata = read_metadata(folder)
    started = time.perf_counter()
    try:
        loaded = tf.saved_model.load(str(folder))
        signature = loaded.signatures[SIGNATURE]
        signature_defs = read_signature_defs(folder)
    except Exception as err:  # noqa: BLE001 - TensorFlow raises many types for bad files
        raise VersionRejected(f"SavedModel does not load: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]}") from None
    serving = signature_defs.get(SIGNATURE, {})
    if len(serving.get("inputs", {})) != 1 or len(serving.get("outputs", {})) != 1:
        raise VersionRejected(f"the {SIGNATURE!r} signature must have one input (images) "
                              "and one output (probabilities)")
    # Float variables are the weights; Keras also saves integer state (the dropout
    # layers' seed generators), which count_params() rightly leaves out.
    count = sum(math.prod(v.shape) for v in loaded.variables if v.dtype.is_floating)
    expected = metadata["summary"]["totals"]["params"]
    if count != expected:
        raise VersionRejected(f"SavedModel has {count} parameters, metadata says {expected}")
    model = LoadedModel(name, version, folder, metadata, 0.0, versions, signature_defs,
                        signature, loaded)
    model.warm_up(warm_up_to)  # the first request must not pay for tracing and allocation
    model.load_seconds = time.perf_counter() - started
    return model


def load_versions(model_dir: Path, policy: VersionPolicy, warm_up_to: int = 1
                  ) -> dict[int, LoadedModel]:
    """The versions of one model the policy asks for and that pass every check."""
    versions = version_folders(model_dir)
    if policy.versions is not None:
        for missing in sorted(policy.versions - set(versions)):
            log.warning("%s has no version %d (MODEL_VERSION_POLICY %s)", model_dir.name,
                        missing, policy.text)
    loaded: dict[int, LoadedModel] = {}
    for version in policy.candidates(versions):
        if policy.satisfied(len(loaded)):
            break
        folder = model_dir / str(version)
        try:
            model = load_version(model_dir.name, version, folder, sorted(versions),
                                 warm_up_to)
        except VersionRejected as reason:
            log.warning("skipping %s: %s", folder, reason)
            continue
        log.info("loaded %s version %d in %.2f s", model_dir.name, version, model.load_seconds)
        loaded[version] = model
    return loaded


class ModelStore:
    """The models this worker serves, loaded once, looked up by name and version.

    Flask-style extension: ``init_app`` attaches it to the app; ``load`` runs in each
    worker after the fork.
    """

    def __init__(self, models_dir: Path, default_name: str, tf_threads: int = 1,
                 batch_max_size: int = 1, batch_timeout_ms: float = 0.0,
                 policy: VersionPolicy | None = None):
        self.models_dir = Path(models_dir)
        self.tf_threads = tf_threads
        self.batch_max_size = batch_max_size
        self.batch_timeout_ms = batch_timeout_ms
        self.default_name = default_name
        self.policy = policy or VersionPolicy.parse("latest")
        self.versions: dict[str, dict[int, LoadedModel]] = {}
        self.rejected: dict[str, str] = {}
        self._loaded = threading.Event()

    def init_app(self, app) -> None:
        app.extensions["model_store"] = self

    def load(self) -> None:
        """Load the versions the policy asks for of every model folder under models_dir."""
        limit_threads(self.tf_threads)
        if not self.models_dir.is_dir():
            log.warning("MODELS_DIR %s does not exist: nothing to serve", self.models_dir)
        else:
            for model_dir in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
                if model_dir.name.startswith("."):
                    continue
                # Sizes up to a full micro-batch; bigger bulk requests are rarer and pay
                # their first call once (warming up to 256 costs ~60 MB per worker).
                loaded = load_versions(model_dir, self.policy, self.batch_max_size)
                if not loaded:
                    self.rejected[model_dir.name] = "no complete version"
                    continue
                for model in loaded.values():
                    if self.batch_max_size > 1:
                        model.batcher = MicroBatcher(model.predict, self.batch_max_size,
                                                     self.batch_timeout_ms, name=model.name)
                self.versions[model_dir.name] = dict(sorted(loaded.items()))
        self._loaded.set()

    def close(self) -> None:
        """Answer queued requests and stop the batchers (at worker shutdown)."""
        for versions in self.versions.values():
            for model in versions.values():
                if model.batcher is not None:
                    model.batcher.close()

    @property
    def models(self) -> dict[str, LoadedModel]:
        """Each model's highest loaded version: what a request without a version gets."""
        return {name: versions[max(versions)] for name, versions in self.versions.items()}

    @property
    def ready(self) -> bool:
        """True once loading finished and the default model is servable."""
        return self._loaded.is_set() and self.default_name in self.versions

    def get(self, name: str | None = None, version: int | None = None) -> LoadedModel:
        """The named (or default) model at ``version`` (or its highest loaded one);
        raises ModelNotFound or ModelNotReady."""
        name = name or self.default_name
        versions = self.versions.get(name)
        if versions is not None:
            if version is None:
                return versions[max(versions)]
            if version in versions:
                return versions[version]
            raise ModelNotFound(
                f"version {version} of {name!r} is not loaded (loaded: "
                f"{', '.join(map(str, versions))}; MODEL_VERSION_POLICY {self.policy.text})")
        if not self._loaded.is_set():
            raise ModelNotReady("models are still loading")
        if name == self.default_name:
            raise ModelNotReady(f"the default model {name!r} has no servable version in "
                                f"{self.models_dir}; train one with `make train`")
        known = ", ".join(sorted(self.versions)) or "none"
        raise ModelNotFound(f"no model named {name!r} (served: {known})")
