"""training/models.py: both Keras APIs build the article's CNN; tiny is the NumPy net."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import to_model_input
from training.models import build_functional, build_model, build_sequential, build_tiny
from training.summary import summarize_model


def test_the_served_cnn_has_the_articles_parameter_count():
    assert build_functional().count_params() == 1_199_882
    assert build_sequential().count_params() == 1_199_882


def test_both_apis_give_the_same_layer_table():
    assert summarize_model(build_sequential()) == summarize_model(build_functional())


def test_both_apis_give_the_same_outputs_with_the_same_weights(mnist):
    functional, sequential = build_functional(), build_sequential()
    sequential.set_weights(functional.get_weights())
    images = to_model_input(mnist.x_test[:64])
    np.testing.assert_array_equal(functional.predict(images, verbose=0),
                                  sequential.predict(images, verbose=0))


def test_tiny_is_the_numpy_articles_net():
    model = build_tiny()
    assert model.count_params() == 13_602
    conv = model.get_layer("conv3x3")
    assert conv.use_bias is False and conv.filters == 8


def test_models_output_a_probability_per_digit(mnist):
    probabilities = build_model("tiny").predict(to_model_input(mnist.x_test[:5]), verbose=0)
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="functional, sequential, tiny"):
        build_model("resnet")
