"""Warm-up records in TF Serving's format: written by training.fit, read back with
tensorflow-serving-api's own messages, replayed by the store before a version serves,
and a version whose records fail is rejected with the reason."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from app.model_store import ModelStore
from training.export_format import METADATA_FILE, WARMUP_FILE, manifest, write_json
from training.warmup import BATCH_SIZES, write_warmup_requests


def read_records(path) -> list:
    """The file as TF Serving reads it: TFRecords of PredictionLog messages."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    return [prediction_log_pb2.PredictionLog.FromString(bytes(record.numpy()))
            for record in tf.data.TFRecordDataset(str(path))]


def test_training_writes_tf_serving_warmup_records_of_real_test_digits(fit_run, mnist):
    import tensorflow as tf

    path = fit_run.version_dir / WARMUP_FILE
    listed = json.loads((fit_run.version_dir / METADATA_FILE).read_text())["files"]
    assert WARMUP_FILE in listed  # in the manifest, checked like every other file
    logs = read_records(path)
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * len(BATCH_SIZES)
    start = 0
    for log, size in zip(logs, BATCH_SIZES, strict=True):
        request = log.predict_log.request
        assert (request.model_spec.name, request.model_spec.signature_name) == (
            "mnist_cnn", "serving_default")
        images = tf.make_ndarray(request.inputs["image"])
        assert images.shape == (size, 28, 28, 1)
        np.testing.assert_allclose(images[..., 0] * 255, mnist.x_test[start:start + size],
                                   atol=1e-3)
        start += size


@pytest.fixture
def version(tmp_path, fit_run):
    """MODELS_DIR with a copy of the trained CNN as digits/1."""
    folder = tmp_path / "digits" / "1"
    shutil.copytree(fit_run.version_dir, folder)
    return folder


def loaded(models_dir) -> ModelStore:
    store = ModelStore(models_dir, "digits")
    store.load()
    return store


def test_the_store_replays_the_records_before_the_version_serves(version, caplog):
    with caplog.at_level(logging.INFO, logger="app"):
        store = loaded(version.parents[1])
    assert store.ready
    assert f"replayed {len(BATCH_SIZES)} warm-up records of {version}" in caplog.text


def test_a_version_whose_warmup_records_fail_is_rejected_with_the_reason(version):
    write_warmup_requests(version, "digits", "image", np.zeros((1, 5), np.float32), (1,))
    metadata = json.loads((version / METADATA_FILE).read_text())
    write_json(version / METADATA_FILE, {**metadata, "files": manifest(version)})
    store = loaded(version.parents[1])
    assert not store.ready
    reason = store.rejected_versions("digits")["1"]
    assert reason == ("warm-up record 1 of 1 holds a float32 tensor of shape (1, 5), "
                      "expected float (N, 28, 28, 1)"), reason


def test_a_record_declaring_a_huge_shape_is_rejected_before_it_is_allocated(tmp_path):
    """A 60-byte record can declare 300,000 images with one float_val: TensorFlow fills
    the rest, ~1 GB in the poll thread (a bigger shape: the worker killed for memory).
    Its shape must be refused from the message, before ``make_ndarray``."""
    import tracemalloc

    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import prediction_log_pb2

    from app.servable import VersionRejected
    from app.warmup import replay_warmup

    shape = tensor_shape_pb2.TensorShapeProto(dim=[
        tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in (300_000, 28, 28, 1)])
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.inputs["image"].CopyFrom(tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=[0.5]))
    (tmp_path / WARMUP_FILE).parent.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(tmp_path / WARMUP_FILE)) as writer:
        writer.write(log.SerializeToString())
    tracemalloc.start()
    try:
        with pytest.raises(VersionRejected, match=r"shape .300000, 28, 28, 1."):
            replay_warmup(tmp_path, "image", lambda images: np.zeros((len(images), 10)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated for a 60-byte record"
