"""training/export.py: versions 1, 2, 3…, atomic, never overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from training.data import to_model_input
from training.export import export_version, list_versions, next_version
from training.models import build_tiny


@pytest.fixture
def model_dir(tmp_path):
    return tmp_path / "models" / "mnist_tiny"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def test_first_version_is_one(model_dir):
    assert next_version(model_dir) == 1


def test_next_version_follows_the_highest_and_ignores_other_folders(model_dir):
    for name in ("1", "2", "5", ".tmp-1-abc", "latest", "3.bak"):
        (model_dir / name).mkdir(parents=True)
    (model_dir / "7").write_text("a file, not a version")
    assert list_versions(model_dir) == [1, 2, 5]
    assert next_version(model_dir) == 6


def test_export_writes_the_tf_serving_layout(model_dir, tiny):
    folder = export_version(tiny, model_dir, {"name": "mnist_tiny"},
                            lambda plots: (plots / "history.png").write_bytes(b"png"))
    assert folder == model_dir / "1"
    for name in ("saved_model.pb", "variables", "model.keras", "metadata.json",
                 "plots/history.png"):
        assert (folder / name).exists(), name
    assert json.loads((folder / "metadata.json").read_text()) == {
        "name": "mnist_tiny", "version": 1}


def test_exported_saved_model_computes_what_keras_computes(model_dir, tiny, mnist):
    folder = export_version(tiny, model_dir, {})
    images = to_model_input(mnist.x_test[:32])
    loaded = tf.saved_model.load(str(folder))  # keep a reference: it owns the variables
    served = loaded.serve(tf.constant(images)).numpy()
    np.testing.assert_allclose(served, tiny.predict(images, verbose=0), rtol=1e-5, atol=1e-6)


def test_second_export_is_version_two_and_leaves_one_untouched(model_dir, tiny):
    first = export_version(tiny, model_dir, {"run": "first"})
    before = (first / "metadata.json").read_bytes()
    second = export_version(tiny, model_dir, {"run": "second"})
    assert second.name == "2"
    assert (first / "metadata.json").read_bytes() == before


def test_failure_mid_export_leaves_no_version(model_dir, tiny):
    export_version(tiny, model_dir, {})

    def crash(plots):
        raise RuntimeError("disk full while drawing")

    with pytest.raises(RuntimeError, match="disk full"):
        export_version(tiny, model_dir, {}, crash)
    assert sorted(p.name for p in model_dir.iterdir()) == ["1"]


def test_a_version_published_meanwhile_is_not_overwritten(model_dir, tiny):
    def rival_publishes_version_one(plots):
        (model_dir / "1").mkdir()
        (model_dir / "1" / "saved_model.pb").write_bytes(b"the rival's model")

    folder = export_version(tiny, model_dir, {}, rival_publishes_version_one)
    assert folder.name == "2"
    assert json.loads((folder / "metadata.json").read_text())["version"] == 2
    assert (model_dir / "1" / "saved_model.pb").read_bytes() == b"the rival's model"


def test_staging_left_by_a_killed_export_is_cleaned_up(model_dir, tiny):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = model_dir / f".tmp-{dead.stdout.strip()}-x1"
    live = model_dir / f".tmp-{os.getpid()}-x2"
    stale.mkdir(parents=True)
    live.mkdir()
    export_version(tiny, model_dir, {})
    assert not stale.exists()
    assert live.exists()
