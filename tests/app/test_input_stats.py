"""The input statistics (app/input_stats.py) on real digits; tests/app/test_drift.py has
the hand-made cases."""

from __future__ import annotations

import numpy as np

from app.input_stats import bbox_size, ink_fraction, mean_intensity


def test_both_model_shapes_give_the_same_values(mnist):
    images = (mnist.x_test[:50] / 255.0).astype(np.float32)
    for statistic in (ink_fraction, mean_intensity, bbox_size):
        np.testing.assert_array_equal(statistic(images), statistic(images[..., None]))
        assert statistic(images).shape == (50,)


def test_real_digits_give_the_documented_values(mnist):
    images = (mnist.x_test[:2000] / 255.0).astype(np.float32)
    assert 0.10 < ink_fraction(images).mean() < 0.14
    assert 0.10 < mean_intensity(images).mean() < 0.14
    assert 0.30 < np.median(bbox_size(images)) < 0.42  # README: about 0.36
    assert np.median(bbox_size(1.0 - images)) == 1.0  # inverted: the paper is ink
