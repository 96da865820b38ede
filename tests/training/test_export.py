"""training/export.py: versions 1, 2, 3…, atomic, never overwritten."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from training.data import to_model_input
from training.export import export_version
from training.export_format import list_versions, next_version
from training.models import build_tiny
from training.summary import summarize_model


@pytest.fixture
def model_dir(tmp_path):
    return tmp_path / "models" / "mnist_tiny"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


@pytest.fixture(scope="module")
def summary(tiny):
    """The part of metadata.json the server needs; an export without it is refused."""
    return {"summary": summarize_model(tiny)}


def test_first_version_is_one(model_dir):
    assert next_version(model_dir) == 1


def test_next_version_follows_the_highest_and_ignores_other_folders(model_dir):
    for name in ("1", "2", "5", ".tmp-1-abc", "latest", "3.bak"):
        (model_dir / name).mkdir(parents=True)
    assert list_versions(model_dir) == [1, 2, 5]
    assert next_version(model_dir) == 6


def test_next_version_skips_a_number_held_by_a_file_or_a_bad_link(model_dir):
    """A rename cannot put a version where a file or link already has its name."""
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "2").write_text("a file, not a version")
    (model_dir / "3").symlink_to("3")
    assert list_versions(model_dir) == [1]
    assert next_version(model_dir) == 4


def test_export_writes_the_tf_serving_layout(model_dir, tiny, summary):
    folder = export_version(tiny, model_dir, {"name": "mnist_tiny", **summary},
                            lambda plots: (plots / "history.png").write_bytes(b"png"))
    assert folder == model_dir / "1"
    for name in ("saved_model.pb", "variables", "model.keras", "model.tflite",
                 "metadata.json", "plots/history.png"):
        assert (folder / name).exists(), name
    metadata = json.loads((folder / "metadata.json").read_text())
    assert (metadata["name"], metadata["version"]) == ("mnist_tiny", 1)
    assert metadata["summary"] == summary["summary"]
    assert metadata["files"]["plots/history.png"]["bytes"] == 3
    assert metadata["files"]["model.tflite"]["bytes"] == (folder / "model.tflite").stat().st_size
    assert metadata["tflite"]["file"] == "model.tflite"
    assert metadata["signature_defs"]["serving_default"]["inputs"]["image"]["dtype"] == "DT_FLOAT"


def test_exported_saved_model_computes_what_keras_computes(model_dir, tiny, summary, mnist):
    folder = export_version(tiny, model_dir, summary)
    images = to_model_input(mnist.x_test[:32])
    loaded = tf.saved_model.load(str(folder))  # keep a reference: it owns the variables
    served = loaded.serve(tf.constant(images)).numpy()
    np.testing.assert_allclose(served, tiny.predict(images, verbose=0), rtol=1e-5, atol=1e-6)


def test_second_export_is_version_two_and_leaves_one_untouched(model_dir, tiny, summary):
    first = export_version(tiny, model_dir, {"run": "first", **summary})
    before = (first / "metadata.json").read_bytes()
    second = export_version(tiny, model_dir, {"run": "second", **summary})
    assert second.name == "2"
    assert (first / "metadata.json").read_bytes() == before


def test_failure_mid_export_leaves_no_version(model_dir, tiny, summary):
    export_version(tiny, model_dir, summary)

    def crash(plots):
        raise RuntimeError("disk full while drawing")

    with pytest.raises(RuntimeError, match="disk full"):
        export_version(tiny, model_dir, summary, crash)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_a_version_published_meanwhile_is_not_overwritten(model_dir, tiny, summary):
    def rival_publishes_version_one(plots):
        (model_dir / "1").mkdir()
        (model_dir / "1" / "saved_model.pb").write_bytes(b"the rival's model")

    folder = export_version(tiny, model_dir, summary, rival_publishes_version_one)
    assert folder.name == "2"
    assert json.loads((folder / "metadata.json").read_text())["version"] == 2
    assert (model_dir / "1" / "saved_model.pb").read_bytes() == b"the rival's model"
