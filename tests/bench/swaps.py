"""`make bench-swaps`: each worker's memory over many hot swaps (BENCHMARKS.md, "Memory
over hot swaps").

A real gunicorn (two workers, as `make serve`) watches a scratch MODELS_DIR. Each cycle
publishes a copy of the newest version as the next one (staged under a hidden name, then
renamed, as an operator would), waits until every worker has loaded it and released the
one before, while a burst of concurrent requests for a real digit is answered (some by
the old version, some by the new), then deletes the old folder. Each worker's resident
memory (VmRSS) is read after the first version and after every ``--every`` cycles, and
the table of both runtimes is printed as Markdown.

``python -m tests.bench.swaps --cycles 100`` trains a quick CNN (2,000 images, one epoch)
unless ``--export`` names a version folder. Extra server settings go in as ``--env
NAME=VALUE`` (e.g. ``--env MALLOC_ARENA_MAX=2``) to compare allocator settings.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

from tests.conftest import Server, run_fit, start_server, stop_server
from training.data import load_mnist

MODEL = "mnist_cnn"
RUNTIMES = {"savedmodel": {}, "litert": {"PREFER_TFLITE_MODEL": "1"}}
COLLECTED = re.compile(r"collected \d+ unreachable objects after a swap in ([\d.]+) ms")
WAIT_SECONDS = 300  # for one swap on a loaded 2-core machine: far beyond a load's time


def train(scratch: Path) -> Path:
    """A quick real CNN export: the model the service serves by default."""
    result = run_fit("--limit", "2000", "--epochs", "1", "--models-dir", str(scratch))
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    return scratch / MODEL / "1"


def digit_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(load_mnist(download=None).x_test[0]).save(buffer, "PNG")
    return buffer.getvalue()


def publish(models_dir: Path, version: int) -> None:
    """Version ``version`` as a fresh copy of ``version - 1``: new inodes, a new
    fingerprint, so every worker loads it as a new version."""
    staged = models_dir / MODEL / f".tmp-{version}"
    shutil.copytree(models_dir / MODEL / str(version - 1), staged)
    staged.rename(models_dir / MODEL / str(version))


def wait_for(server: Server, line: str, count: int) -> None:
    """Until the server's log holds ``line`` ``count`` times (once per worker)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while server.log().count(line) < count:
        if time.monotonic() > deadline or server.process.poll() is not None:
            raise RuntimeError(f"no {count}× {line!r} in {WAIT_SECONDS} s:\n"
                               f"{server.log()[-3000:]}")
        time.sleep(0.2)


def predict(server: Server, png: bytes, count: int) -> None:
    """``count`` predictions at once, as concurrent clients send them: they spread over
    the workers' threads, and so over glibc's per-thread arenas."""
    def one(_: int) -> None:
        response = requests.post(f"{server.url}/predict", data=png, timeout=60,
                                 headers={"Content-Type": "image/png"})
        response.raise_for_status()

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))


def run(export: Path, scratch: Path, runtime: str, cycles: int, every: int, workers: int,
        requests_per_cycle: int, env: dict[str, str]) -> list[list[float]]:
    """Rows of [cycle, RSS of each worker in MB], from cycle 0 (first version loaded)."""
    models_dir = scratch / runtime
    shutil.copytree(export, models_dir / MODEL / "1")
    server = start_server(models_dir, scratch / f"{runtime}.log", WORKERS=str(workers),
                          MODEL_POLL_SECONDS="0.5", CPU_AFFINITY="off",
                          **RUNTIMES[runtime], **env)
    png, rows = digit_png(), []
    try:
        pids = sorted(server.worker_pids())
        predict(server, png, requests_per_cycle)
        for cycle in range(cycles + 1):
            if cycle:
                publish(models_dir, cycle + 1)
                with ThreadPoolExecutor(1) as clients:  # requests in flight across the swap
                    burst = clients.submit(predict, server, png, requests_per_cycle)
                    wait_for(server, f'released {MODEL} version {cycle}"', workers)
                    burst.result()
                shutil.rmtree(models_dir / MODEL / str(cycle))
            if cycle % every == 0:
                if sorted(server.worker_pids()) != pids:
                    raise RuntimeError(f"a worker was replaced:\n{server.log()[-3000:]}")
                sizes = server.worker_rss_mb()
                rows.append([cycle, *(sizes[pid] for pid in pids)])
                print(f"{runtime} cycle {cycle:4d}: " + "  ".join(
                    f"{size:7.1f} MB" for size in rows[-1][1:]), flush=True)
    finally:
        stop_server(server)
    collections = [float(ms) for ms in COLLECTED.findall(server.log())]
    if collections:
        print(f"{runtime}: {len(collections)} collections after swaps, median "
              f"{statistics.median(collections):.1f} ms, max {max(collections):.1f} ms")
    return rows


def table(results: dict[str, list[list[float]]]) -> str:
    """Markdown: RSS of each worker per runtime, and its growth since cycle 1's row."""
    names = list(results)
    workers = len(next(iter(results.values()))[0]) - 1
    head = ["cycle"] + [f"{name} w{w + 1} MB" for name in names for w in range(workers)]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---:"] * len(head)) + " |"]
    for index, (cycle, *_) in enumerate(next(iter(results.values()))):
        cells = [str(int(cycle))]
        for name in names:
            first = results[name][0]
            for w in range(workers):
                size = results[name][index][w + 1]
                cells.append(f"{size:.0f} ({size - first[w + 1]:+.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--every", type=int, default=10, help="read RSS every N cycles")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16,
                        help="concurrent predictions per cycle")
    parser.add_argument("--runtime", choices=[*RUNTIMES, "both"], default="both")
    parser.add_argument("--export", type=Path, help="a version folder to copy (else train)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra server setting (repeatable)")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    runtimes = list(RUNTIMES) if args.runtime == "both" else [args.runtime]
    with tempfile.TemporaryDirectory(prefix="bench-swaps-") as tmp:
        scratch = Path(tmp)
        export = args.export or train(scratch / "trained")
        results = {runtime: run(export, scratch, runtime, args.cycles, args.every,
                                args.workers, args.requests, env) for runtime in runtimes}
    print(table(results))


if __name__ == "__main__":
    main()
