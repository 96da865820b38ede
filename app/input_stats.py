"""Simple statistics of model inputs, to tell whether the digits people send still look
like the ones the model was trained on.

Each function takes a batch in model form, float32 ``(N, 28, 28, 1)`` (or ``(N, 28,
28)``) in [0, 1], white digit on black, and returns one float32 value per image, computed
for the whole batch at once (a few microseconds an image). Training exports the same
statistics of its validation set as the reference, and the service computes them on
live requests (payload logs, drift): both must use these functions, so that a change of
definition moves both sides at once.

- ``ink_fraction``: the share of the 784 pixels that are ink (above ``INK_THRESHOLD``).
  MNIST test digits average 0.12; thick strokes raise it, a faint scan lowers it.
- ``mean_intensity``: the mean pixel value, 0.12 on average for MNIST test digits; an inverted image
  (black digit on white) is near 0.87.
- ``bbox_size``: the larger side, in pixels (0 to 28), of the smallest box holding every
  ink pixel; 0 for an image with no ink. MNIST digits were scaled into a 20×20 box, so
  it is about 20; a tiny digit, or a photo whose background is not black, moves it.
"""

from __future__ import annotations

import numpy as np

INK_THRESHOLD = 0.5  # a pixel more than half lit is ink
SIDE = 28


def _pixels(images: np.ndarray) -> np.ndarray:
    """The batch as ``(N, 28, 28)``, whichever of the model's two shapes it came in."""
    return np.asarray(images, dtype=np.float32).reshape(-1, SIDE, SIDE)


def ink_fraction(images: np.ndarray) -> np.ndarray:
    """Per image: the share of pixels above INK_THRESHOLD."""
    return (_pixels(images) > INK_THRESHOLD).mean(axis=(1, 2), dtype=np.float32)


def mean_intensity(images: np.ndarray) -> np.ndarray:
    """Per image: the mean pixel value in [0, 1]."""
    return _pixels(images).mean(axis=(1, 2), dtype=np.float32)


def _extent(lines: np.ndarray) -> np.ndarray:
    """Per image: how many rows (or columns) span from the first inked one to the last;
    ``lines`` is ``(N, 28)``, True where that row holds ink."""
    first = lines.argmax(axis=1)
    last = SIDE - 1 - lines[:, ::-1].argmax(axis=1)
    return np.where(lines.any(axis=1), last - first + 1, 0)


def bbox_size(images: np.ndarray) -> np.ndarray:
    """Per image: the larger side of the ink's bounding box, in pixels (0 when blank)."""
    ink = _pixels(images) > INK_THRESHOLD
    rows, columns = _extent(ink.any(axis=2)), _extent(ink.any(axis=1))
    return np.maximum(rows, columns).astype(np.float32)
