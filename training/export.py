"""Atomic, versioned Keras exports in TensorFlow Serving's layout: ``<models>/<name>/<version>/``.

A version folder holds the SavedModel (written by Keras 3's ``model.export``, servable
without Keras), the same network as ``model.tflite`` for LiteRT, the ``.keras`` file,
``metadata.json`` (with the validation set's drift reference, training/reference.py),
``plots/`` and TF Serving's warm-up records
(``assets.extra/tf_serving_warmup_requests``, training/warmup.py). The format itself —
folder names, the metadata schema and manifest, staging and what "complete" means — is
training/export_format.py's; this module only fills a staging folder with a Keras model.
A crash leaves at most a ``.tmp-*`` folder (never a number), which the next export
reclaims, and an existing version is never overwritten.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training.export_format import (
    DRIFT_REFERENCE,
    KERAS_FILE,
    PLOTS_DIR,
    SIGNATURE,
    TFLITE_FILE,
    publish,
    read_signature_defs,
    staging,
)
from training.reference import drift_reference
from training.warmup import write_warmup_requests


def export_version(
    model: keras.Model,
    model_dir: Path,
    metadata: dict[str, Any],
    write_artifacts: Callable[[Path], None] | None = None,
    write_extra: Callable[[Path], None] | None = None,
    warmup_images: np.ndarray | None = None,
    reference_images: np.ndarray | None = None,
) -> Path:
    """Export ``model`` as the next version under ``model_dir`` and return its folder.

    ``write_artifacts(folder)`` adds files (plots) to the staging folder's ``plots/``;
    ``write_extra(folder)`` adds files to the version folder itself (the PyTorch
    ``model.pt``), so they are published atomically with the rest; ``warmup_images``
    (real digits, (N, 28, 28, 1) float32) become the warm-up records;
    ``reference_images`` (the validation images, in the same form) the drift reference
    (training/reference.py), with the digits this model predicts for them. If anything
    fails, the staging folder is removed and no version appears.
    """
    if reference_images is not None:
        metadata = with_reference(metadata, model, reference_images)
    with staging(model_dir) as folder:
        model.export(str(folder), format="tf_saved_model", verbose=False)
        model.save(folder / KERAS_FILE)
        write_tflite(folder)
        if warmup_images is not None:
            (input_name,) = read_signature_defs(folder)[SIGNATURE]["inputs"]
            write_warmup_requests(folder, model_dir.name, input_name, warmup_images)
        if write_artifacts is not None:
            (folder / PLOTS_DIR).mkdir()
            write_artifacts(folder / PLOTS_DIR)
        if write_extra is not None:
            write_extra(folder)
        return publish(folder, model_dir, {
            **metadata, "signature_defs": read_signature_defs(folder),
            "tflite": {"file": TFLITE_FILE, "converter": f"tensorflow {tf.__version__}",
                       "quantization": "none (float32)"}})


def with_reference(metadata: dict[str, Any], model: keras.Model, images: np.ndarray
                   ) -> dict[str, Any]:
    """``metadata`` with the drift reference of ``images``, if there are enough."""
    digits = model.predict(images, batch_size=512, verbose=0).argmax(axis=1)
    reference = drift_reference(images, digits)
    return metadata if reference is None else {**metadata, DRIFT_REFERENCE: reference}


def write_tflite(folder: Path) -> None:
    """Convert the SavedModel just written to LiteRT's flatbuffer, float32 as trained:
    the same signature (``serving_default``, input ``image``), no quantisation, so both
    runtimes answer alike (within 1e-5, tested)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(folder))
    (folder / TFLITE_FILE).write_bytes(converter.convert())
