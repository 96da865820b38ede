"""What every `make test-docker` test shares: an engine, the base images, the two images.

Each test here is marked `docker`, which `make test` leaves out (pyproject's addopts) and
`make test-docker` selects.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.docker.engine import base_image_args, docker, engine

HERE = Path(__file__).parent
# What a build and `docker-compose up` read: a copy of these is each test's project.
PROJECT_FILES = ("Dockerfile", ".dockerignore", "docker-compose.yml", "requirements.txt",
                 "requirements-serving.txt", "app", "training", "deploy/nginx", "secrets")
IMAGES = {"latest": "mnist-serving:latest", "lite": "mnist-serving:lite"}
APP_UID = 1000  # the Dockerfile's default


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory) -> Iterator[None]:
    with engine(tmp_path_factory.getbasetemp() / "dockerd.log"):
        yield


@pytest.fixture(scope="session")
def base_images(docker_engine) -> dict[str, str]:
    return base_image_args()


@pytest.fixture(scope="session")
def images(base_images) -> dict[str, str]:
    """Both images, built from this checkout as compose builds them."""
    for target, tag in IMAGES.items():
        docker("build", "--quiet", "--target", target, "--tag", tag,
               "--build-arg", f"PYTHON_IMAGE={base_images['PYTHON_IMAGE']}", str(ROOT),
               timeout=3600)
    return IMAGES


def copy_project(target: Path, models_owner: int = APP_UID) -> Path:
    """The tracked files a build and compose read, and an empty ./models owned by
    ``models_owner``, in ``target``."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", *PROJECT_FILES],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    models = target / "models"
    models.mkdir()
    shutil.chown(models, models_owner, models_owner)
    return target
