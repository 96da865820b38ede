"""training/reference.py: the drift reference every export records, checked on the
session's real training run (fit_run) against the same validation split recomputed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.drift import STATISTICS, bin_indices
from training.data import split_validation, to_model_input
from training.options import DEFAULT_SEED
from training.reference import MIN_IMAGES, drift_reference

FIT_RUN_LIMIT, FIT_RUN_VALIDATION = 2000, 200  # fit_run: --limit 2000 holds out 10%


@pytest.fixture(scope="module")
def recorded(fit_run) -> dict:
    return json.loads((fit_run.version_dir / "metadata.json").read_text())["drift_reference"]


def test_the_export_counts_every_validation_image_once_per_statistic(recorded):
    assert recorded["images"] == FIT_RUN_VALIDATION
    statistics = recorded["statistics"]
    assert set(statistics) == {"digit", *STATISTICS}
    assert len(statistics["digit"]["counts"]) == 10
    for name, histogram in statistics.items():
        assert sum(histogram["counts"]) == FIT_RUN_VALIDATION, name
    for name in STATISTICS:
        edges = statistics[name]["edges"]
        assert edges[0] == 0.0 and edges[-1] == 1.0 and np.all(np.diff(edges) > 0), name
        assert len(statistics[name]["counts"]) == len(edges) - 1


def test_the_export_recorded_the_validation_split_as_the_server_computes_it(
        fit_run, recorded, mnist):
    """Recomputed from the split the run held out, the server's statistics (app/
    input_stats.py) binned by the server's rule, and the exported model's digits."""
    import tensorflow as tf

    (_, _), (x_val, _) = split_validation(mnist.x_train[:FIT_RUN_LIMIT],
                                          mnist.y_train[:FIT_RUN_LIMIT],
                                          FIT_RUN_VALIDATION, DEFAULT_SEED)
    images = to_model_input(x_val)
    served = tf.saved_model.load(str(fit_run.version_dir))
    digits = served.serve(tf.constant(images)).numpy().argmax(axis=1)
    statistics = recorded["statistics"]
    assert np.bincount(digits, minlength=10).tolist() == statistics["digit"]["counts"]
    for name, compute in STATISTICS.items():
        edges = np.array(statistics[name]["edges"])
        counts = np.bincount(bin_indices(compute(images), edges), minlength=len(edges) - 1)
        assert counts.tolist() == statistics[name]["counts"], name


def test_decile_bins_hold_about_a_tenth_of_the_reference_each(mnist):
    reference = drift_reference(to_model_input(mnist.x_train[:2000]), mnist.y_train[:2000])
    counts = np.array(reference["statistics"]["mean_intensity"]["counts"])
    assert len(counts) == 10 and np.all(np.abs(counts - 200) <= 2), counts


def test_too_few_validation_images_record_no_reference(mnist):
    images = to_model_input(mnist.x_train[:MIN_IMAGES - 1])
    assert drift_reference(images, mnist.y_train[:MIN_IMAGES - 1]) is None
