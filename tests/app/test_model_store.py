"""app/model_store.py: the versions the policy names, each complete; broken ones skipped."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from app.errors import ModelNotFound, ModelNotReady
from app.model_store import ModelStore
from app.version_policy import VersionPolicy
from training.data import to_model_input


@pytest.fixture
def models_dir(tmp_path, served_models):
    """A fresh MODELS_DIR holding a copy of the trained tiny net as version 1."""
    shutil.copytree(served_models / "mnist_tiny" / "1", tmp_path / "mnist_tiny" / "1")
    return tmp_path


def add_version(models_dir, version: int):
    target = models_dir / "mnist_tiny" / str(version)
    shutil.copytree(models_dir / "mnist_tiny" / "1", target)
    return target


def loaded(models_dir, policy: str = "latest") -> ModelStore:
    store = ModelStore(models_dir, "mnist_tiny", policy=VersionPolicy.parse(policy))
    store.load()
    return store


def test_the_highest_version_is_served(models_dir):
    add_version(models_dir, 3)
    store = loaded(models_dir)
    assert store.ready
    assert store.get().version == 3
    assert store.get("mnist_tiny").available_versions == [1, 3]


def test_served_model_classifies_real_digits(models_dir, mnist):
    probabilities = loaded(models_dir).get().predict(to_model_input(mnist.x_test[:200]))
    assert probabilities.shape == (200, 10)
    assert (probabilities.argmax(axis=1) == mnist.y_test[:200]).mean() > 0.8


def mutilate_missing_pb(folder):
    (folder / "saved_model.pb").unlink()


def mutilate_corrupt_pb(folder):
    (folder / "saved_model.pb").write_bytes(b"\x00garbage" * 10)


def mutilate_no_metadata(folder):
    (folder / "metadata.json").unlink()


def mutilate_bad_json(folder):
    (folder / "metadata.json").write_text("{ half written")


def mutilate_wrong_count(folder):
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["summary"]["totals"]["params"] += 1
    (folder / "metadata.json").write_text(json.dumps(metadata))


def mutilate_missing_variables(folder):
    shutil.rmtree(folder / "variables")


@pytest.mark.parametrize(("mutilate", "reason"), [
    (mutilate_missing_pb, "no saved_model.pb"),
    (mutilate_corrupt_pb, "SavedModel does not load"),
    (mutilate_no_metadata, "no metadata.json"),
    (mutilate_bad_json, "unreadable metadata.json"),
    (mutilate_wrong_count, "parameters, metadata says"),
    (mutilate_missing_variables, "SavedModel does not load"),
])
def test_a_broken_version_is_skipped_with_a_reason(models_dir, caplog, mutilate, reason):
    mutilate(add_version(models_dir, 2))
    with caplog.at_level(logging.WARNING, logger="app.model_store"):
        store = loaded(models_dir)
    assert store.get().version == 1
    assert any("mnist_tiny/2" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records), caplog.text


def test_staging_folders_and_files_are_not_versions(models_dir):
    (models_dir / "mnist_tiny" / ".tmp-123-abc").mkdir()
    (models_dir / "mnist_tiny" / "notes.txt").write_text("hello")
    assert loaded(models_dir).get().available_versions == [1]


def test_no_servable_version_means_not_ready(tmp_path):
    (tmp_path / "mnist_tiny" / "1").mkdir(parents=True)
    store = loaded(tmp_path)
    assert not store.ready
    assert store.rejected == {"mnist_tiny": "no complete version"}
    with pytest.raises(ModelNotReady, match="make train"):
        store.get()


def test_a_missing_models_dir_means_not_ready(tmp_path):
    store = loaded(tmp_path / "nothing-here")
    assert not store.ready


def test_an_unknown_name_is_not_found(models_dir):
    with pytest.raises(ModelNotFound, match="mnist_tiny"):
        loaded(models_dir).get("other")


def test_outputs_match_the_keras_model(models_dir, mnist):
    import keras

    folder = models_dir / "mnist_tiny" / "1"
    images = to_model_input(mnist.x_test[:16])
    served = loaded(models_dir).get().predict(images)
    reference = keras.saving.load_model(folder / "model.keras").predict(images, verbose=0)
    np.testing.assert_allclose(served, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("policy", "expected"), [
    ("latest", [3]), ("latest:2", [2, 3]), ("all", [1, 2, 3]), ("1,3", [1, 3]),
    ("3,9", [3]),
])
def test_the_version_policy_picks_what_is_loaded(models_dir, policy, expected):
    add_version(models_dir, 2)
    add_version(models_dir, 3)
    store = loaded(models_dir, policy)
    assert list(store.versions["mnist_tiny"]) == expected
    assert store.get().version == expected[-1]  # a request without a version: the highest
    assert [store.get("mnist_tiny", v).version for v in expected] == expected


def test_a_version_the_policy_left_out_is_not_found(models_dir):
    add_version(models_dir, 2)
    with pytest.raises(ModelNotFound, match=r"version 1 of 'mnist_tiny' is not loaded"):
        loaded(models_dir).get("mnist_tiny", 1)


def test_latest_n_skips_a_broken_version_and_takes_the_next(models_dir):
    add_version(models_dir, 2)
    mutilate_missing_pb(add_version(models_dir, 3))
    add_version(models_dir, 4)
    assert list(loaded(models_dir, "latest:2").versions["mnist_tiny"]) == [2, 4]


def test_a_listed_version_that_does_not_exist_is_logged(models_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="app.model_store"):
        store = loaded(models_dir, "1,5")
    assert list(store.versions["mnist_tiny"]) == [1]
    assert "has no version 5" in caplog.text


def test_the_signature_defs_are_read_from_the_saved_model(models_dir):
    model = loaded(models_dir).get()
    signature = model.signature_defs["serving_default"]
    assert list(signature["inputs"]) == [model.input_name] == ["image"]
    assert model.output_name == "output_0"
    assert signature["inputs"]["image"]["dtype"] == "DT_FLOAT"


def test_a_signature_with_two_outputs_is_skipped_with_a_reason(tmp_path, caplog):
    import tensorflow as tf

    class TwoOutputs(tf.Module):
        def __init__(self):
            super().__init__()
            self.weights = tf.Variable(tf.ones((784, 10)))

        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, "image")])
        def serve(self, image):
            logits = tf.reshape(image, (-1, 784)) @ self.weights
            return {"probabilities": tf.nn.softmax(logits), "logits": logits}

    folder = tmp_path / "mnist_tiny" / "1"
    module = TwoOutputs()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    (folder / "metadata.json").write_text(json.dumps({"summary": {"totals": {"params": 7840}}}))
    with caplog.at_level(logging.WARNING, logger="app.model_store"):
        store = loaded(tmp_path)
    assert not store.ready
    assert "must have one input (images) and one output" in caplog.text
