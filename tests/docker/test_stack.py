"""`docker-compose up` for real, under Debian's Compose 1.29 and under Compose v2.

On an empty ./models the `train` job trains (small settings through TRAIN_ARGS), `api`
becomes healthy behind it and `proxy` answers through nginx; `docker-compose run train`
exports a second version that the running api serves with no restart and no failed
request; `docker-compose down -v` leaves nothing of the project behind.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import free_port, wait_until
from tests.docker.conftest import copy_project
from tests.docker.engine import docker

# Debian's own 1.29 (make system-tools) and v2, the binary in .venv/bin (make install).
COMPOSE = {"v1": "/usr/bin/docker-compose",
           "v2": str(Path(sys.executable).parent / "docker-compose")}
TRAIN_ARGS = "--limit 10000 --epochs 1"
MODEL = "mnist_cnn"


@dataclass
class Stack:
    """One compose project, its own copy of the files and its own ./models."""

    binary: str
    folder: Path
    project: str
    env: dict[str, str]
    url: str
    grpc: str  # host:port of the api's published gRPC port

    def compose(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "--project-name", self.project, *args],
                              cwd=self.folder, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def logs(self) -> str:
        return self.compose("logs", "--no-color", timeout=120).stdout[-6000:]

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes labelled with this project."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "--all"], ["network", "ls"], ["volume", "ls"]):
            found += docker(*kind, "--quiet", "--filter", label).stdout.split()
        return found


def png(digit) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return buffer.getvalue()


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/ready", timeout=5).status_code == 200
    except requests.RequestException:  # not listening yet, or busy starting
        return False


@pytest.fixture(scope="module", params=sorted(COMPOSE))
def stack(request, images, base_images, tmp_path_factory) -> Iterator[Stack]:
    """`docker-compose build` then `up -d` on an empty ./models, until nginx answers /ready."""
    version = request.param
    folder = copy_project(tmp_path_factory.mktemp(f"compose-{version}"))
    port, grpc_port = free_port(), free_port()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(folder),
           **base_images, "API_PORT": str(port), "GRPC_PORT": str(grpc_port),
           "TRAIN_ARGS": TRAIN_ARGS, "MODEL_POLL_SECONDS": "1"}
    running = Stack(COMPOSE[version], folder, f"mnisttest{version}", env,
                    f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")
    built = running.compose("build", timeout=3600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    try:
        up = running.compose("up", "--detach")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        wait_until(lambda: ready(running.url), "the stack answering /ready through nginx",
                   timeout=600)
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        running.compose("down", "--volumes", "--timeout", "30")


def test_up_trains_and_nginx_serves_real_test_digits(stack, mnist):
    assert sorted(p.name for p in (stack.folder / "models" / MODEL).iterdir()) == ["1"]
    digits = [png(image) for image in mnist.x_test[:10]]
    response = requests.post(f"{stack.url}/predict", timeout=60,
                             files=[("image", (f"{i}.png", d, "image/png"))
                                    for i, d in enumerate(digits)])
    assert response.status_code == 200, response.text
    assert response.headers["Server"].startswith("nginx") or "X-Request-ID" in response.headers
    answered = [p["digit"] for p in response.json()["predictions"]]
    assert sum(a == int(y) for a, y in zip(answered, mnist.y_test[:10], strict=True)) >= 9


def test_the_api_answers_grpc_on_its_published_port(stack, mnist):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(stack.grpc)
    assert client.is_model_ready(MODEL)
    image = triton.InferInput("image", [1, 28, 28], "FP32")
    image.set_data_from_numpy((mnist.x_test[:1] / 255.0).astype("float32"))
    result = client.infer(MODEL, [image])
    (output,) = result.get_response().outputs
    assert result.as_numpy(output.name).argmax() == int(mnist.y_test[0])


def test_the_summary_counts_the_reference_cnns_parameters(stack):
    body = requests.get(f"{stack.url}/summary", timeout=30).json()
    assert body["totals"]["params"] == 1_199_882
    assert body["model"] == {"name": MODEL, "version": 1}


def test_run_train_exports_version_2_served_without_restart_or_failed_request(stack, mnist):
    api_before = stack.compose("ps", "--quiet", "api").stdout.split()
    digit = png(mnist.x_test[0])
    statuses, versions, stop = [], set(), threading.Event()

    def keep_posting() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                response = session.post(f"{stack.url}/predict", timeout=60,
                                        files={"image": ("d.png", digit, "image/png")})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    versions.add(response.json()["model"]["version"])

    client = threading.Thread(target=keep_posting)
    client.start()
    try:
        trained = stack.compose("run", "--rm", "train", *TRAIN_ARGS.split(), "--seed", "7")
        assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
        wait_until(lambda: 2 in versions, "version 2 answering through nginx", timeout=30)
    finally:
        stop.set()
        client.join()
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert stack.compose("ps", "--quiet", "api").stdout.split() == api_before  # no restart


def test_a_tokens_file_in_secrets_and_auth_tokens_file_set_secure_the_stack(stack, mnist):
    """README's one step: the file in ./secrets (always mounted), the setting in the
    environment; `up` then asks every /predict through nginx for a token."""
    (stack.folder / "secrets" / "tokens").write_text("compose-test-token predict\n")
    secured = replace(stack, env={**stack.env, "AUTH_TOKENS_FILE": "/run/secrets/mnist/tokens"})
    # Recreated whole: nginx resolved `api` when it started, and the api gets a new address.
    up = secured.compose("up", "--detach", "--force-recreate")
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    wait_until(lambda: ready(stack.url), "the secured stack answering /ready", timeout=300)
    digit = {"image": ("d.png", png(mnist.x_test[0]), "image/png")}
    refused = requests.post(f"{stack.url}/predict", files=digit, timeout=60)
    assert refused.status_code == 401, refused.text
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    answered = requests.post(f"{stack.url}/predict", files=digit, timeout=60,
                             headers={"Authorization": "Bearer compose-test-token"})
    assert answered.status_code == 200, answered.text
    assert answered.json()["predictions"][0]["digit"] == int(mnist.y_test[0])


def test_down_with_volumes_leaves_no_container_network_or_volume(stack):
    assert stack.leftovers()
    down = stack.compose("down", "--volumes", "--timeout", "30")
    assert down.returncode == 0, down.stderr[-3000:]
    assert stack.leftovers() == []


def test_train_into_a_models_folder_of_another_owner_says_how_to_fix_it(images, base_images,
                                                                      tmp_path):
    folder = copy_project(tmp_path, models_owner=0)  # root's, and the image runs as 1000
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(folder),
           **base_images}
    result = subprocess.run([COMPOSE["v1"], "--project-name", "mnisttestowner", "run", "--rm",
                             "train"], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=600)
    subprocess.run([COMPOSE["v1"], "--project-name", "mnisttestowner", "down", "--volumes"],
                   cwd=folder, env=env, capture_output=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert "cannot write to /app/models: it belongs to uid 0 and this runs as uid 1000" in output
    assert "APP_UID=0 docker-compose build" in output
