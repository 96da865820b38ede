"""python -m training.fit --framework torch: real PyTorch runs on real MNIST, exported,
reloaded from the SavedModel and from model.pt, and served by the real app."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
import tensorflow as tf
import torch
from PIL import Image

from tests.conftest import FitRun, run_fit, side_by_side, start_server, stop_server
from training.data import split_validation, to_model_input
from training.recipes import PRESETS
from training.torch_cnn import SEQUENTIAL_QUIRK, TORCH_ARCHITECTURES, build_net

LIMIT = 2000
SEED = 42
# `make test` exports MODEL_NAME=mnist_cnn, which would win over the torch default name
# these runs check; an empty value means "not set", as for the service.
DEFAULT_NAME = {"MODEL_NAME": ""}


def train_torch(arch: str, models_dir: Path) -> FitRun:
    result = run_fit("--framework", "torch", "--arch", arch, "--limit", str(LIMIT),
                     "--epochs", "2", "--models-dir", str(models_dir), env=DEFAULT_NAME)
    assert result.returncode == 0, result.stderr[-3000:]
    return FitRun(models_dir, models_dir / "mnist_torch" / "1", result.stdout)


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory) -> dict[str, FitRun]:
    """Each PyTorch variant trained for two epochs on 2,000 real images and exported,
    the two runs side by side."""
    folders = {arch: tmp_path_factory.mktemp(f"torch_{arch}") for arch in TORCH_ARCHITECTURES}
    runs = side_by_side(*(lambda a=arch: train_torch(a, folders[a])
                          for arch in TORCH_ARCHITECTURES))
    return dict(zip(TORCH_ARCHITECTURES, runs, strict=True))


@pytest.fixture(scope="module", params=TORCH_ARCHITECTURES)
def torch_run(request, torch_runs) -> FitRun:
    """One PyTorch variant's run (see torch_runs)."""
    return torch_runs[request.param]


@pytest.fixture(scope="module")
def metadata(torch_run) -> dict:
    return json.loads((torch_run.version_dir / "metadata.json").read_text())


def saved_model_probabilities(version_dir, images: np.ndarray) -> np.ndarray:
    served = tf.saved_model.load(str(version_dir))
    return np.concatenate([served.serve(tf.constant(to_model_input(images[i:i + 2500])))
                           .numpy() for i in range(0, len(images), 2500)])


def reloaded_net(torch_run, arch: str) -> torch.nn.Module:
    net = build_net(arch)
    net.load_state_dict(torch.load(torch_run.version_dir / "model.pt", weights_only=True))
    return net.eval()


