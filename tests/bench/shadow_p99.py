"""Does a shadow add to the serving latency? Same server, same run, phases alternating.

gunicorn as `make serve` runs it (2 workers) serves ``digits`` versions 1 and 2 (two
copies of one CNN: the shadow costs as much as the serving version, the worst case) from
a MODEL_CONFIG_FILE. Phases of 400 requests from 4 concurrent clients (one real digit
each, PNG) alternate between no shadow and ``shadow 100`` on version 1 (every request
copied); each phase's p50 and p99 are printed. BENCHMARKS.md, "Shadow comparison".

    python -m tests.bench.shadow_p99 models/mnist_cnn/1
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from tests.conftest import start_server, stop_server, wait_until
from training.data import load_mnist

CONFIG = """model_config_list {{ config {{
  name: "digits" base_path: "digits"
  model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
  version_labels {{ key: "stable" value: 2 }} version_labels {{ key: "candidate" value: 1 }}
}} }}
{rule}"""
PHASES, REQUESTS, CLIENTS = 6, 400, 4


def main(source: Path) -> None:
    root = Path(tempfile.mkdtemp())
    for version in ("1", "2"):
        shutil.copytree(source, root / "models" / "digits" / version)
    config = root / "models.config"
    config.write_text(CONFIG.format(rule=""))
    mnist = load_mnist(keras_home=root / "keras", download=None)
    buffer = io.BytesIO()
    Image.fromarray(mnist.x_test[0]).save(buffer, format="PNG")
    body = buffer.getvalue()
    server = start_server(root / "models", root / "gunicorn.log", MODEL_NAME="digits",
                          MODEL_CONFIG_FILE=str(config), MODEL_POLL_SECONDS="0.25")
    try:
        for phase in range(PHASES):
            shadow = phase % 2 == 1
            offset = len(server.log())
            staged = root / "new.config"
            staged.write_text(CONFIG.format(
                rule="# rollout: digits candidate shadow 100\n" if shadow else ""))
            os.replace(staged, config)
            wait_until(lambda start=offset: server.log()[start:].count("in force") >= 2,
                       "config read")

            def one(_: int) -> float:
                began = time.perf_counter()
                answer = requests.post(f"{server.url}/predict", data=body, timeout=30,
                                       headers={"Content-Type": "image/png"})
                answer.raise_for_status()
                return time.perf_counter() - began

            with ThreadPoolExecutor(CLIENTS) as pool:
                times = np.array(list(pool.map(one, range(REQUESTS)))) * 1000
            compared = requests.get(f"{server.url}/models/digits", timeout=30).json()["shadow"]
            print(f"phase {phase} shadow={'100%' if shadow else 'off '}: p50 "
                  f"{np.percentile(times, 50):.1f} ms, p99 {np.percentile(times, 99):.1f} ms;"
                  f" compared so far {sum(r['compared'] for r in compared)}", flush=True)
    finally:
        stop_server(server)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
