"""Digits as people send them are classified about as well as MNIST's own, over HTTP."""

from __future__ import annotations

import pytest

from tests.restyle import http_accuracy, restyled_sets

COUNT = 500  # real test digits per restyled set


@pytest.fixture(scope="module")
def accuracies(server, mnist):
    sets = restyled_sets(mnist.x_test[:COUNT], mnist.y_test[:COUNT])
    measured = {name: http_accuracy(server.url, items) for name, items in sets.items()}
    for name, value in measured.items():
        print(f"{name}: {100 * value:.2f}%")
    return list(measured.values())


def test_published_mnist_digits_are_read_as_in_training(accuracies):
    assert accuracies[0] >= 0.95  # the session's model: one epoch, ~98% on the test set


def test_ink_on_paper_jpegs_score_about_as_well_as_the_originals(accuracies):
    assert accuracies[1] >= accuracies[0] - 0.02


def test_transparent_canvas_pngs_score_about_as_well_as_the_originals(accuracies):
    assert accuracies[2] >= accuracies[0] - 0.02


def test_printed_digits_are_recognised(accuracies):
    assert accuracies[3] >= 0.85
