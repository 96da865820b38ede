"""Model updates under load, against real gunicorn (2 workers) watching a real MODELS_DIR:
a retrained version is served without a restart or a failed request, bad folders are
listed and never served, and a restarted worker serves what its sibling serves."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.app.test_model_store import BAD_FOLDERS, add_bad_folders
from tests.conftest import run_fit, start_server, stop_server

POLL_SECONDS = 1.0


@pytest.fixture(scope="module")
def digit_pngs(mnist) -> list[bytes]:
    blobs = []
    for image in mnist.x_test[:16]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    return blobs


class Clients:
    """Eight threads posting real digits until stopped, half of them over gRPC
    (tritonclient.grpc's ModelInfer, BYTES PNGs) when ``grpc_target`` is given; every
    answer is recorded. Each pauses briefly between requests, so that the training run
    beside them gets a core."""

    def __init__(self, url: str, pngs: list[bytes], concurrency: int = 8,
                 grpc_target: str = ""):
        self.url, self.pngs, self.grpc_target = url, pngs, grpc_target
        # (sent, answered, status, version, protocol), times from time.time() like the log's
        self.answers: list[tuple[float, float, int, int | None, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run_grpc if grpc_target and i % 2
                                          else self._run, args=(i,))
                         for i in range(concurrency)]

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, index: int) -> None:
        with requests.Session() as session:
            count = index
            while not self._stop.is_set():
                count += 1
                sent = time.time()
                try:
                    response = session.post(f"{self.url}/predict", timeout=30,
                                            data=self.pngs[count % len(self.pngs)],
                                            headers={"Content-Type": "image/png"})
                    version = response.json()["model"]["version"] if response.ok else None
                    self.answers.append((sent, time.time(), response.status_code, version,
                                         "REST"))
                except requests.RequestException:
                    self.answers.append((sent, time.time(), 0, None, "REST"))
                self._stop.wait(0.02)

    def _run_grpc(self, index: int) -> None:
        """The same over gRPC: OK is recorded as 200, any other code as 0."""
        import tritonclient.grpc as triton_grpc

        with triton_grpc.InferenceServerClient(self.grpc_target) as client:
            count = index
            while not self._stop.is_set():
                count += 1
                image = triton_grpc.InferInput("image", [1], "BYTES")
                image.set_data_from_numpy(np.array([self.pngs[count % len(self.pngs)]],
                                                   dtype=object))
                sent = time.time()
                try:
                    result = client.infer("mnist_cnn", [image], client_timeout=30)
                    version = int(result.get_response().model_version)
                    self.answers.append((sent, time.time(), 200, version, "gRPC"))
                except InferenceServerException:
                    self.answers.append((sent, time.time(), 0, None, "gRPC"))
                self._stop.wait(0.02)

    def versions_sent_after(self, moment: float) -> set[int | None]:
        return {version for sent, _, _, version, _ in self.answers if sent > moment}

    def count(self, version: int) -> int:
        return sum(answer[3] == version for answer in self.answers)


def wait_for(condition, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


@pytest.fixture
def watched_server(tmp_path, fit_run):
    models = tmp_path / "models"
    shutil.copytree(fit_run.version_dir, models / "mnist_cnn" / "1")
    server = start_server(models, tmp_path / "gunicorn.log",
                          MODEL_POLL_SECONDS=str(POLL_SECONDS))
    yield models, server
    stop_server(server)


def swap_times(log: str, version: int) -> list[float]:
    """When each worker logged its swap to ``version`` (the JSON log's ``time``)."""
    return [datetime.fromisoformat(json.loads(line)["time"]).timestamp()
            for line in log.splitlines()
            if f'"mnist_cnn now serves version(s) {version}"' in line]


@pytest.mark.slow
def test_a_retrained_version_is_served_without_restart_or_failed_requests(
        watched_server, digit_pngs):
    models, server = watched_server
    workers = len(worker_pids(server.process.pid))
    with Clients(server.url, digit_pngs, grpc_target=server.grpc) as clients:
        wait_for(lambda: clients.count(1) >= 16)  # every client is sending
        result = run_fit("--epochs", "1", "--limit", "500", "--models-dir", str(models),
                         timeout=1200)
        assert result.returncode == 0, result.stderr[-2000:]
        wait_for(lambda: len(swap_times(server.log(), 2)) == workers)
        swapped = max(swap_times(server.log(), 2))
        # Answers to requests sent after both swaps, from every client.
        wait_for(lambda: len([a for a in clients.answers if a[0] > swapped]) >= 32)
    statuses = [answer[2] for answer in clients.answers]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in statuses}
    # Once both workers have swapped, each request sent is answered by version 2.
    assert clients.versions_sent_after(swapped) == {2}
    assert {answer[3] for answer in clients.answers} == {1, 2}
    for protocol in ("REST", "gRPC"):  # each saw both versions, the same store
        assert {a[3] for a in clients.answers if a[4] == protocol} == {1, 2}, protocol
    print(f"\n{len(statuses)} requests (REST and gRPC) during the retrain and swap, 0 failed")


def worker_pids(master: int) -> set[int]:
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            pids.add(int(stat.parent.name))
    return pids


def index_rows(url: str) -> dict[str, tuple[str, str]]:
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        return {row["version"]: (row["state"], row.get("reason", ""))
                for row in client.get_model_repository_index() if row["name"] == "mnist_cnn"}
    finally:
        client.close()


@pytest.mark.slow
def test_bad_folders_are_listed_never_served_and_a_restarted_worker_agrees(
        watched_server, fit_run, foreign_exports, digit_pngs):
    models, server = watched_server
    model_dir = models / "mnist_cnn"
    good = shutil.copytree(fit_run.version_dir, model_dir / "2")
    add_bad_folders(model_dir, good, foreign_exports)

    def settled() -> bool:
        """Every folder listed and version 2 served by whichever worker answers."""
        rows = index_rows(server.url)
        return set(rows) >= set(BAD_FOLDERS) | {"1", "2"} and rows["2"][0] == "READY"

    def swapped_to_2() -> int:
        """How many workers have logged their swap to version 2 (each logs it once)."""
        return server.log().count("mnist_cnn now serves version(s) 2")

    # Both workers, not just the ones that happened to answer: neither may serve 1 below.
    wait_for(lambda: swapped_to_2() >= len(worker_pids(server.process.pid)) and settled())
    rows = index_rows(server.url)
    assert rows["2"] == ("READY", "")
    assert rows["1"][0] == "UNAVAILABLE"
    for folder, reason in BAD_FOLDERS.items():
        assert rows[folder][0] == "UNAVAILABLE" and reason in rows[folder][1], folder
    ready_only = requests.post(f"{server.url}/v2/repository/index", json={"ready": True},
                               timeout=10).json()
    assert ready_only == [{"name": "mnist_cnn", "version": "2", "state": "READY"}]
    described = requests.get(f"{server.url}/models/mnist_cnn", timeout=10).json()
    assert set(described["rejected"]) == set(BAD_FOLDERS)
    assert requests.get(f"{server.url}/ready", timeout=10).status_code == 200

    before = worker_pids(server.process.pid)
    os.kill(min(before), signal.SIGKILL)
    wait_for(lambda: len(worker_pids(server.process.pid) - before) == 1)
    wait_for(lambda: swapped_to_2() > len(before))  # the new worker's own scan took 2
    with requests.Session() as session:
        wait_for(lambda: session.get(f"{server.url}/ready", timeout=10).status_code == 200)
        answers = [session.post(f"{server.url}/predict", data=digit_pngs[i % 16], timeout=30,
                                headers={"Content-Type": "image/png"}) for i in range(60)]
        readiness = [session.get(f"{server.url}/ready", timeout=10) for _ in range(20)]
    assert {(a.status_code, a.json()["model"]["version"]) for a in answers} == {(200, 2)}
    assert {(r.status_code, r.json()["models"]["mnist_cnn"]) for r in readiness} == {(200, 2)}
    # gRPC too: the new worker bound GRPC_PORT beside its sibling (SO_REUSEPORT), and
    # calls on new connections, which the kernel spreads over both, answer version 2.
    assert server.log().count("gRPC serving on port") == len(before) + 1
    assert grpc_versions(server.grpc, digit_pngs[:30]) == {"2"}
    assert "not serving" in server.log() and "Traceback" not in server.log()


def grpc_versions(target: str, pngs: list[bytes]) -> set[str]:
    """The model version that answers each PNG, one new gRPC connection per call."""
    import tritonclient.grpc as triton_grpc

    versions = set()
    for png in pngs:
        with triton_grpc.InferenceServerClient(target) as client:
            image = triton_grpc.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array([png], dtype=object))
            versions.add(client.infer("mnist_cnn", [image], client_timeout=30)
                         .get_response().model_version)
    return versions


