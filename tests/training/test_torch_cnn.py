"""training/torch_cnn.py and the pieces of torch_train.py that need no training run.

The conversion is checked on freshly initialised networks: a wrong kernel layout or a
missing Flatten permutation changes the outputs of any network, so it fails here in
seconds, long before a trained model would show it.
"""

from __future__ import annotations

import re
import shlex
from importlib import metadata
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from torch import nn

from tests.conftest import ROOT
from training.data import to_model_input
from training.recipes import PRESETS, make_optimizer
from training.torch_cnn import (
    TORCH_ARCHITECTURES,
    build_net,
    count_parameters,
    keras_twin,
    keras_weights,
    predict_probabilities,
    to_keras,
)
from training.torch_train import augment, learning_rate_at

TOLERANCE = 1e-5


def random_net(arch: str, seed: int = 0) -> nn.Module:
    """A fresh net with larger biases and a sharper output layer than PyTorch's default
    initialisation gives, so that every weight visibly moves the probabilities."""
    torch.manual_seed(seed)
    net = build_net(arch)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.bias.uniform_(-0.2, 0.2)
        last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(100)
    return net.eval()


@pytest.fixture(scope="module")
def digits(mnist):
    return to_model_input(mnist.x_test[:512])


@pytest.mark.parametrize("arch", TORCH_ARCHITECTURES)
def test_both_pytorch_nets_and_their_keras_twins_have_1199882_parameters(arch):
    assert count_parameters(build_net(arch)) == 1_199_882
    assert keras_twin(arch).count_params() == 1_199_882


@pytest.mark.parametrize("arch", TORCH_ARCHITECTURES)
def test_the_keras_twin_computes_the_pytorch_nets_probabilities(arch, digits):
    net = random_net(arch)
    theirs = predict_probabilities(net, digits)
    ours = to_keras(net, arch).predict(digits, verbose=0)
    assert theirs.max(axis=1).mean() > 0.5  # sharp enough that a wrong weight shows
    assert len(set(theirs.argmax(axis=1))) >= 3  # and it looks at the digit
    assert np.abs(ours - theirs).max() <= TOLERANCE


def test_without_the_flatten_permutation_the_twin_computes_something_else(digits):
    """The check above is sensitive: the first Dense kernel merely transposed, as if
    Keras flattened (C, H, W) like PyTorch, gives different probabilities."""
    net = random_net("functional")
    weights = keras_weights(net)
    fc1 = net.fc1
    weights[4] = fc1.weight.detach().numpy().T
    model = keras_twin("functional")
    model.set_weights(weights)
    difference = np.abs(model.predict(digits, verbose=0) - predict_probabilities(net, digits))
    assert difference.max() > 0.1


def test_conv_kernels_move_to_keras_layout_element_by_element():
    net = random_net("functional")
    conv2 = net.conv2.weight.detach().numpy()  # (out, in, kh, kw)
    kernel = keras_weights(net)[2]  # (kh, kw, in, out)
    assert kernel.shape == (3, 3, 32, 64)
    assert kernel[2, 0, 5, 17] == conv2[17, 5, 2, 0]
    assert kernel[0, 1, 31, 63] == conv2[63, 31, 0, 1]


def test_the_sequential_net_has_no_relu_after_its_first_linear_layer():
    kinds = [type(m).__name__ for m in build_net("sequential")]
    first_linear = kinds.index("Linear")
    assert kinds[first_linear:] == ["Linear", "Dropout", "Linear", "LogSoftmax"]
    assert keras_twin("sequential").get_layer("dense_1").activation is keras.activations.linear
    assert keras_twin("functional").get_layer("dense_1").activation is keras.activations.relu


def test_the_missing_relu_changes_what_the_network_computes(digits):
    """Given the same weights, the two twins differ: the quirk is not cosmetic."""
    weights = keras_weights(random_net("sequential"))
    outputs = []
    for arch in TORCH_ARCHITECTURES:
        model = keras_twin(arch)
        model.set_weights(weights)
        outputs.append(model.predict(digits, verbose=0))
    assert np.abs(outputs[0] - outputs[1]).max() > 0.01


