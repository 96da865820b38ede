"""Atomic, versioned Keras exports in TensorFlow Serving's layout: ``<models>/<name>/<version>/``.

A version folder holds the SavedModel (written by Keras 3's ``model.export``, servable
without Keras), the ``.keras`` file, ``metadata.json`` and ``plots/``. The format itself —
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

from training.export_format import KERAS_FILE, PLOTS_DIR, publish, staging


def export_version(
    model: keras.Model,
    model_dir: Path,
    metadata: dict[str, Any],
    write_artifacts: Callable[[Path], None] | None = None,
) -> Path:
    """Export ``model`` as the next version under ``model_dir`` and return its folder.

    ``write_artifacts(folder)`` adds files (plots) to the staging folder. If anything
    fails, the staging folder is removed and no version appears.
    """
    with staging(model_dir) as folder:
        model.export(str(folder), format="tf_saved_model", verbose=False)
        model.save(folder / KERAS_FILE)
        if write_artifacts is not None:
            (folder / PLOTS_DIR).mkdir()
            write_artifacts(folder / PLOTS_DIR)
        return publish(folder, model_dir, metadata)