HOSTILE = {"3": "a symlink that leads outside MODELS_DIR",
           "4": "a file, not a folder",
           "5": "unreadable metadata.json: metadata.json is a FIFO, not a regular file",
           "8": "a symlink loop"}


def add_hostile_entries(models: Path, good: Path) -> None:
    """What an attack on the watch used: a FIFO as metadata.json (it held the poll and a
    booting worker), a link loop as a version (it took the model down), a link to /usr
    (walked every poll), a file as a version, and a loop at the top level."""
    model_dir = models / "mnist_cnn"
    (model_dir / "3").symlink_to("/usr")
    (model_dir / "4").write_text("a file where a version belongs")
    fifo = shutil.copytree(good, model_dir / "5")
    (fifo / "metadata.json").unlink()
    os.mkfifo(fifo / "metadata.json")
    (model_dir / "8").symlink_to("8")
    (models / "loop").symlink_to("loop")


def repository_index(url: str) -> dict[tuple[str, str], tuple[str, str]]:
    rows = requests.post(f"{url}/v2/repository/index", timeout=10).json()
    return {(row["name"], row["version"]): (row["state"], row.get("reason", ""))
            for row in rows}


@pytest.mark.slow
def test_hostile_entries_are_listed_alone_and_never_hold_the_watch_or_a_booting_worker(
        watched_server, fit_run):
    models, server = watched_server
    add_hostile_entries(models, fit_run.version_dir)
    wait_for(lambda: all(repository_index(server.url).get(("mnist_cnn", entry))
                         == ("UNAVAILABLE", reason) for entry, reason in HOSTILE.items()))
    assert requests.get(f"{server.url}/ready", timeout=10).status_code == 200
    shutil.copytree(fit_run.version_dir, models / "mnist_cnn" / ".tmp-9").rename(
        models / "mnist_cnn" / "9")  # published after the hostile entries
    staged = shutil.copytree(fit_run.version_dir, models / "mnist_cnn" / ".tmp-10")
    (staged / "plots" / "history.png").unlink()
    (staged / "plots" / "history.png").symlink_to("/etc/passwd")
    staged.rename(models / "mnist_cnn" / "10")  # newest, refused alone
    hostile = {**HOSTILE, "10": "plots/history.png is a symlink, not a regular file"}

    def swapped_to_9() -> int:
        return server.log().count("mnist_cnn now serves version(s) 9")

    wait_for(lambda: swapped_to_9() >= len(worker_pids(server.process.pid)))
    wait_for(lambda: repository_index(server.url).get(("mnist_cnn", "10"))
             == ("UNAVAILABLE", hostile["10"]))
    index = repository_index(server.url)
    assert index[("mnist_cnn", "9")] == ("READY", "")
    for entry, reason in hostile.items():
        assert index[("mnist_cnn", entry)] == ("UNAVAILABLE", reason), entry
    assert index[("loop", "")] == ("UNAVAILABLE", "a symlink loop")
    listed = requests.get(f"{server.url}/models", timeout=10).json()
    assert listed["rejected"] == {"loop": "a symlink loop"}
    assert listed["models"][0]["rejected"] == hostile
    plot = requests.get(f"{server.url}/models/mnist_cnn/plots/history.png", timeout=10)
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")

    before = worker_pids(server.process.pid)
    os.kill(min(before), signal.SIGKILL)
    wait_for(lambda: len(worker_pids(server.process.pid) - before) == 1)
    wait_for(lambda: swapped_to_9() > len(before))  # the new worker booted past them all
    with requests.Session() as session:
        readiness = [session.get(f"{server.url}/ready", timeout=10) for _ in range(20)]
    assert {(r.status_code, r.json()["models"]["mnist_cnn"]) for r in readiness} == {(200, 9)}
    assert "Traceback" not in server.log()