def test_tiny_has_no_pytorch_version():
    with pytest.raises(ValueError, match="functional, sequential"):
        build_net("tiny")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_learning_rate_schedule_is_the_keras_paths(preset):
    recipe = PRESETS[preset]
    steps_per_epoch = 50
    total = recipe.epochs * steps_per_epoch
    optimizer = make_optimizer(recipe, steps_per_epoch)
    for step in range(0, total, 7):
        optimizer.iterations.assign(step)  # the rate Keras would use at this step
        expected = float(optimizer.learning_rate)
        assert learning_rate_at(step, recipe, total) == pytest.approx(expected, rel=1e-5,
                                                                      abs=1e-9), step


def test_augmentation_with_no_magnitude_leaves_images_unchanged(digits):
    still = PRESETS["default"].with_overrides(rotation_degrees=0.0, shift_fraction=0.0,
                                              zoom_fraction=0.0)
    images = torch.from_numpy(digits[:16]).permute(0, 3, 1, 2).contiguous()
    out = augment(images, still, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images, atol=1e-5)


def test_augmentation_moves_digits_a_little_and_keeps_them_in_range(digits):
    images = torch.from_numpy(digits[:64]).permute(0, 3, 1, 2).contiguous()
    out = augment(images, PRESETS["default"], torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1
    changed = (out - images).abs().flatten(1).max(dim=1).values
    assert (changed > 0.05).all()  # every image moved
    ink = images.flatten(1).sum(dim=1)
    assert torch.allclose(out.flatten(1).sum(dim=1), ink, rtol=0.15)  # not cropped away


def dockerfile_installs(dockerfile: Path) -> list[tuple[Requirement, bool]]:
    """What the image's ``pip install`` lines install: each requirement (requirement
    files read through the ``COPY`` that put them there), and whether pip follows its
    dependencies (not under ``--no-deps``)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    copied = {}
    for parts in map(str.split, text.splitlines()):
        if parts[:1] == ["COPY"] and not parts[1].startswith("--"):
            *sources, target = parts[1:]
            copied |= {target + Path(source).name if target.endswith("/") else target: source
                       for source in sources}
    installs = []
    for command in re.findall(r"pip install ([^&\n]+)", text):
        words = shlex.split(command)
        follow = "--no-deps" not in words
        words = [word for word in words if word != "--no-deps"]
        while words:
            if words[0] in ("-c", "--constraint"):  # versions for what is named, no more
                words = words[2:]
                continue
            if words[0] == "-r":
                lines = (ROOT / copied[words[1]]).read_text().splitlines()
                specs = [line.split("#")[0].strip() for line in lines]
                words = words[2:]
            else:
                specs, words = [words[0]], words[1:]
            installs += [(Requirement(spec), follow) for spec in specs if spec]
    return installs


def closure(installs: list[tuple[Requirement, bool]]) -> set[str]:
    """Every distribution those requirements bring in on this platform, by following each
    installed distribution's own requirements (pip's metadata)."""
    names: set[str] = set()
    todo = [(requirement, follow, frozenset()) for requirement, follow in installs]
    while todo:
        requirement, follow, extras = todo.pop()
        markers = [{"extra": extra} for extra in extras or {""}]
        if requirement.marker and not any(map(requirement.marker.evaluate, markers)):
            continue
        name = canonicalize_name(requirement.name)
        if name in names:
            continue
        names.add(name)
        if follow:
            todo += [(Requirement(line), True, frozenset(requirement.extras))
                     for line in metadata.requires(requirement.name) or []]
    return names


def test_the_docker_image_installs_no_pytorch():
    """Serving reads SavedModels only: nothing the image installs, nor anything those
    packages require in turn, is PyTorch."""
    installed = closure(dockerfile_installs(ROOT / "Dockerfile"))
    assert {"flask", "gunicorn", "keras", "protobuf"} <= installed  # the walk went deep
    assert not {name for name in installed if name == "torch" or name.startswith("nvidia-")}
