"""Shared fixtures: the real MNIST set, small real files made from it, a trained export."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import requests

from training.data import Mnist, load_mnist

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
# Every worker binds GRPC_PORT with SO_REUSEPORT (app/grpc_server.py), and a second
# server refuses to start on a taken one: servers the tests start, in whatever way, get
# gRPC only where a test gives them a free port (``start_server`` does).
os.environ.setdefault("GRPC_PORT", "0")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file the way the original distribution does."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_idx_folder(folder: Path, mnist: Mnist, separator: str = "-", suffix: str = ""
                     ) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = {"train-images": mnist.x_train, "train-labels": mnist.y_train,
             "t10k-images": mnist.x_test, "t10k-labels": mnist.y_test}
    for stem, array in names.items():
        kind = "idx3-ubyte" if array.ndim == 3 else "idx1-ubyte"
        write_idx(folder / f"{stem}{separator}{kind}{suffix}", array)
    return folder


def write_npz(path: Path, mnist: Mnist) -> Path:
    """A Keras-format mnist.npz: uint8 labels, as keras.datasets writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=mnist.x_train, y_train=mnist.y_train.astype(np.uint8),
             x_test=mnist.x_test, y_test=mnist.y_test.astype(np.uint8))
    return path


@pytest.fixture(scope="session")
def mnist(tmp_path_factory) -> Mnist:
    """All 70,000 real images, from the offline copy that `make install` provides."""
    empty_keras_home = tmp_path_factory.mktemp("keras_home")
    return load_mnist(keras_home=empty_keras_home, download=None)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.fixture(scope="session")
def png_bomb() -> bytes:
    """A valid 20000×20000 grayscale PNG of zeros: 400 MB of pixels in ~400 KB."""
    side = 20_000
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def small_mnist(mnist) -> Mnist:
    """The first 300 training and 100 test images: real digits, small files."""
    return Mnist(mnist.x_train[:300], mnist.y_train[:300], mnist.x_test[:100],
                 mnist.y_test[:100], source="slice of the real set")


@dataclass(frozen=True)
class FitRun:
    """One finished `python -m training.fit` subprocess and where it exported."""

    models_dir: Path
    version_dir: Path
    stdout: str


