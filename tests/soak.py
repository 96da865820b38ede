"""Soak and chaos against a real gunicorn: mixed valid and bad requests at concurrency,
then a worker SIGKILLed and the master SIGTERMed under load; then the same soak through
nginx in front of gunicorn (``make serve-proxy``).

``python -m tests.soak --requests 100000 --concurrency 64`` (``make soak``) trains a quick
model if none is given, starts gunicorn on loopback, and prints one JSON report;
tests/test_soak.py runs the same code with a few thousand requests. Figures the soak
checks: no status other than the one each request kind must get; each worker's resident
memory grows at most RSS_GROWTH_MB; the p99 latency of the last 10% of requests is at
most 1.5× that of the first 10% (after a warm-up).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from tests.conftest import (
    ROOT,
    Server,
    child_pids,
    rss_mb,
    start_server,
    stop_server,
    wait_until,
)
from tests.deploy.slow_clients import Proxy, start_proxy, stop_proxy
from tests.restyle import canvas_seven, encode, ink_on_paper
from training.data import load_mnist

RSS_GROWTH_MB = 50
P99_RATIO = 1.5
WARM_UP = 500  # requests sent before memory and latency are first measured
TERMINATE_MAX_REQUESTS = 100_000  # far more than the load before SIGTERM and the stop send


@dataclass(frozen=True)
class Kind:
    """One kind of request and the one status it must get."""

    name: str
    path: str
    body: bytes
    headers: dict
    status: int


def request_kinds(mnist) -> list[Kind]:
    """Valid requests of every form and protocol, and bad ones of every typed error."""
    digit = ink_on_paper(mnist.x_test[0], np.random.default_rng(0)).convert("RGB")
    png, jpeg = encode(digit, "PNG"), encode(digit, "JPEG")
    npy = io.BytesIO()
    np.save(npy, mnist.x_test[:8])
    arrays = json.dumps({"instances": (mnist.x_test[:4] / 255).round(3).tolist()}).encode()
    b64 = json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}]}).encode()
    v2 = json.dumps({"inputs": [{"name": "image", "shape": [2, 784], "datatype": "UINT8",
                                 "data": mnist.x_test[:2].ravel().tolist()}]}).encode()
    element = struct.pack("<I", len(jpeg)) + jpeg
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(element)}}]})
    image, js = {"Content-Type": "image/png"}, {"Content-Type": "application/json"}
    return [
        Kind("png", "/predict", png, image, 200),
        Kind("jpeg", "/predict", jpeg, {"Content-Type": "image/jpeg"}, 200),
        Kind("canvas", "/predict", encode(canvas_seven(400), "PNG"), image, 200),
        Kind("npy", "/predict", npy.getvalue(), {"Content-Type": "application/x-npy"}, 200),
        Kind("json-arrays", "/predict", arrays, js, 200),
        Kind("tf-serving-b64", "/v1/models/mnist_cnn:predict", b64, js, 200),
        Kind("v2-json", "/v2/models/mnist_cnn/infer", v2, js, 200),
        Kind("v2-binary", "/v2/models/mnist_cnn/infer", header.encode() + element,
             {"Inference-Header-Content-Length": str(len(header))}, 200),
        Kind("text-as-png", "/predict", b"not an image\n" * 20, image, 400),
        Kind("truncated-png", "/predict", png[: len(png) // 2], image, 400),
        Kind("bad-json", "/predict", b'{"instances": [{"image": {}}]}', js, 400),
        Kind("27x28", "/predict", json.dumps({"instances": [[[0.5] * 28] * 27]}).encode(),
             js, 422),
        Kind("blank", "/predict", encode(Image.new("L", (64, 64), 255), "PNG"), image, 422),
        Kind("text-plain", "/predict", b"7", {"Content-Type": "text/plain"}, 415),
    ]


@dataclass
class Results:
    """Per request, in send order: its kind, status (or exception name), seconds, and
    when it started and ended (``perf_counter``)."""

    kinds: list[str] = field(default_factory=list)
    statuses: list[int | str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)

    def in_flight(self, moment: float) -> int:
        """Requests sent before ``moment`` and answered (or failed) after it."""
        return sum(start < moment < end for start, end in self.spans)

    def ended_before(self, moment: float) -> int:
        return sum(end < moment for _, end in self.spans)

    def unexpected(self, expected: dict[str, int]) -> Counter:
        return Counter((k, s) for k, s in zip(self.kinds, self.statuses, strict=True)
                       if expected[k] != s)


class Progress:
    """Requests finished so far, counted as they finish, so that a chaos step can wait
    until the load is under way instead of guessing a time."""

    def __init__(self):
        self.finished = 0
        self._cond = threading.Condition()

    def add(self) -> None:
        with self._cond:
            self.finished += 1
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 300) -> None:
        """Block until ``count`` requests have finished; fail after ``timeout`` s, a
        bound only a hung server reaches."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished >= count, timeout):
                raise AssertionError(f"only {self.finished} of {count} requests finished "
                                     f"within {timeout:.0f} s")


