"""python -m training.fit: a real run on real MNIST, exported and reloaded without Keras."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.conftest import run_fit, side_by_side
from training.data import load_mnist, to_model_input
from training.export_format import complete


@pytest.fixture(scope="module")
def metadata(fit_run):
    return json.loads((fit_run.version_dir / "metadata.json").read_text())


def test_fit_exports_version_one_of_the_default_model(fit_run):
    assert [p.name for p in (fit_run.models_dir / "mnist_cnn").iterdir()] == ["1"]
    assert (fit_run.version_dir / "saved_model.pb").is_file()
    assert f"exported {fit_run.version_dir}" in fit_run.stdout


def test_saved_model_classifies_real_test_digits_well_above_chance(fit_run, mnist):
    served = tf.saved_model.load(str(fit_run.version_dir))
    probabilities = served.serve(tf.constant(to_model_input(mnist.x_test[:1000]))).numpy()
    accuracy = (probabilities.argmax(axis=1) == mnist.y_test[:1000]).mean()
    # Chance is 0.1; this seeded run gets 0.80 on these 1,000. A fifth of the learning
    # rate gets 0.68 on the whole test set, past the 0.5 this once asked for.
    assert accuracy > 0.7, accuracy


def test_saved_model_serving_signature_takes_the_documented_input(fit_run, metadata):
    loaded = tf.saved_model.load(str(fit_run.version_dir))
    signature = loaded.signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert spec.shape.as_list() == [None, *metadata["input"]["shape"]]
    assert spec.dtype == tf.float32


def test_metadata_accuracy_is_the_exported_models_on_the_full_test_set(fit_run, metadata,
                                                                         mnist):
    served = tf.saved_model.load(str(fit_run.version_dir))
    predictions = np.concatenate([
        served.serve(tf.constant(to_model_input(mnist.x_test[i:i + 2500]))).numpy()
        for i in range(0, 10_000, 2500)]).argmax(axis=1)
    assert metadata["test"]["accuracy"] == pytest.approx((predictions == mnist.y_test).mean())
    assert sum(row["total"] for row in metadata["test"]["per_class"]) == 10_000


def test_metadata_describes_the_run(metadata):
    assert metadata["name"] == "mnist_cnn" and metadata["version"] == 1
    assert metadata["arch"] == "functional"
    # The run used the first source that works in this environment, as load_mnist finds it.
    source = load_mnist(download=None).source
    assert metadata["dataset"] == {"name": "MNIST", "source": source,
                                   "train": 1800, "validation": 200, "test": 10_000,
                                   "limit": 2000}
    assert metadata["recipe"]["preset"] == "default" and metadata["recipe"]["epochs"] == 1
    assert metadata["recipe"]["seed"] == 42
    assert set(metadata["history"]) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert metadata["input"]["shape"] == [28, 28, 1] and metadata["input"]["range"] == [0, 1]
    assert metadata["summary"]["totals"]["params"] == 1_199_882
    assert {"tensorflow", "keras", "numpy", "python"} <= set(metadata["libraries"])
    assert metadata["created"].endswith("+00:00")


def test_plots_are_real_pngs(fit_run):
    for name in ("history", "confusion", "samples"):
        with Image.open(fit_run.version_dir / "plots" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 300


def test_keras_file_reloads_with_the_same_outputs(fit_run, mnist):
    import keras

    images = tf.constant(to_model_input(mnist.x_test[:16]))
    reloaded = keras.saving.load_model(fit_run.version_dir / "model.keras")
    served = tf.saved_model.load(str(fit_run.version_dir))
    np.testing.assert_allclose(reloaded.predict(images, verbose=0),
                               served.serve(images).numpy(), rtol=1e-5, atol=1e-6)


def test_fit_prints_test_figures_and_the_per_class_table(fit_run):
    assert "Test accuracy:" in fit_run.stdout and "Test loss:" in fit_run.stdout
    for digit in range(10):
        assert f"Test Accuracy of {digit:>5}:" in fit_run.stdout
    assert "Test Accuracy (Overall):" in fit_run.stdout
    assert "1,199,882" in fit_run.stdout


def test_the_same_seed_repeats_a_run_exactly(tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    results = side_by_side(*(  # side by side: repeatable even when not run alone
        lambda f=folder: run_fit("--arch", "tiny", "--limit", "600", "--epochs", "2",
                                 "--seed", "3", "--models-dir", str(f))
        for folder in folders))
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    runs = [json.loads((folder / "mnist_cnn" / "1" / "metadata.json").read_text())
            for folder in folders]
    assert runs[0]["history"] == runs[1]["history"]
    assert runs[0]["test"]["confusion_matrix"] == runs[1]["test"]["confusion_matrix"]


def test_a_bad_data_path_fails_with_a_clear_message(tmp_path):
    result = run_fit("--data", str(tmp_path / "missing.npz"),
                     "--models-dir", str(tmp_path / "models"))
    assert result.returncode == 2
    assert "missing.npz" in result.stderr and "could not load MNIST" in result.stderr
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--name", "../escape"],
                                  ["--arch", "resnet"], ["--limit", "5"]])
def test_bad_options_are_refused_before_any_work(tmp_path, args):
    result = run_fit(*args, "--models-dir", str(tmp_path / "models"))
    assert result.returncode == 2
    assert "error:" in result.stderr
    assert not (tmp_path / "models").exists()


def test_if_missing_does_nothing_when_a_version_exists(fit_run):
    result = run_fit("--if-missing", "--models-dir", str(fit_run.models_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not training" in result.stdout
    assert [p.name for p in (fit_run.models_dir / "mnist_cnn").iterdir()] == ["1"]


def test_if_missing_trains_into_models_dir_and_name_from_the_environment(tmp_path):
    result = run_fit("--if-missing", "--arch", "tiny", "--limit", "500", "--epochs", "1",
                     env={"MODELS_DIR": str(tmp_path / "volume"), "MODEL_NAME": "digits"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "volume" / "digits" / "1" / "saved_model.pb").is_file()


def test_if_missing_retrains_when_the_newest_version_is_incomplete(fit_run, tmp_path):
    model_dir = tmp_path / "models" / "mnist_cnn"
    shutil.copytree(fit_run.version_dir, model_dir / "1")
    broken = shutil.copytree(fit_run.version_dir, model_dir / "2")
    (data,) = (broken / "variables").glob("variables.data-*")
    data.write_bytes(data.read_bytes()[:1000])  # a copy cut short
    result = run_fit("--if-missing", "--arch", "tiny", "--limit", "500", "--epochs", "1",
                     "--models-dir", str(tmp_path / "models"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mnist_cnn/2 is not servable (variables/variables.data-00000-of-00001 has 1000 " \
        "bytes" in result.stdout
    assert complete(model_dir / "3")
    assert json.loads((model_dir / "3" / "metadata.json").read_text())["arch"] == "tiny"


def test_if_missing_retrains_when_the_server_would_refuse_the_newest_version(
        foreign_exports, tmp_path):
    """Complete by its files, but a network for 32×32 colour images: the store refuses
    it, so the train Job must not leave the API without a servable version."""
    from app.model_store import ModelStore
    from app.version_policy import VersionPolicy

    models_dir = tmp_path / "models"
    shutil.copytree(foreign_exports["wrong_shape"], models_dir / "mnist_cnn" / "1")
    result = run_fit("--if-missing", "--arch", "tiny", "--limit", "500", "--epochs", "1",
                     "--models-dir", str(models_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    store = ModelStore(models_dir, "mnist_cnn", policy=VersionPolicy.parse("all"))
    store.load()
    assert store.get().version == 2
    reason = store.rejected_versions("mnist_cnn")["1"]
    assert reason.startswith("serving_default input is DT_FLOAT [-1, 32, 32, 3]")
    assert f"mnist_cnn/1 is not servable ({reason}): training" in result.stdout


def test_if_missing_retrains_when_the_newest_metadata_is_nested_too_deep(fit_run, tmp_path):
    """A RecursionError while validating it made --if-missing exit 1 with a traceback."""
    model_dir = tmp_path / "models" / "mnist_cnn"
    deep = shutil.copytree(fit_run.version_dir, model_dir / "1")
    metadata = json.loads((deep / "metadata.json").read_text())
    metadata["input"] = {"deep": "DEEP"}
    (deep / "metadata.json").write_text(
        json.dumps(metadata).replace('"DEEP"', "[" * 300 + "]" * 300))
    result = run_fit("--if-missing", "--arch", "tiny", "--limit", "500", "--epochs", "1",
                     "--models-dir", str(tmp_path / "models"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mnist_cnn/1 is not servable (metadata.json is nested deeper than " in result.stdout
    assert complete(model_dir / "2")
