"""pyproject.toml: the wheel holds the whole service, and it runs installed, away from the
source tree.

The wheel is built from a copy of the sources (nothing is written into the checkout) and
installed with pip into a fresh virtual environment whose only other packages are the
shared environment's, reached through a ``.pth`` file: the repository is on no path, so
every file the server uses must have come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, free_port

SOURCES = ("pyproject.toml", "requirements.txt", "app", "training")


@dataclass(frozen=True)
class Installed:
    """The built wheel and a fresh environment it was installed into with pip."""

    wheel: Path
    python: Path
    site_packages: Path
    elsewhere: Path  # an empty working folder, far from the repository
    env: dict[str, str]


def run(*command: str | Path, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to completion; a failure shows its output."""
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                            timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def build_wheel(tmp: Path) -> Path:
    """``pip wheel`` on a copy of the sources, with the shared environment's setuptools."""
    source = tmp / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--no-index", "--wheel-dir", tmp / "dist", source)
    (wheel,) = (tmp / "dist").glob("*.whl")
    return wheel


def fresh_venv(tmp: Path) -> tuple[Path, Path]:
    """A new environment seeing the shared one's packages (not the repository) by .pth."""
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=tmp).stdout.strip())
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "shared-environment.pth").write_text("".join(f"{p}\n" for p in sorted(shared)))
    return python, site


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("packaging")
    wheel = build_wheel(tmp)
    python, site = fresh_venv(tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PROMETHEUS_MULTIPROC_DIR")}
    before = subprocess.run([python, "-c", "import app"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "No module named 'app'" in before.stderr, "the repository leaks into the venv"
    # Without --no-deps: pip checks the declared dependencies against what is installed.
    run(python, "-m", "pip", "install", "--no-index", wheel, cwd=elsewhere, env=env)
    return Installed(wheel, python, site, elsewhere, env)


def test_the_wheel_ships_what_the_service_needs(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for folder in ("app", "training"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert path.relative_to(ROOT).as_posix() in names


def test_the_wheel_declares_the_pinned_requirements(installed):
    metadata = zipfile.ZipFile(installed.wheel)
    (name,) = [n for n in metadata.namelist() if n.endswith(".dist-info/METADATA")]
    declared = {line.removeprefix("Requires-Dist: ").replace(" ", "")
                for line in metadata.read(name).decode().splitlines()
                if line.startswith("Requires-Dist: ")}
    pinned = {line.replace(" ", "").replace("'", '"')
              for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert declared == pinned


def test_the_installed_package_is_imported_not_the_repository(installed):
    found = run(installed.python, "-c", "import app, training; print(app.__file__); "
                "print(training.__file__)", cwd=installed.elsewhere, env=installed.env)
    for line in found.stdout.split():
        assert Path(line).is_relative_to(installed.site_packages)


@pytest.fixture(scope="module")
def installed_server(installed, tmp_path_factory):
    """gunicorn with the installed gunicorn.conf.py, started from an unrelated folder."""
    port = free_port()
    models_dir = tmp_path_factory.mktemp("no_models")
    log_path = installed.elsewhere / "gunicorn.log"
    env = {**installed.env, "MODELS_DIR": str(models_dir), "PORT": str(port),
           "WORKERS": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [installed.python, "-m", "gunicorn", "-c",
             installed.site_packages / "app" / "gunicorn.conf.py", "app:create_app()"],
            cwd=installed.elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(url, process, log_path)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=60)


def wait_for_health(url: str, process: subprocess.Popen, log_path: Path) -> None:
    """Until /health answers: no model is needed for the pages, so /ready is not awaited."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text(errors="replace")
        try:
            requests.get(f"{url}/health", timeout=2)
            return
        except requests.ConnectionError:  # not listening yet
            time.sleep(0.2)
    raise AssertionError(f"gunicorn did not answer within 120 s:\n{log_path.read_text()}")


@pytest.mark.parametrize("page", ["/", "/model"])
def test_the_installed_service_serves_each_page_and_its_static_files(installed_server, page):
    response = requests.get(f"{installed_server}{page}", timeout=30)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["Content-Type"].startswith("text/html")
    static = [part.split('"')[0] for part in response.text.split('src="')[1:]
              + response.text.split('href="')[1:] if part.startswith("/static/")]
    assert static, "the page links no static file"
    for path in static:
        assert requests.get(f"{installed_server}{path}", timeout=30).status_code == 200, path
