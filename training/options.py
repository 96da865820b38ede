"""Command-line option types and defaults that both trainers share.

``training.fit`` (Keras or PyTorch) and ``training.scratch`` (NumPy) take the same
``--seed``, ``--name`` and counts; they live here, apart from ``training.fit``, so that the
NumPy trainer parses its options without importing TensorFlow and Keras.
"""

from __future__ import annotations

import argparse

from training.export_format import valid_model_name

DEFAULT_SEED = 42
DEFAULT_VAL_SIZE = 5000


def positive_int(text: str) -> int:
    """An argparse type: a count of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def model_name(text: str) -> str:
    """An argparse type: a name the service can serve (its folder under MODELS_DIR)."""
    if not valid_model_name(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a usable model name: use letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, and not only digits")
    return text
