"""The reference distributions an export records for the server's drift index.

On the validation images, as the model takes them (float32 (N, 28, 28, 1) in [0, 1]),
and the digits the exported network predicts for them: counts of each predicted digit,
and a histogram of each input statistic of app/input_stats.py — the functions the
server applies to live inputs, binned by app/drift.py's own rule, so both sides count
alike. A histogram's inner edges are the validation values' deciles, so each bin holds
about a tenth of the reference: no bin is so thin that sampling noise in it alone moves
the index (equal-width bins would leave most of [0, 1] empty: ink covers 5-30% of a
digit's frame). Stored in metadata.json (``drift_reference``, export_format's schema).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.drift import DIGIT, STATISTICS, bin_indices

# Below this many validation images (a --limit run) the bins are too noisy to compare
# with: no reference is recorded, and the server exports no index for the version.
MIN_IMAGES = 100
DECILES = np.linspace(0.1, 0.9, 9)
NUM_CLASSES = 10


def drift_reference(images: np.ndarray, digits: np.ndarray) -> dict[str, Any] | None:
    """The reference for ``images`` and the ``digits`` predicted for them, as
    metadata.json holds it; None when there are fewer than MIN_IMAGES."""
    if len(images) < MIN_IMAGES:
        return None
    statistics: dict[str, Any] = {
        DIGIT: {"counts": np.bincount(digits, minlength=NUM_CLASSES).tolist()}}
    for name, compute in STATISTICS.items():
        values = compute(images)
        edges = decile_edges(values)
        counts = np.bincount(bin_indices(values, edges), minlength=len(edges) - 1)
        statistics[name] = {"edges": edges.tolist(), "counts": counts.tolist()}
    return {"images": len(images), "source": "validation set", "statistics": statistics}


def decile_edges(values: np.ndarray) -> np.ndarray:
    """0, the deciles of ``values`` and 1, each once (a statistic that takes few
    values has fewer, wider bins), rounded to 6 places for a readable metadata.json."""
    return np.unique(np.round(np.concatenate([[0.0], np.quantile(values, DECILES), [1.0]]),
                              6))
