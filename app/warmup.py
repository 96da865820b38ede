"""Replaying a version's TF Serving warm-up records before it takes requests.

``assets.extra/tf_serving_warmup_requests`` (training/warmup.py writes it; TF Serving
reads the same file) holds ``PredictionLog``s of real requests. The store runs each one
through the freshly loaded SavedModel, in the poll thread, before the version is
swapped in: the first requests after a swap do not pay for the batch sizes the records
use, and a version that cannot answer its own records — a record that does not parse,
names another input, or gets anything but finite (N, 10) probabilities — is rejected
with that reason, as TF Serving fails the load of a version whose warm-up fails.

TF Serving's own rules are kept: at most 1,000 records, each a ``predict_log``. Only the
SavedModel runtime replays them: reading the records needs TensorFlow's messages, and a
LiteRT worker (PREFER_TFLITE_MODEL) never imports TensorFlow, so it keeps its warm-up
on blank images alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from app.servable import VersionRejected
from training.export_format import WARMUP_FILE, WARMUP_MAX_RECORDS

MAX_IMAGES = 1024  # in one record: a warm-up batch, not a benchmark


def replay_warmup(folder: Path, input_name: str,
                  predict: Callable[[np.ndarray], np.ndarray]) -> int:
    """Run every warm-up record of ``folder`` (none: 0); the count replayed. Raises
    VersionRejected naming the record and what was wrong with it."""
    path = folder / WARMUP_FILE
    if not path.is_file():
        return 0
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    try:
        records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path))
                   .take(WARMUP_MAX_RECORDS + 1)]
    except Exception as err:  # noqa: BLE001 - a corrupt file raises DataLossError & co
        raise VersionRejected.because(f"{WARMUP_FILE} is no TFRecord file", err) from None
    if len(records) > WARMUP_MAX_RECORDS:
        raise VersionRejected(f"{WARMUP_FILE} has more than {WARMUP_MAX_RECORDS} records")
    for number, record in enumerate(records, 1):
        where = f"warm-up record {number} of {len(records)}"
        try:
            log = prediction_log_pb2.PredictionLog.FromString(record)
            if log.WhichOneof("log_type") != "predict_log":
                raise VersionRejected(f"{where} is no predict_log "
                                      f"({log.WhichOneof('log_type') or 'empty'})")
            inputs = log.predict_log.request.inputs
            if set(inputs) != {input_name}:
                raise VersionRejected(f"{where} names inputs {sorted(inputs)[:3]}, "
                                      f"not the model's {input_name!r}")
            tensor = inputs[input_name]
            dtype = np.dtype(tf.dtypes.as_dtype(tensor.dtype).as_numpy_dtype)
            shape = tuple(dim.size for dim in tensor.tensor_shape.dim)
            # checked from the message, before make_ndarray: a few bytes may declare
            # any shape and make_ndarray fills it (one float_val: gigabytes); and a
            # wrong shape reaching the graph can abort the process
            if dtype.kind != "f" or len(shape) != 4 or shape[1:] != (28, 28, 1) or \
                    not 1 <= shape[0] <= MAX_IMAGES:
                raise VersionRejected(f"{where} holds a {dtype} tensor of shape "
                                      f"{shape}, expected float (N, 28, 28, 1)")
            images = tf.make_ndarray(tensor)
            outputs = predict(images.astype(np.float32))
        except VersionRejected:
            raise
        except Exception as err:  # noqa: BLE001 - any failure disqualifies the version
            raise VersionRejected.because(f"{where} failed", err) from None
        if outputs.shape != (len(images), 10) or not np.all(np.isfinite(outputs)):
            raise VersionRejected(f"{where} gave outputs of shape {outputs.shape} "
                                  f"(finite: {bool(np.all(np.isfinite(outputs)))}), "
                                  f"expected ({len(images)}, 10) finite")
    return len(records)
