"""The first 100 requests after a version loads, with and without its warm-up records.

One fresh process per run: copy the version, drop its TF Serving warm-up records (file
and manifest entry) for ``without``, load it as the store does (``warm_up_to`` is
BATCH_MAX_SIZE: the blank-image warm-up's largest batch), then time 100 direct calls of
1, 2, 8, 32, 3, 5 and 17 real test digits in turn. BENCHMARKS.md, "Warm-up records".

    python -m tests.bench.first_requests models/mnist_cnn/1 with 1
"""
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app.model_store import load_version
from app.repository import Scanner
from training.data import load_mnist, to_model_input
from training.export_format import METADATA_FILE, WARMUP_FILE, write_json

source, label, warm = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
mnist = load_mnist(keras_home=Path(tempfile.mkdtemp()), download=None)
images = to_model_input(mnist.x_test[1000:2000])
root = Path(tempfile.mkdtemp())
shutil.copytree(source, root / "m" / "1")
if label == "without":
    bare = root / "m" / "1"
    shutil.rmtree(bare / "assets.extra")
    meta = json.loads((bare / METADATA_FILE).read_text())
    meta["files"].pop(WARMUP_FILE)
    write_json(bare / METADATA_FILE, meta)
import tensorflow  # noqa: E402,F401 - imported before the load in both cases

found = Scanner(root).scan_model(root / "m").versions[1]
model = load_version("m", found, warm_up_to=warm)
times, start = [], 0
for i in range(100):
    size = (1, 2, 8, 32, 3, 5, 17)[i % 7]
    batch = images[start % 900:start % 900 + size]
    start += size
    began = time.perf_counter()
    model.predict(batch)
    times.append(time.perf_counter() - began)
print(f"{label} warm_up_to={warm}: p99 {np.percentile(times, 99) * 1000:.2f} ms, "
      f"max {max(times) * 1000:.2f} ms, median {np.median(times) * 1000:.2f} ms, "
      f"load {model.load_seconds:.2f} s")
