"""training/summary.py: the article's parameter/memory table, computed and corrected."""

from __future__ import annotations

import pytest

from training.models import build_functional, build_tiny
from training.summary import format_summary, memory_estimate, summarize_model


@pytest.fixture(scope="module")
def cnn():
    return build_functional()


@pytest.fixture(scope="module")
def cnn_summary(cnn):
    return summarize_model(cnn)


def test_every_layers_count_matches_keras(cnn, cnn_summary):
    rows = {row["name"]: row for row in cnn_summary["layers"]}
    for layer in cnn.layers[1:]:
        assert rows[layer.name]["params"] == layer.count_params(), layer.name


def test_totals_match_keras(cnn, cnn_summary):
    totals = cnn_summary["totals"]
    assert totals["params"] == cnn.count_params() == 1_199_882
    assert totals["trainable_params"] == 1_199_882
    assert totals["non_trainable_params"] == 0
    assert totals["param_bytes"] == 4 * 1_199_882


def test_weights_and_biases_are_counted_apart_with_the_articles_slip_fixed(cnn_summary):
    conv2 = next(r for r in cnn_summary["layers"] if r["name"] == "conv2d_2")
    assert (conv2["weights"], conv2["biases"]) == (3 * 3 * 32 * 64, 64)  # not 18,342
    assert cnn_summary["totals"]["weights"] == 1_199_648  # the article printed 1,199,558
    assert cnn_summary["totals"]["biases"] == 234


def test_activations_include_the_input_as_the_article_counts(cnn_summary):
    first = cnn_summary["layers"][0]
    assert first["type"] == "InputLayer" and first["activations"] == 784
    assert cnn_summary["totals"]["activations_per_image"] == 87_194


def test_shapes_follow_the_network(cnn_summary):
    shapes = [(r["name"], r["output_shape"][1:]) for r in cnn_summary["layers"]]
    assert shapes[1] == ("conv2d_1", [26, 26, 32])
    assert shapes[2] == ("conv2d_2", [24, 24, 64])
    assert shapes[5] == ("flatten_1", [9216])


def test_memory_scales_with_batch_size(cnn_summary):
    one = memory_estimate(cnn_summary["totals"], 1)
    many = memory_estimate(cnn_summary["totals"], 32)
    assert one["forward_bytes_per_image"] == 87_194 * 4
    assert many["forward_bytes"] == 32 * one["forward_bytes"]
    assert many["training_bytes"] == 2 * many["forward_bytes"]
    assert many["param_bytes"] == one["param_bytes"]
    assert cnn_summary["memory"] == one


def test_memory_rejects_an_empty_batch(cnn_summary):
    with pytest.raises(ValueError, match="batch_size"):
        memory_estimate(cnn_summary["totals"], 0)


def test_tiny_net_table():
    summary = summarize_model(build_tiny())
    assert summary["totals"]["params"] == 13_602
    assert summary["totals"]["biases"] == 10
    assert summary["totals"]["activations_per_image"] == 784 + 5408 + 1352 + 1352 + 10


def test_printed_table_shows_every_layer_and_the_totals(cnn_summary):
    text = format_summary(cnn_summary)
    for row in cnn_summary["layers"]:
        assert row["name"] in text
    assert "1,199,882" in text and "87,194" in text
