"""The LiteRT runtime: ``model.tflite`` run by LiteRT's interpreter (TF Serving's
``--prefer_tflite_model``), without importing TensorFlow at all.

A process that loads a SavedModel holds TensorFlow's whole runtime (~570 MB resident);
one that loads the ``.tflite`` file holds ~75 MB, and one image costs a fraction of a
SavedModel call. The interpreter is not thread-safe, so calls take a lock: a worker has
one core's worth of model threads (TF_THREADS) either way, and the micro-batcher already
runs one model call at a time. Signature and tensor descriptions come from metadata.json,
written at export from the SavedModel, so every metadata endpoint answers the same as
with the SavedModel runtime.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.memory import freeze_imports
from app.servable import VersionRejected, check_warm_up
from training.export_format import SIGNATURE, TFLITE_FILE


class LiteRtRuntime:
    """One interpreter for one version's ``model.tflite``."""

    kind = "litert"
    warmup_seconds = 0.0

    def __init__(self, path: Path, signature_defs: dict[str, Any], threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
        signatures = self._interpreter.get_signature_list()
        if SIGNATURE not in signatures:
            raise VersionRejected(f"{TFLITE_FILE} has no {SIGNATURE!r} signature")
        self._runner = self._interpreter.get_signature_runner(SIGNATURE)
        (self.input_name,) = signatures[SIGNATURE]["inputs"]
        (self.output_name,) = signatures[SIGNATURE]["outputs"]
        self.signature_defs = signature_defs
        self._lock = threading.Lock()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 28, 28, 1) in [0, 1] → (N, 10) probabilities."""
        batch = np.ascontiguousarray(images, dtype=np.float32)
        with self._lock:
            outputs = self._runner(**{self.input_name: batch})
        return np.array(outputs[self.output_name], copy=True)

    def warm_up(self, largest: int) -> None:
        """One call at 1 and at ``largest`` images (each new size reallocates tensors);
        the answers must be finite probabilities, else the version is rejected."""
        for size in sorted({1, largest}):
            check_warm_up(self.predict, size)


def load_litert(folder: Path, metadata: dict[str, Any], warm_up_to: int, threads: int = 1
                ) -> LiteRtRuntime:
    """Load and warm ``folder/model.tflite`` of a version that export_format.servable
    passed (so metadata.json describes its signature); raises VersionRejected."""
    freeze_imports()  # before the first version: app/memory.py
    try:
        runtime = LiteRtRuntime(folder / TFLITE_FILE, metadata["signature_defs"], threads)
    except VersionRejected:
        raise
    except Exception as err:  # noqa: BLE001 - the interpreter raises ValueError, RuntimeError…
        raise VersionRejected.because(f"{TFLITE_FILE} does not load", err) from None
    started = time.perf_counter()
    try:
        runtime.warm_up(warm_up_to)
    except VersionRejected:
        raise
    except Exception as err:  # noqa: BLE001 - any failure on blank images disqualifies it
        raise VersionRejected.because("warm-up failed", err) from None
    runtime.warmup_seconds = time.perf_counter() - started
    return runtime
