"""Shared fixtures: the real MNIST set, small real files made from it, a trained export."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from training.data import Mnist, load_mnist

ROOT = Path(__file__).resolve().parents[1]


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


def run_fit(*args: str, env: dict[str, str] | None = None, timeout: int = 600
            ) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "training.fit", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def fit_run(tmp_path_factory) -> FitRun:
    """The served CNN trained for one epoch on 2,000 real images and exported."""
    models_dir = tmp_path_factory.mktemp("models")
    result = run_fit("--limit", "2000", "--epochs", "1", "--models-dir", str(models_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return FitRun(models_dir, models_dir / "mnist_cnn" / "1", result.stdout)
