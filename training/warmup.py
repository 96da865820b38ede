"""Warm-up records in TensorFlow Serving's format, written with each export.

TF Serving replays ``assets.extra/tf_serving_warmup_requests`` — a TFRecord file of
``PredictionLog`` messages — when it loads a version, before the version takes
requests, so the first real requests do not pay for graph tracing and kernel setup
(https://www.tensorflow.org/tfx/serving/saved_model_warmup). Each export here carries
one: real test digits at a handful of batch sizes, in ``PredictRequest``s of
``tensorflow-serving-api``'s own messages. This server replays the same file
(app/warmup.py), and so would TF Serving given the same version folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.export_format import SIGNATURE, WARMUP_FILE

BATCH_SIZES = (1, 2, 8, 32)  # one record each: 43 test digits, ~135 KB
WARMUP_DIGITS = sum(BATCH_SIZES)


def write_warmup_requests(folder: Path, model_name: str, input_name: str,
                          images: np.ndarray, batch_sizes: Sequence[int] = BATCH_SIZES
                          ) -> Path:
    """Write one PredictRequest per batch size, each of the next ``size`` digits of
    ``images`` (float32, (N, 28, 28, 1) in [0, 1], as the signature takes them)."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    if len(images) < sum(batch_sizes):
        raise ValueError(f"{sum(batch_sizes)} images are needed, got {len(images)}")
    path = folder / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    start = 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for size in batch_sizes:
            batch = np.asarray(images[start:start + size], np.float32)
            start += size
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE),
                inputs={input_name: tf.make_tensor_proto(batch)})
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path