def run_module(module: str, *args: str, env: dict[str, str] | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command line (``python -m module``) in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_fit(*args: str, env: dict[str, str] | None = None, timeout: int = 600
            ) -> subprocess.CompletedProcess:
    """Run the real training CLI in a fresh interpreter, as a user would."""
    return run_module("training.fit", *args, env=env, timeout=timeout)


def side_by_side(*calls: Callable[[], T]) -> list[T]:
    """Each call's result, the calls run at the same time (each in a thread of its own).

    For independent training subprocesses: most of a short run's wall time is one core
    busy (importing TensorFlow, reading MNIST, evaluating, exporting), so two runs side by
    side on two cores take little more than the longer one alone."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


class Background:
    """Session work started ahead of the fixture that needs it, each piece once."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=4)
        self._started: dict[str, Future] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._started

    def __getitem__(self, key: str) -> Future:
        return self._started[key]

    def start(self, key: str, call: Callable[[], T]) -> Future:
        """Start ``call`` under ``key`` unless it already started; its future."""
        if key not in self._started:
            self._started[key] = self._pool.submit(call)
        return self._started[key]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def background():
    """Where session fixtures start work early: a subprocess training the fit_run model
    runs beside served_models' three, not after them (see side_by_side)."""
    pool = Background()
    yield pool
    pool.close()


def train_fit_run(models_dir: Path) -> FitRun:
    result = run_fit("--limit", "2000", "--epochs", "1", "--models-dir", str(models_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return FitRun(models_dir, models_dir / "mnist_cnn" / "1", result.stdout)


def start_fit_run(background: Background, tmp_path_factory) -> Future:
    """fit_run's training, started once; its folder is made here, in pytest's thread."""
    if "fit_run" not in background:
        models_dir = tmp_path_factory.mktemp("models")
        background.start("fit_run", lambda: train_fit_run(models_dir))
    return background["fit_run"]


@pytest.fixture(scope="session")
def fit_run(background, tmp_path_factory) -> FitRun:
    """The served CNN trained for one epoch on 2,000 real images and exported."""
    return start_fit_run(background, tmp_path_factory).result()


@pytest.fixture(scope="session")
def served_models(request, background, tmp_path_factory) -> Path:
    """A MODELS_DIR as training leaves it: the CNN (one epoch on all 55,000 training
    images, ~98% accurate), the tiny net, and the NumPy-trained tiny net, each trained
    for real by its command line.

    The three train side by side, and fit_run's too when a collected test needs it: the
    big CNN keeps about one core busy, the others fill the second."""
    if any("fit_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        start_fit_run(background, tmp_path_factory)
    models_dir = tmp_path_factory.mktemp("served_models")
    into = ("--models-dir", str(models_dir))  # each run writes its own model's folder
    results = side_by_side(
        lambda: run_fit("--epochs", "1", *into),
        lambda: run_fit("--arch", "tiny", "--name", "mnist_tiny", "--limit", "10000",
                        "--epochs", "2", *into),
        # the NumPy net, served next to the others
        lambda: run_module("training.scratch", "--limit", "10000", "--epochs", "1", *into))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return models_dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A real gunicorn serving the app on a loopback port."""

    url: str
    process: subprocess.Popen
    log_path: Path
    log_handle: object
    grpc: str = ""  # host:port of its gRPC server ("" when GRPC_PORT is 0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        """The gunicorn master's children: its workers, now."""
        return child_pids(self.process.pid)

    def worker_rss_mb(self, field: str = "VmRSS") -> dict[int, float]:
        """Each worker's resident memory (VmRSS), or its peak so far (``VmHWM``), in MB."""
        return rss_mb(self.worker_pids(), field)


def child_pids(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def rss_mb(pids: list[int], field: str = "VmRSS") -> dict[int, float]:
    """Each process's resident memory (or ``VmHWM``, its peak so far) in MB."""
    sizes = {}
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                sizes[pid] = int(line.split()[1]) / 1024
    return sizes


def start_server(models_dir: Path, log_path: Path, **env: str) -> Server:
    """Start gunicorn exactly as `make serve` does (gRPC on a free port unless GRPC_PORT
    is given) and wait until /ready answers 200."""
    port = free_port()
    environment = {**os.environ, "MODELS_DIR": str(models_dir), "PORT": str(port),
                   "WORKERS": "2", "GRPC_PORT": str(free_port()), **env}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    handle = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py", "app:create_app()"],
        cwd=ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT)
    grpc_port = int(environment["GRPC_PORT"])
    server = Server(f"http://127.0.0.1:{port}", process, log_path, handle,
                    f"127.0.0.1:{grpc_port}" if grpc_port else "")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            handle.close()
            raise RuntimeError(f"gunicorn exited with {process.returncode}:\n{server.log()}")
        try:
            if requests.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except requests.RequestException:  # not listening yet, or workers still loading
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"gunicorn was not ready within 90 s:\n{server.log()}")


def end_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """TERM, then KILL once ``timeout`` passes: a child that ignores TERM must not
    outlive the test that started it."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_server(server: Server) -> None:
    end_process(server.process)
    server.log_handle.close()


@contextmanager
def serving(site: socketserver.BaseServer) -> Iterator[socketserver.BaseServer]:
    """``site`` answering on its own thread inside the block, shut down and closed after."""
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        yield site
    finally:
        site.shutdown()
        site.server_close()


@pytest.fixture(scope="session")
def server(served_models, tmp_path_factory):
    """gunicorn with two workers serving the trained models, for the whole session."""
    running = start_server(served_models, tmp_path_factory.mktemp("server") / "gunicorn.log")
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def url(server) -> str:
    return server.url


@pytest.fixture(scope="session")
def two_versions(served_models, tmp_path_factory) -> Path:
    """A MODELS_DIR where model ``digits`` has two real, different versions: version 1 is
    the trained tiny net, version 2 the trained CNN (so each answers recognisably)."""
    models_dir = tmp_path_factory.mktemp("two_versions")
    shutil.copytree(served_models / "mnist_tiny" / "1", models_dir / "digits" / "1")
    shutil.copytree(served_models / "mnist_cnn" / "1", models_dir / "digits" / "2")
    return models_dir


@pytest.fixture(scope="session")
def pinning_server(two_versions, tmp_path_factory):
    """gunicorn loading both versions of ``digits`` (MODEL_VERSION_POLICY=all)."""
    running = start_server(two_versions, tmp_path_factory.mktemp("pinning") / "gunicorn.log",
                           MODEL_NAME="digits", MODEL_VERSION_POLICY="all", WORKERS="1")
    yield running
    stop_server(running)


def foreign_saved_model(model, folder: Path) -> Path:
    """``model`` as another tool would leave it in a version folder: a SavedModel with a
    manifest and a summary, but no signature in its metadata (our exporter refuses to
    publish a network that is no MNIST classifier); only its graph tells."""
    from training.export_format import METADATA_FILE, manifest, write_json
    from training.summary import summarize_model

    model.export(str(folder), format="tf_saved_model", verbose=False)
    write_json(folder / METADATA_FILE, {"summary": summarize_model(model),
                                        "files": manifest(folder)})
    return folder


@pytest.fixture(scope="session")
def foreign_exports(tmp_path_factory) -> dict[str, Path]:
    """Real, complete exports that no MNIST server should serve: a SavedModel for
    32×32 colour images, and a net whose weights are NaN (it fails at warm-up)."""
    import keras

    from training.export import export_version
    from training.summary import summarize_model

    wrong_shape = keras.Sequential([keras.Input((32, 32, 3), name="image"),
                                    keras.layers.Flatten(),
                                    keras.layers.Dense(10, activation="softmax")])
    nan_outputs = keras.Sequential([keras.Input((28, 28, 1), name="image"),
                                    keras.layers.Flatten(),
                                    keras.layers.Dense(10, activation="softmax")])
    nan_outputs.set_weights([np.full(w.shape, np.nan, np.float32)
                             for w in nan_outputs.get_weights()])
    root = tmp_path_factory.mktemp("foreign")
    return {"wrong_shape": foreign_saved_model(wrong_shape, root / "wrong_shape"),
            "nan_outputs": export_version(nan_outputs, root / "nan_outputs",
                                          {"summary": summarize_model(nan_outputs)})}


PREDICT_TOKEN = "predict-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"  # listed by its SHA-256 only
TOKENS = (f"# who may call\n{PREDICT_TOKEN} predict\n\n"
          f"sha256:{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()} admin  # ops\n")


@pytest.fixture(scope="session")
def origin_site(tmp_path_factory):
    """A page server on another port: http://127.0.0.1:<port> is the allowed origin,
    http://localhost:<port> the same page on an origin that is not."""
    folder = tmp_path_factory.mktemp("origin")
    (folder / "index.html").write_text("<!doctype html><title>another site</title>")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args):
            super().__init__(*args, directory=str(folder))

        def log_message(self, *args) -> None:
            pass

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)) as site:
        yield site.server_address[1]


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(TOKENS)
    return path