def test_the_export_holds_the_saved_model_the_keras_file_plots_and_the_state_dict(torch_run):
    for name in ("saved_model.pb", "model.keras", "model.pt", "metadata.json"):
        assert (torch_run.version_dir / name).is_file(), name
    for name in ("history", "confusion", "samples"):
        with Image.open(torch_run.version_dir / "plots" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 300
    assert f"exported {torch_run.version_dir}" in torch_run.stdout


def test_metadata_says_pytorch_and_which_variant(metadata):
    assert metadata["name"] == "mnist_torch" and metadata["version"] == 1
    assert metadata["framework"] == "pytorch"
    assert metadata["libraries"]["torch"] == torch.__version__
    assert metadata["torch"]["state_dict"] == "model.pt"
    assert metadata["summary"]["totals"]["params"] == 1_199_882
    assert metadata["recipe"]["seed"] == SEED and metadata["recipe"]["epochs"] == 2
    # the network's own version of the default preset (NETWORK_PRESETS) is the one used
    rate = {"sequential": 1e-3, "functional": PRESETS["default"].learning_rate}
    assert metadata["recipe"]["learning_rate"] == rate[metadata["arch"]]
    quirk = [SEQUENTIAL_QUIRK] if metadata["arch"] == "sequential" else []
    assert metadata["summary"]["notes"] == quirk


def test_the_saved_model_equals_the_pytorch_model_on_all_test_images(torch_run, metadata,
                                                                     mnist):
    arch = metadata["arch"]
    served = saved_model_probabilities(torch_run.version_dir, mnist.x_test)
    theirs = reloaded_net(torch_run, arch)
    with torch.inference_mode():
        pytorch = torch.exp(theirs(torch.from_numpy(to_model_input(mnist.x_test))
                                   .permute(0, 3, 1, 2).contiguous())).numpy()
    assert served.shape == pytorch.shape == (10_000, 10)
    assert np.abs(served - pytorch).max() <= 1e-5
    accuracies = [float((p.argmax(axis=1) == mnist.y_test).mean()) for p in (served, pytorch)]
    assert accuracies == [metadata["test"]["accuracy"]] * 2
    assert metadata["torch"]["test_accuracy"] == metadata["test"]["accuracy"]
    assert metadata["test"]["accuracy"] > 0.7  # two short epochs; chance is 0.1


def test_the_exported_weights_are_those_of_the_best_validation_epoch(torch_run, metadata,
                                                                    mnist):
    val_accuracy = metadata["history"]["val_accuracy"]
    best = int(np.argmax(val_accuracy)) + 1  # the first of equals, as a later must beat it
    assert metadata["torch"]["best_epoch"] == best
    _, (x_val, y_val) = split_validation(mnist.x_train[:LIMIT], mnist.y_train[:LIMIT],
                                         LIMIT // 10, SEED)
    served = saved_model_probabilities(torch_run.version_dir, x_val)
    assert float((served.argmax(axis=1) == y_val).mean()) == val_accuracy[best - 1]


def test_fit_prints_the_tables_the_keras_path_prints(torch_run, metadata):
    assert "1,199,882" in torch_run.stdout and "Test accuracy:" in torch_run.stdout
    for digit in range(10):
        assert f"Test Accuracy of {digit:>5}:" in torch_run.stdout
    assert "Epoch 2/2" in torch_run.stdout and "val_accuracy" in torch_run.stdout
    assert (SEQUENTIAL_QUIRK in torch_run.stdout) == (metadata["arch"] == "sequential")


def test_the_same_seed_repeats_a_pytorch_run_exactly(tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    results = side_by_side(*(  # side by side: repeatable even when not run alone
        lambda f=folder: run_fit("--framework", "torch", "--limit", "600", "--epochs", "1",
                                 "--seed", "3", "--models-dir", str(f), env=DEFAULT_NAME)
        for folder in folders))
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    runs = [folder / "mnist_torch" / "1" for folder in folders]
    first, second = (json.loads((run / "metadata.json").read_text()) for run in runs)
    assert first["history"] == second["history"]
    assert first["test"]["confusion_matrix"] == second["test"]["confusion_matrix"]
    weights = [torch.load(run / "model.pt", weights_only=True) for run in runs]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_tiny_is_refused_with_a_clear_message_before_any_work(tmp_path):
    result = run_fit("--framework", "torch", "--arch", "tiny",
                     "--models-dir", str(tmp_path / "models"))
    assert result.returncode == 2
    assert "--arch tiny has no PyTorch version" in result.stderr
    assert not (tmp_path / "models").exists()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_app_serves_the_pytorch_model(torch_run, metadata, mnist, tmp_path):
    server = start_server(torch_run.models_dir, tmp_path / "gunicorn.log",
                          MODEL_NAME="mnist_torch", WORKERS="1")
    try:
        files = {f"digit{i}": png(mnist.x_test[i]) for i in range(50)}
        response = requests.post(server.url + "/models/mnist_torch/predict?preprocess=none",
                                 files=files, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": "mnist_torch", "version": 1}
        served = np.array([p["probabilities"] for p in body["predictions"]])
        direct = saved_model_probabilities(torch_run.version_dir, mnist.x_test[:50])
        assert np.abs(served - direct).max() < 1e-3  # the JSON rounds probabilities

        summary = requests.get(server.url + "/models/mnist_torch/summary", timeout=10).json()
        assert summary["totals"]["params"] == 1_199_882
        assert [row["name"] for row in summary["layers"]][-1] == "dense_2"
        assert summary["test_accuracy"] == metadata["test"]["accuracy"]
        assert summary["notes"] == metadata["summary"]["notes"]  # the Sequential quirk

        described = requests.get(server.url + "/models/mnist_torch", timeout=10).json()
        assert len(described["plots"]) == 3  # what the /model page shows
        for plot in described["plots"]:
            image = requests.get(server.url + plot["url"], timeout=10)
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        assert requests.get(server.url + "/model", timeout=10).status_code == 200
    finally:
        stop_server(server)
