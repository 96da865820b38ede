"""Simple statistics of model inputs, the same wherever they are computed.

Each takes a batch as the model sees it, float32 (N, 28, 28, 1) in [0, 1] (white ink on
black), and returns one float64 value per image, vectorised over the batch. Training
records their distribution on its validation images (training/reference.py) and the
server compares live inputs with it (app/drift.py); both call these functions, so the
two sides cannot compute them differently.
"""

from __future__ import annotations

import numpy as np

INK_LEVEL = 0.5  # a pixel at least this bright is ink: a stroke's core, not its blur
_PIXELS = 28 * 28


def _ink(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) booleans: which pixels are ink."""
    return images.reshape(len(images), 28, 28) >= INK_LEVEL


def ink_fraction(images: np.ndarray) -> np.ndarray:
    """The share of each image's 784 pixels that are ink: thick strokes raise it."""
    return _ink(images).mean(axis=(1, 2), dtype=np.float64)


def mean_intensity(images: np.ndarray) -> np.ndarray:
    """Each image's mean pixel value: brighter or fainter strokes move it."""
    return images.reshape(len(images), -1).mean(axis=1, dtype=np.float64)


def bbox_size(images: np.ndarray) -> np.ndarray:
    """The area of the box around each image's ink, as a share of the 28×28 frame (0
    for an image with no ink): a narrow 1 or a digit drawn small lowers it."""
    ink = _ink(images)
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    return _extent(rows) * _extent(cols) / _PIXELS


def _extent(marked: np.ndarray) -> np.ndarray:
    """(N, 28) booleans → how many positions lie from the first marked to the last
    (0 where none is marked)."""
    first = marked.argmax(axis=1)
    last = marked.shape[1] - 1 - marked[:, ::-1].argmax(axis=1)
    return np.where(marked.any(axis=1), last - first + 1, 0).astype(np.float64)
