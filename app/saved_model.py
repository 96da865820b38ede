"""The SavedModel runtime: TensorFlow's ``serving_default`` signature behind ``predict``.

TensorFlow is imported here, lazily: gunicorn forks its workers from the master, and
TensorFlow's thread pools do not survive a fork, so each worker loads after the fork
(app/gunicorn.conf.py keeps ``preload_app`` off) and the master never initialises it.

Every check a folder can fail here raises VersionRejected with the reason — a bad
signature, a parameter count that disagrees with metadata.json, a warm-up that fails —
so a broken or foreign SavedModel is refused at load and never reaches a request.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.memory import freeze_imports
from app.servable import VersionRejected, check_warm_up
from app.warmup import replay_warmup
from training.export_format import (
    SIGNATURE,
    TFLITE_FILE,
    read_signature_defs,
    signature_problem,
)

log = logging.getLogger(__name__)


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


class SavedModelRuntime:
    """A loaded SavedModel's serving signature, called by keyword."""

    kind = "savedmodel"
    warmup_seconds = 0.0

    def __init__(self, loaded: Any, signature_defs: dict[str, Any]):
        self._loaded = loaded  # owns the variables the signature reads
        self._signature = loaded.signatures[SIGNATURE]
        self.signature_defs = signature_defs
        serving = signature_defs[SIGNATURE]
        (self.input_name,) = serving["inputs"]
        (self.output_name,) = serving["outputs"]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 28, 28, 1) in [0, 1] → (N, 10) probabilities, one direct call.

        The batch is padded with blank images up to a power of two (TF Serving's
        ``allowed_batch_sizes``): each new batch size costs TensorFlow a slow first call,
        so warm-up pays for each size up to BATCH_MAX_SIZE; larger ones are paid by a client.
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
        """Run every padded batch size up to ``largest`` once; the answers must be
        probabilities, else the version is rejected."""
        size = 1
        while size <= padded_size(largest):
            check_warm_up(self.predict, size)
            size *= 2

    def parameter_count(self) -> int:
        """Float variables are the weights; Keras also saves integer state (the dropout
        layers' seed generators), which count_params() rightly leaves out."""
        return sum(math.prod(v.shape) for v in self._loaded.variables if v.dtype.is_floating)


def load_saved_model(folder: Path, metadata: dict[str, Any], warm_up_to: int,
                     threads: int = 1) -> SavedModelRuntime:
    """Load, check and warm one SavedModel folder that export_format.servable passed;
    raises VersionRejected. The signature is checked again as saved_model.pb has it: an
    export without a manifest may hold a graph its metadata does not describe."""
    try:
        import tensorflow as tf
    except ImportError:  # the lite image (Dockerfile): LiteRT only
        raise VersionRejected(f"it has no {TFLITE_FILE} and TensorFlow is not installed here: "
                              "this server runs LiteRT exports only") from None

    limit_threads(threads)
    freeze_imports()  # before the first version: app/memory.py

    try:
        signature_defs = read_signature_defs(folder)
        if problem := signature_problem(signature_defs):
            raise VersionRejected(problem)
        runtime = SavedModelRuntime(tf.saved_model.load(str(folder)), signature_defs)
    except VersionRejected:
        raise
    except Exception as err:  # noqa: BLE001 - TensorFlow raises many types for bad files
        raise VersionRejected.because("SavedModel does not load", err) from None
    expected = metadata["summary"]["totals"]["params"]
    if (count := runtime.parameter_count()) != expected:
        raise VersionRejected(f"SavedModel has {count} parameters, metadata says {expected}")
    started = time.perf_counter()
    try:
        runtime.warm_up(warm_up_to)  # the first request must not pay for tracing
    except VersionRejected:
        raise
    except Exception as err:  # noqa: BLE001 - any failure on blank images disqualifies it
        raise VersionRejected.because("warm-up failed", err) from None
    replayed = replay_warmup(folder, runtime.input_name, runtime.predict)
    if replayed:
        log.info("replayed %d warm-up records of %s", replayed, folder)
    runtime.warmup_seconds = time.perf_counter() - started
    return runtime
