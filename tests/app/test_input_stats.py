"""The input statistics (app/input_stats.py) on made-up and real digits."""

from __future__ import annotations

import numpy as np

from app.input_stats import bbox_size, ink_fraction, mean_intensity


def test_a_blank_image_and_a_bar_give_the_statistics_by_hand():
    images = np.zeros((2, 28, 28, 1), np.float32)
    images[1, 3:5, 10:20] = 1.0  # a 2 × 10 bar
    images[1, 20, 0] = 0.5  # half lit: not ink, but it counts in the mean
    np.testing.assert_allclose(ink_fraction(images), [0, 20 / 784])
    np.testing.assert_allclose(mean_intensity(images), [0, 20.5 / 784], rtol=1e-6)
    np.testing.assert_array_equal(bbox_size(images), [0, 10])


def test_both_model_shapes_give_the_same_values(mnist):
    images = (mnist.x_test[:50] / 255.0).astype(np.float32)
    for statistic in (ink_fraction, mean_intensity, bbox_size):
        np.testing.assert_array_equal(statistic(images), statistic(images[..., None]))
        assert statistic(images).shape == (50,)


def test_real_digits_give_the_documented_values(mnist):
    images = (mnist.x_test[:2000] / 255.0).astype(np.float32)
    assert 0.10 < ink_fraction(images).mean() < 0.14
    assert 0.10 < mean_intensity(images).mean() < 0.14
    assert np.median(bbox_size(images)) == 20
    assert np.median(bbox_size(1.0 - images)) == 28  # inverted: the paper is ink
