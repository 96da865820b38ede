"""training/recipes.py: presets, and the networks that train with their own version."""

from __future__ import annotations

import pytest

from training.recipes import NETWORK_PRESETS, PRESETS, recipe_for


@pytest.mark.parametrize("framework, arch", [("keras", "functional"), ("keras", "sequential"),
                                             ("keras", "tiny"), ("torch", "functional")])
def test_most_networks_train_with_the_shared_presets(framework, arch):
    for preset in PRESETS:
        assert recipe_for(preset, framework, arch) == PRESETS[preset]


def test_the_torch_sequential_net_trains_longer_and_gentler_by_default():
    ours = recipe_for("default", "torch", "sequential")
    assert (ours.epochs, ours.learning_rate) == (16, 1e-3)
    assert ours.preset == "default" and ours.augment and ours.schedule == "one-cycle"
    assert recipe_for("seed", "torch", "sequential") == PRESETS["seed"]  # the article's


def test_every_network_preset_names_a_preset_that_exists():
    for presets in NETWORK_PRESETS.values():
        assert set(presets) <= set(PRESETS)
        assert all(recipe.preset == name for name, recipe in presets.items())