def send_load(url: str, kinds: list[Kind], count: int, concurrency: int,
              stop: threading.Event | None = None,
              progress: Progress | None = None) -> Results:
    """``count`` requests cycling through ``kinds`` from ``concurrency`` threads, each
    with its own keep-alive connection, as a pool of real clients would."""
    slots: list[tuple[str, int | str, float, float] | None] = [None] * count
    next_index = iter(range(count))
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while not (stop and stop.is_set()):
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            kind = kinds[index % len(kinds)]
            started = time.perf_counter()
            try:
                status: int | str = session.post(url + kind.path, data=kind.body,
                                                 headers=kind.headers, timeout=120).status_code
            except requests.RequestException as err:
                # A refused connection never reached the server; anything else (a reset,
                # a closed connection without an answer) is a request it dropped.
                status = "refused" if "Connection refused" in str(err) else type(err).__name__
                session = requests.Session()
            slots[index] = (kind.name, status, started, time.perf_counter())
            if progress is not None:
                progress.add()

    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    results = Results()
    for name, status, started, ended in filter(None, slots):
        results.kinds.append(name)
        results.statuses.append(status)
        results.seconds.append(ended - started)
        results.spans.append((started, ended))
    return results


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def soak(url: str, worker_rss_mb: Callable[[], dict[int, float]], kinds: list[Kind],
         count: int, concurrency: int) -> dict:
    """The soak: warm-up, then ``count`` requests to ``url``; figures as one dict.
    ``worker_rss_mb`` reads each gunicorn worker's resident memory."""
    send_load(url, kinds, WARM_UP, concurrency)
    before = worker_rss_mb()
    started = time.perf_counter()
    results = send_load(url, kinds, count, concurrency)
    elapsed = time.perf_counter() - started
    after = worker_rss_mb()
    tenth = max(1, len(results.seconds) // 10)
    expected = {kind.name: kind.status for kind in kinds}
    return {
        "requests": len(results.statuses), "concurrency": concurrency,
        "seconds": round(elapsed, 1), "rps": round(len(results.statuses) / elapsed, 1),
        "statuses": dict(Counter(map(str, results.statuses))),
        "unexpected": {f"{k} → {s}": n for (k, s), n in results.unexpected(expected).items()},
        "rss_mb_before": {str(p): round(v) for p, v in before.items()},
        "rss_mb_after": {str(p): round(v) for p, v in after.items()},
        "rss_growth_mb": max(after.get(p, 0) - v for p, v in before.items()),
        "p99_first_10pct_ms": round(p99(results.seconds[:tenth]) * 1000, 1),
        "p99_last_10pct_ms": round(p99(results.seconds[-tenth:]) * 1000, 1),
    }


def in_background(function: Callable[[], Results]) -> Callable[[], Results]:
    """Start ``function`` in a thread; the returned function waits for its Results."""
    box: dict[str, Results] = {}
    thread = threading.Thread(target=lambda: box.update(results=function()))
    thread.start()

    def results() -> Results:
        thread.join()
        return box["results"]
    return results


def kill_a_worker(server: Server, kinds: list[Kind], count: int, concurrency: int) -> dict:
    """SIGKILL one worker once a quarter of ``count`` requests are answered: only the
    requests it held may fail, and the master replaces it (its boot is in the log)."""
    victim = server.worker_pids()[0]
    boots = server.log().count("Booting worker with pid")
    progress = Progress()
    results = in_background(lambda: send_load(server.url, kinds, count, concurrency,
                                              progress=progress))
    progress.wait_for(count // 4)
    killed_at = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    load = results()
    wait_until(lambda: (server.log().count("Booting worker with pid") > boots
                        and len(server.worker_pids()) == 2), "the replacement worker", 120)
    expected = {kind.name: kind.status for kind in kinds}
    failed = load.unexpected(expected)
    return {"requests": len(load.statuses), "killed": victim,
            "finished_before_kill": load.ended_before(killed_at),
            "in_flight_at_kill": load.in_flight(killed_at),
            "failed": {f"{k} → {s}": n for (k, s), n in failed.items()},
            "failed_total": sum(failed.values()),
            "workers_after": server.worker_pids()}


def terminate_master(server: Server, kinds: list[Kind], concurrency: int) -> dict:
    """SIGTERM the master while ``concurrency`` clients keep sending: every request the
    server took must be answered; only connections it refused once closed may fail."""
    stop, progress = threading.Event(), Progress()
    results = in_background(lambda: send_load(
        server.url, kinds, TERMINATE_MAX_REQUESTS, concurrency, stop, progress))
    progress.wait_for(10 * concurrency)  # every client is sending by now
    signalled_at = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=60)
    stop.set()
    load = results()
    expected = {kind.name: kind.status for kind in kinds}
    failed = load.unexpected(expected)
    refused = sum(n for (_, s), n in failed.items() if s == "refused")
    return {"requests": len(load.statuses), "exit_code": server.process.returncode,
            "finished_before_signal": load.ended_before(signalled_at),
            "in_flight_at_signal": load.in_flight(signalled_at),
            "failed": {f"{k} → {s}": n for (k, s), n in failed.items()},
            "dropped": sum(failed.values()) - refused, "refused_after_close": refused}


def proxied_worker_rss_mb(proxy: Proxy) -> dict[int, float]:
    """The resident memory of the gunicorn workers behind ``make serve-proxy``: the
    children of the script's gunicorn child."""
    for pid in child_pids(proxy.process.pid):
        if b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return rss_mb(child_pids(pid))
    return {}


def soak_through_proxy(models: Path, log_path: Path, kinds: list[Kind], count: int,
                       concurrency: int) -> dict:
    """The same soak through nginx (``make serve-proxy``, deploy/nginx/)."""
    proxy = start_proxy(models, log_path)
    try:
        return soak(proxy.url, lambda: proxied_worker_rss_mb(proxy), kinds, count,
                    concurrency)
    finally:
        stop_proxy(proxy)


def quick_model(folder: Path) -> Path:
    """A one-epoch CNN on 2,000 images, exported into ``folder``: the soak measures the
    server, not the model."""
    subprocess.run([sys.executable, "-m", "training.fit", "--limit", "2000", "--epochs", "1",
                    "--models-dir", str(folder)], cwd=ROOT, check=True,
                   capture_output=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--direct-only", action="store_true",
                        help="skip the soak through nginx (make serve-proxy)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="soak-"))
    models = args.models_dir or quick_model(scratch / "models")
    kinds = request_kinds(load_mnist())
    report = {}
    server = start_server(models, scratch / "soak.log")
    try:
        report["soak"] = soak(server.url, server.worker_rss_mb, kinds, args.requests,
                              args.concurrency)
        report["sigkill_worker"] = kill_a_worker(server, kinds, 3000, args.concurrency)
        report["sigterm_master"] = terminate_master(server, kinds, args.concurrency)
    finally:
        if server.process.poll() is None:
            stop_server(server)
        server.log_handle.close()
    if not args.direct_only:
        report["soak_through_nginx"] = soak_through_proxy(
            models, scratch / "proxy.log", kinds, args.requests, args.concurrency)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
