"""The Docker engine and the base images `make test-docker` needs, made ready on any machine.

A running engine is used as it is. Otherwise `dockerd` is started (as root, as CI runs)
with its output in a file, never on this process's stdout (a daemon holding CI's output
open would hang CI), and stopped at the end; nothing else that was running is touched.
The base images are the Dockerfile's and compose file's defaults where they can be pulled;
where Docker Hub cannot be reached, stand-ins are built once from Debian's packages and
kept by tag for the next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
START_SECONDS = 60
PULL_SECONDS = 20  # Docker Hub out of reach: a pull hangs rather than fails


@dataclass(frozen=True)
class BaseImage:
    """A build argument of ours, its default, and the stand-in built where it cannot be
    pulled (`standin-image.sh KIND TAG`)."""

    variable: str
    default: str
    kind: str
    standin: str


BASE_IMAGES = (
    BaseImage("PYTHON_IMAGE", "python:3.11-slim", "python", "mnist-standin/python:3.11-bookworm"),
    BaseImage("NGINX_IMAGE", "nginx:1.28", "nginx", "mnist-standin/nginx:bookworm"),
)


def docker(*args: str, timeout: float = 600, check: bool = True,
           **kwargs) -> subprocess.CompletedProcess:
    """`docker ARGS`, its output captured as text; with ``check``, a failure raises with
    what docker said."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)[:200]} failed ({result.returncode}): "
                           f"{result.stderr[-2000:]}")
    return result


def answers() -> bool:
    try:
        return docker("info", timeout=30, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_daemon(log_path: Path, *flags: str) -> subprocess.Popen | None:
    """dockerd with FLAGS, once it answers; None (and stopped) if it does not."""
    with open(log_path, "ab") as log:
        daemon = subprocess.Popen(["dockerd", *flags], stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and daemon.poll() is None:
        if answers():
            return daemon
        time.sleep(0.5)
    stop_daemon(daemon)
    return None


def stop_daemon(daemon: subprocess.Popen) -> None:
    """SIGTERM, as systemd stops it: dockerd stops its containers and its containerd."""
    if daemon.poll() is None:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()


@contextmanager
def engine(log_path: Path) -> Iterator[None]:
    """A Docker engine for the block: the running one, else one started here (its own
    choice of storage driver, then vfs where overlayfs is refused) and stopped after."""
    if answers():
        yield
        return
    daemon = start_daemon(log_path) or start_daemon(log_path, "--storage-driver=vfs")
    if daemon is None:
        raise RuntimeError(f"dockerd did not start; its log: {log_path}\n"
                           + log_path.read_text()[-3000:])
    try:
        yield
    finally:
        stop_daemon(daemon)


def have(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def resolve(image: BaseImage) -> str:
    """The default image when it is here or can be pulled, else the stand-in (built
    unless a previous run left it)."""
    if have(image.default):
        return image.default
    try:
        if docker("pull", "--quiet", image.default, timeout=PULL_SECONDS,
                   check=False).returncode == 0:
            return image.default
    except subprocess.TimeoutExpired:
        pass
    if not have(image.standin):
        subprocess.run([str(HERE / "standin-image.sh"), image.kind, image.standin],
                       check=True, timeout=900)
    return image.standin


def base_image_args() -> dict[str, str]:
    """{PYTHON_IMAGE: ..., NGINX_IMAGE: ...}: what the builds and compose are given."""
    return {image.variable: resolve(image) for image in BASE_IMAGES}