@pytest.fixture(scope="session")
def secured(fit_run, tokens_file, origin_site, tmp_path_factory):
    """gunicorn (one worker) asking for the tokens in TOKENS, with CORS for origin_site's
    127.0.0.1 origin: tests/app/test_security.py and tests/test_fuzz.py call it."""
    running = start_server(fit_run.models_dir, tmp_path_factory.mktemp("secured") / "g.log",
                           WORKERS="1", AUTH_TOKENS_FILE=str(tokens_file),
                           CORS_ALLOWED_ORIGINS=f"http://127.0.0.1:{origin_site}")
    yield running
    stop_server(running)
    assert "Traceback" not in running.log(), running.log()[-3000:]


@pytest.fixture(scope="session")
def untrained_tiny(tmp_path_factory) -> Path:
    """An export of the tiny net with its random initial weights: answers differ
    recognisably from the trained CNN's. Tests copy it, never change it."""
    from training.export import export_version
    from training.models import build_tiny
    from training.summary import summarize_model

    keras_model = build_tiny()
    return export_version(keras_model, tmp_path_factory.mktemp("untrained") / "m",
                          {"summary": summarize_model(keras_model)})


def hold_model(app) -> tuple[threading.Event, list[int]]:
    """Make each call of the default model's batcher wait until the returned gate is set,
    recording its batch size in the returned list: for what queues behind a busy model."""
    batcher = app.extensions["model_store"].get().batcher
    real, gate, calls = batcher.predict, threading.Event(), []

    def held(images):
        calls.append(len(images))
        gate.wait(60)
        return real(images)

    batcher.predict = held
    return gate, calls


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until true; fail (never hang) if it is not within ``timeout`` s,
    a bound so far above the wait expected that only a real fault reaches it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.01)
