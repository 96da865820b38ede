"""Digits as people send them are classified about as well as MNIST's own, over HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.restyle import (
    LOW_RESOLUTIONS,
    MNIST_SET,
    PRINTED_SET,
    frame_filling_sets,
    http_score,
    restyled_sets,
    scan_set,
)

COUNT = 500  # real test digits per restyled set
FRAME_FILLING_COUNT = 1000  # per frame-filling set (issue 15 asks for at least 1,000)


def measure(url: str, sets: dict) -> dict:
    """Each set's score, two sets at a time: the session's server has two workers, and
    one client at a time would leave one of them idle."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        scores = dict(zip(sets, pool.map(lambda items: http_score(url, items),
                                         sets.values()), strict=True))
    for name, score in scores.items():
        print(f"{name}: {100 * score.accuracy:.2f}%, {score.refused} refused")
    return scores


@pytest.fixture(scope="module")
def scores(server, mnist):
    return measure(server.url, restyled_sets(mnist.x_test[:COUNT], mnist.y_test[:COUNT]))


@pytest.fixture(scope="module")
def frame_filling(server, mnist):
    return measure(server.url, frame_filling_sets(mnist.x_test[:FRAME_FILLING_COUNT],
                                                  mnist.y_test[:FRAME_FILLING_COUNT]))


@pytest.fixture(scope="module")
def mnist_accuracy(scores):
    return scores[MNIST_SET].accuracy


def test_published_mnist_digits_are_read_as_in_training(mnist_accuracy):
    assert mnist_accuracy >= 0.95  # the session's model: one epoch, ~98% on the test set


def test_ink_on_paper_jpegs_score_about_as_well_as_the_originals(scores, mnist_accuracy):
    assert scores["black ink on white 280×280, off-centre, JPEG"].accuracy >= (
        mnist_accuracy - 0.02)


def test_transparent_canvas_pngs_score_about_as_well_as_the_originals(scores, mnist_accuracy):
    assert scores["transparent RGBA PNG, black strokes (browser canvas)"].accuracy >= (
        mnist_accuracy - 0.02)


def test_printed_digits_are_recognised(scores):
    assert scores[PRINTED_SET].accuracy >= 0.85


def test_no_frame_filling_or_low_resolution_digit_is_refused(scores, frame_filling):
    assert {name: score.refused for name, score in (scores | frame_filling).items()} == {
        name: 0 for name in scores | frame_filling}


@pytest.mark.parametrize("name", ["tight crop to the ink, white on black, PNG",
                                  "tight crop to the ink, black on white, PNG",
                                  "tight crop, JPEG quality 50, both polarities"])
def test_digits_cropped_to_their_ink_score_about_as_well_as_the_originals(
        frame_filling, mnist_accuracy, name):
    assert frame_filling[name].accuracy >= mnist_accuracy - 0.02


@pytest.mark.parametrize("side", LOW_RESOLUTIONS)
@pytest.mark.parametrize("encoding", ["PNG", "JPEG quality 50"])
def test_low_resolution_scans_are_read(frame_filling, mnist_accuracy, side, encoding):
    """The served model's targets are 90% (8×8) and 95% (12×12, 16×16); the session's
    one-epoch model is held to the same distance below its own MNIST figure."""
    allowed = {8: 0.09, 12: 0.04, 16: 0.04}[side]
    assert frame_filling[scan_set(side, encoding)].accuracy >= mnist_accuracy - allowed
