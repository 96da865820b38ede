"""docker-compose.yml and the Dockerfile, verified without a Docker engine.

The compose file is resolved by the real Compose binaries, Debian's 1.29 and v2
(`docker-compose config`) and the Dockerfile is linted by hadolint: a renamed variable or
a wrong path fails these tests. `make test-docker` (tests/docker/) builds the images and
runs the stack on a real Docker engine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from app.config import Config
from tests.conftest import ROOT

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


def final_stage(dockerfile: Path, target: str = "latest") -> dict:
    """WORKDIR, ENV, USER, ARG, HEALTHCHECK, ENTRYPOINT and CMD of the stage ``target``,
    with what it inherits from the stages it is built FROM."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    stages = {}
    for block in text.split("\nFROM ")[1:]:
        header, _, body = block.partition("\n")
        base, _, name = header.partition(" AS ")
        stages[name.strip()] = (base.strip(), body)

    def config(name: str) -> dict:
        base, body = stages[name]
        image = config(base) if base in stages else {"env": {}, "workdir": "/"}
        image = {**image, "env": dict(image["env"])}
        cmd_set = False  # Docker's rule: ENTRYPOINT clears a CMD this stage did not set
        for line in body.splitlines():
            keyword, _, rest = line.strip().partition(" ")
            if keyword == "ENV":
                image["env"].update(pair.split("=", 1) for pair in shlex.split(rest))
            elif keyword == "WORKDIR":
                image["workdir"] = rest.strip()
            elif keyword == "USER":
                image["user"] = rest.strip()
            elif keyword == "ARG":
                arg, _, default = rest.strip().partition("=")
                image["args"] = {**image.get("args", {}), arg: default}
            elif keyword == "HEALTHCHECK":
                image["healthcheck"] = json.loads(rest.split(" CMD ", 1)[1])
            elif keyword == "CMD":
                image["cmd"], cmd_set = json.loads(rest), True
            elif keyword == "ENTRYPOINT":
                image["entrypoint"] = json.loads(rest)
                if not cmd_set:
                    image.pop("cmd", None)
        return image

    return config(target)


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


def requirement_lines(path: Path) -> set[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line}


def test_the_serving_requirements_are_names_pinned_in_requirements_txt():
    """The lite image installs them with requirements.txt as constraints: a name not
    pinned there would be installed at whatever version PyPI has that day."""
    pinned = {re.split(r"==|;", line)[0].strip().lower()
              for line in requirement_lines(ROOT / "requirements.txt")}
    serving = requirement_lines(ROOT / "requirements-serving.txt")
    assert serving and all(re.fullmatch(r"[A-Za-z0-9_.-]+", name) for name in serving)
    assert {name.lower() for name in serving} <= pinned, serving - pinned


def test_both_final_stages_run_gunicorn_as_an_unprivileged_user_the_lite_one_on_litert():
    latest, lite = (final_stage(ROOT / "Dockerfile", target) for target in ("latest", "lite"))
    for image in (latest, lite):
        user = re.sub(r"\$\{(\w+)\}", lambda m, image=image: image["args"][m.group(1)],
                      image["user"])
        assert user not in {"", "root", "0"} and int(user) >= 1000
    assert latest["entrypoint"] == ["gunicorn", "-c", "app/gunicorn.conf.py"]
    assert lite["entrypoint"] == ["env", "PREFER_TFLITE_MODEL=1", *latest["entrypoint"]]
    assert latest["cmd"] == lite["cmd"] == ["app:create_app()"]


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
    (models,) = train["volumes"]
    assert Path(models["source"]) == ROOT / "models"
    assert models["source"] in {v["source"] for v in api["volumes"]}


def test_http_redirect_port_is_published_on_the_host_as_the_one_setting_says():
    result = subprocess.run([tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"),
                             "config", "--format", "json"], capture_output=True, text=True,
                            env={**unconfigured_env(), "HTTP_REDIRECT_PORT": "80"}, check=True)
    proxy = json.loads(result.stdout)["services"]["proxy"]
    assert proxy["environment"]["HTTP_REDIRECT_PORT"] == "80"
    assert [(p["published"], p["target"]) for p in proxy["ports"][1:]] == [("80", 80)]


def test_api_and_proxy_always_mount_the_secrets_folder_read_only(compose):
    """README's one step: a file in ./secrets and its path in .env. The folder is in
    the repository (Compose v1 would make a missing one as root), its content is not,
    nor is it sent to an image build."""
    for name in ("api", "proxy"):
        (secrets,) = [v for v in compose["services"][name]["volumes"]
                      if v["target"] == "/run/secrets/mnist"]
        assert Path(secrets["source"]) == ROOT / "secrets" and secrets["read_only"] is True
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "secrets"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked == ["secrets/.gitignore"]
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index",
                              "secrets/tokens", "secrets/tls.key"], capture_output=True,
                             text=True).stdout.split()
    assert ignored == ["secrets/tokens", "secrets/tls.key"]
    assert "secrets" in (ROOT / ".dockerignore").read_text().split()


def test_the_proxy_publishes_rest_and_the_api_only_grpc(compose):
    api, proxy = compose["services"]["api"], compose["services"]["proxy"]
    assert [(str(p["target"]), p["published"]) for p in api["ports"]] == \
        [(api["environment"]["GRPC_PORT"], api["environment"]["GRPC_PORT"])]
    rest, redirect = proxy["ports"]
    assert str(rest["target"]) == proxy["environment"]["PORT"]
    # HTTP_REDIRECT_PORT unset: a port no one outside the host reaches, nothing behind it.
    assert redirect["host_ip"] == "127.0.0.1" and "published" not in redirect
    assert proxy["environment"]["UPSTREAM"] == f"api:{api['environment']['PORT']}"
    assert proxy["environment"]["MAX_CONTENT_LENGTH"] == api["environment"]["MAX_CONTENT_LENGTH"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
