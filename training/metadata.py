"""A version's ``metadata.json``: what it is and how it was made, for every trainer.

Kept free of TensorFlow and Keras at import so that ``training.scratch`` (NumPy alone)
can share it with ``training.fit``. The model passed in is the Keras network being
exported: only its input name and layer summary are read.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.data import Mnist
from training.evaluate import Evaluation
from training.summary import summarize_model

if TYPE_CHECKING:
    import keras

INPUT_CONTRACT = {
    "shape": [28, 28, 1],
    "dtype": "float32",
    "range": [0.0, 1.0],
    "polarity": "white digit (1.0) on black background (0.0)",
    "scaling": "pixel / 255",
}
OUTPUT_CONTRACT = {"shape": [10], "dtype": "float32",
                   "meaning": "softmax probability of each digit 0-9"}


@dataclass(frozen=True)
class Origin:
    """Which model was trained, on what, with which seed: the options both trainers take."""

    name: str
    arch: str
    seed: int
    limit: int | None
    data: Path | None


def library_versions() -> dict[str, str]:
    """The versions that trained and exported the model.

    Called with a Keras model in hand, so TensorFlow and Keras are loaded already;
    importing them here, not at the top, keeps this module importable without them.
    """
    import keras
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__}


def build_metadata(origin: Origin, recipe: Mapping[str, Any], mnist: Mnist,
                   splits: Mapping[str, np.ndarray], model: keras.Model,
                   evaluation: Evaluation, history: dict[str, list[float]], seconds: float
                   ) -> dict[str, Any]:
    """Everything needed to know what a version is and how it was made.

    ``recipe`` is the trainer's recipe as a dict; ``splits`` holds at least ``x_train``
    and ``x_val``; ``history`` is per epoch, as Keras reports it.
    """
    return {
        "name": origin.name,
        "version": None,  # set by the export when the number is taken
        "arch": origin.arch,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": {"name": "MNIST", "source": mnist.source,
                    "train": len(splits["x_train"]), "validation": len(splits["x_val"]),
                    "test": len(mnist.x_test), "limit": origin.limit},
        "test": {"accuracy": evaluation.accuracy, "loss": evaluation.loss,
                 "per_class": evaluation.per_class(),
                 "confusion_matrix": evaluation.confusion.tolist()},
        "history": history,
        "train_seconds": round(seconds, 1),
        "recipe": {**recipe, "arch": origin.arch, "seed": origin.seed,
                   "limit": origin.limit, "val_size": len(splits["x_val"]),
                   "data": str(origin.data) if origin.data else None},
        "libraries": library_versions(),
        "input": {"name": model.inputs[0].name, **INPUT_CONTRACT},
        "output": OUTPUT_CONTRACT,
        "summary": summarize_model(model),
    }
