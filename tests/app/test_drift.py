"""app/drift.py and app/input_stats.py: the population-stability index, the sliding
window, and a real server whose index stays low for real digits and crosses the alert's
0.25 for restyled ones (thick strokes, only 1s)."""

from __future__ import annotations

import io
import itertools
import json
import math
import shutil
import threading

import numpy as np
import pytest
import requests
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families

from app.config import Config, ConfigError
from app.drift import DIGIT, NAMES, DriftMonitor, Reference, Window, bin_indices, psi
from app.input_stats import bbox_size, ink_fraction, mean_intensity
from app.metrics import Metrics
from app.preprocess import prepare
from app.servable import LoadedModel
from tests.conftest import start_server, stop_server, wait_until
from training.data import to_model_input
from training.export_format import DRIFT_HISTOGRAMS
from training.reference import drift_reference

WINDOW = 500  # the test server's DRIFT_WINDOW: each stream below replaces it whole
STABLE, SIGNIFICANT = 0.1, 0.25


def test_the_statistics_are_those_the_export_format_records():
    assert (DIGIT, *DRIFT_HISTOGRAMS) == NAMES


def test_identical_distributions_have_an_index_of_zero():
    assert psi(np.array([5.0, 3, 2]), np.array([50.0, 30, 20])) == 0.0


def test_a_two_bin_shift_gives_the_index_computed_by_hand():
    # live 50/50 against reference 25/75: 0.25·ln 2 + (−0.25)·ln(2/3) = 0.27465
    expected = 0.25 * math.log(2) - 0.25 * math.log(2 / 3)
    assert psi(np.array([1.0, 1]), np.array([1.0, 3])) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.274653, abs=1e-6)


def test_an_empty_bin_counts_as_epsilon_not_infinity():
    # live 100/0 against 50/50: the empty bin's share is taken as 1e-4
    expected = 0.5 * math.log(2) + (1e-4 - 0.5) * math.log(1e-4 / 0.5)
    assert psi(np.array([4.0, 0]), np.array([1.0, 1])) == pytest.approx(expected, abs=1e-12)


def test_bins_hold_their_left_edge_and_the_outer_bins_take_the_rest():
    values = np.array([-0.1, 0.0, 0.25, 0.5, 0.99, 1.0, 1.2])
    assert bin_indices(values, np.array([0.0, 0.5, 1.0])).tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_input_statistics_of_hand_made_images():
    images = np.zeros((3, 28, 28, 1), np.float32)
    images[1, 5:9, 10:13] = 1.0  # a 4×3 block of ink
    images[1, 20, 20] = 0.4  # fainter than ink: counts in the mean only
    images[2, 2, 3] = images[2, 20, 25] = 0.5  # two ink pixels 19 rows, 23 columns apart
    assert ink_fraction(images).tolist() == [0, 12 / 784, 2 / 784]
    assert mean_intensity(images) == pytest.approx([0, 12.4 / 784, 1 / 784])
    assert bbox_size(images).tolist() == [0, 12 / 784, 19 * 23 / 784]


def two_bin_reference() -> Reference:
    """Every statistic in two bins split at 0.5, digits over ten."""
    return Reference({name: np.ones(10 if name == "digit" else 2) for name in NAMES},
                     {name: np.array([0.0, 0.5, 1.0]) for name in NAMES[1:]})


def test_the_window_keeps_only_its_last_images():
    window = Window(two_bin_reference(), size=3)
    window.add(np.zeros((2, 4), np.uint8))  # two images in bin 0 of everything
    window.add(np.ones((2, 4), np.uint8))  # two in bin 1: the oldest one drops out
    assert window.filled == 3 and [c.tolist()[:2] for c in window.counts] == [[1, 2]] * 4
    window.add(np.ones((5, 4), np.uint8))  # more than the window: its last 3 stay
    assert [c.tolist()[:2] for c in window.counts] == [[0, 3]] * 4


@pytest.fixture(scope="module")
def reference(mnist) -> dict:
    """A reference recorded by training's own code on 1,000 real training digits."""
    return drift_reference(to_model_input(mnist.x_train[:1000]), mnist.y_train[:1000])


def gauge_values(metrics: Metrics, model: str) -> dict[str, float | None]:
    return {name: metrics.registry.get_sample_value(
        "input_drift_psi", {"model": model, "statistic": name}) for name in NAMES}


def test_the_index_is_exported_once_the_window_holds_the_minimum(mnist, reference, tmp_path):
    metrics = Metrics()
    monitor = DriftMonitor(metrics.drift_psi, size=400, min_samples=200)
    model = LoadedModel("digits", 1, tmp_path, {"drift_reference": reference}, None)
    images, digits = to_model_input(mnist.x_test[:400]), mnist.y_test[:400]
    monitor.observe(model, images[:199], np.eye(10)[digits[:199]])
    assert gauge_values(metrics, "digits") == dict.fromkeys(NAMES)
    monitor.observe(model, images[199:], np.eye(10)[digits[199:]])
    assert all(value >= 0 for value in gauge_values(metrics, "digits").values())


def only_ones(mnist, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Real test digits, all of them 1s, and their one-hot answers: a drifted stream."""
    ones = mnist.y_test == 1
    return to_model_input(mnist.x_test[ones][:count]), np.eye(10)[np.ones(count, int)]


@pytest.mark.parametrize("images", [1, 60], ids=["first-image", "over-a-twentieth"])
def test_an_index_goes_back_to_zero_when_its_version_retires_for_one_still_filling(
        mnist, reference, tmp_path, images):
    metrics = Metrics()
    monitor = DriftMonitor(metrics.drift_psi, size=400, min_samples=200)
    old = LoadedModel("digits", 1, tmp_path, {"drift_reference": reference}, None)
    monitor.observe(old, *only_ones(mnist, 400))
    assert gauge_values(metrics, "digits")[DIGIT] > 0.25
    old.retire()
    new = LoadedModel("digits", 2, tmp_path, {"drift_reference": reference}, None)
    monitor.observe(new, *only_ones(mnist, images))  # under 200; a twentieth is 20
    assert gauge_values(metrics, "digits") == dict.fromkeys(NAMES, 0.0)


def test_a_version_without_a_reference_takes_its_predecessors_index_back_to_zero(
        mnist, reference, tmp_path):
    metrics = Metrics()
    monitor = DriftMonitor(metrics.drift_psi, size=400, min_samples=200)
    old = LoadedModel("digits", 1, tmp_path, {"drift_reference": reference}, None)
    monitor.submit(old, *only_ones(mnist, 400))  # through the drift thread, as served
    wait_until(lambda: (gauge_values(metrics, "digits")[DIGIT] or 0) > 0.25,
               "the old version's index")
    old.retire()
    unreferenced = LoadedModel("digits", 2, tmp_path, {"summary": {}}, None)
    monitor.submit(unreferenced, *only_ones(mnist, 10))
    wait_until(lambda: gauge_values(metrics, "digits") == dict.fromkeys(NAMES, 0.0),
               "the index back to 0")


class ResetFailsOnce:
    """The drift gauge, whose first reset to 0 raises as a multiprocess gauge's file
    write may (a full disk)."""

    def __init__(self, gauge: Gauge):
        self.gauge, self.failed = gauge, threading.Event()

    def labels(self, *labels: str) -> ResetFailsOnce:
        self.child = self.gauge.labels(*labels)
        return self

    def set(self, value: float) -> None:
        if value == 0 and not self.failed.is_set():
            self.failed.set()
            raise OSError(28, "No space left on device")
        self.child.set(value)


MARKERS = itertools.count()


def drained(monitor: DriftMonitor, metrics: Metrics, mnist, reference, tmp_path) -> None:
    """Everything queued before has been handled: a new marker model's index shows (a
    new one each call: an earlier marker's index shows already)."""
    name = f"marker-{next(MARKERS)}"
    marker = LoadedModel(name, 1, tmp_path, {"drift_reference": reference}, None)
    monitor.submit(marker, *only_ones(mnist, 400))
    wait_until(lambda: gauge_values(metrics, name)[DIGIT] is not None, f"the {name} index")


def test_a_reset_that_fails_leaves_the_thread_running_and_is_done_on_the_next_retirement(
        mnist, reference, tmp_path):
    metrics = Metrics()
    gauge = ResetFailsOnce(metrics.drift_psi)
    monitor = DriftMonitor(gauge, size=400, min_samples=200)
    old = LoadedModel("digits", 1, tmp_path, {"drift_reference": reference}, None)
    monitor.observe(old, *only_ones(mnist, 400))
    old.retire()
    monitor.forget("digits")  # the reset, on the drift thread: its gauge write fails
    assert gauge.failed.wait(30)
    drained(monitor, metrics, mnist, reference, tmp_path)  # the thread still runs
    assert gauge_values(metrics, "digits")[DIGIT] > 0.25
    monitor.forget("digits")  # another version retires
    drained(monitor, metrics, mnist, reference, tmp_path)
    assert gauge_values(metrics, "digits") == dict.fromkeys(NAMES, 0.0)


def test_a_version_retiring_while_its_index_is_being_shown_still_resets_it(
        mnist, reference, tmp_path):
    """The retirement lands between the drift thread computing the old version's index
    and marking it shown: its reset must not be skipped as "nothing shown yet"."""
    metrics = Metrics()
    monitor = DriftMonitor(metrics.drift_psi, size=400, min_samples=200)
    old = LoadedModel("digits", 1, tmp_path, {"drift_reference": reference}, None)
    largest = monitor._largest

    def retiring_meanwhile(name: str) -> dict[str, float]:
        index = largest(name)
        if name == "digits" and not old.retired:
            old.retire()  # as ModelStore._swap does, then it tells the listeners
            told = threading.Thread(target=monitor.forget, args=("digits",))
            told.start()
            told.join(timeout=1)  # returns at once unless forget waits for this _show
        return index

    monitor._largest = retiring_meanwhile
    monitor.submit(old, *only_ones(mnist, 400))
    drained(monitor, metrics, mnist, reference, tmp_path)
    wait_until(lambda: gauge_values(metrics, "digits") == dict.fromkeys(NAMES, 0.0),
               "the retired version's index back to 0")


def test_a_version_without_a_reference_is_not_tracked(mnist, tmp_path):
    metrics = Metrics()
    monitor = DriftMonitor(metrics.drift_psi, size=400, min_samples=1)
    model = LoadedModel("older", 1, tmp_path, {"summary": {}}, None)
    monitor.observe(model, to_model_input(mnist.x_test[:400]), np.eye(10)[mnist.y_test[:400]])
    assert monitor.window(model) is None
    assert gauge_values(metrics, "older") == dict.fromkeys(NAMES)


def test_a_reference_changed_since_its_check_is_not_tracked(reference, tmp_path):
    """The loader reads metadata.json again after servable() checked it."""
    broken = {**reference, "images": reference["images"] + 1}
    monitor = DriftMonitor(Metrics().drift_psi, size=400, min_samples=1)
    model = LoadedModel("changed", 1, tmp_path, {"drift_reference": broken}, None)
    assert monitor.window(model) is None


@pytest.mark.parametrize(("environ", "words"), [
    ({"DRIFT_WINDOW": "-1"}, "DRIFT_WINDOW must be between 0 (off) and 1000000"),
    ({"DRIFT_WINDOW": "2000000"}, "DRIFT_WINDOW must be between 0 (off) and 1000000"),
    ({"DRIFT_MIN_SAMPLES": "0"}, "DRIFT_MIN_SAMPLES must be between 1 and DRIFT_WINDOW"),
    ({"DRIFT_WINDOW": "100", "DRIFT_MIN_SAMPLES": "101"}, "DRIFT_MIN_SAMPLES must be between"),
])
def test_bad_drift_settings_are_refused_naming_the_variable(environ, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Config.from_env(environ)


def test_drift_off_takes_any_minimum():
    assert Config.from_env({"DRIFT_WINDOW": "0", "DRIFT_MIN_SAMPLES": "0"}).drift_window == 0


# --- a real server: one worker, so one window per version ------------------------------

@pytest.fixture(scope="module")
def drift_server(served_models, tmp_path_factory):
    """gunicorn serving the trained CNN as ``mnist_cnn`` and ``removed`` (a test removes
    it) and, as ``legacy``, the same export with its reference removed (an export from
    before references existed)."""
    models = tmp_path_factory.mktemp("drift_models")
    shutil.copytree(served_models / "mnist_cnn" / "1", models / "mnist_cnn" / "1")
    shutil.copytree(served_models / "mnist_cnn" / "1", models / "removed" / "1")
    legacy = shutil.copytree(served_models / "mnist_cnn" / "1", models / "legacy" / "1")
    metadata = json.loads((legacy / "metadata.json").read_text())
    del metadata["drift_reference"]
    (legacy / "metadata.json").write_text(json.dumps(metadata))
    running = start_server(models, tmp_path_factory.mktemp("drift") / "gunicorn.log",
                           WORKERS="1", DRIFT_WINDOW=str(WINDOW), DRIFT_MIN_SAMPLES="200")
    yield running, models
    stop_server(running)
    assert "Traceback" not in running.log(), running.log()[-3000:]


def png(digit: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit).save(buffer, format="PNG")
    return buffer.getvalue()


def send(url: str, model: str, digits: np.ndarray) -> np.ndarray:
    """Post uint8 28×28 digits as PNG files, 100 a request; the digits answered."""
    answered = []
    for start in range(0, len(digits), 100):
        files = [("image", (f"{i}.png", png(d), "image/png"))
                 for i, d in enumerate(digits[start:start + 100])]
        response = requests.post(f"{url}/models/{model}/predict", files=files, timeout=60)
        assert response.status_code == 200, response.text
        answered += [p["digit"] for p in response.json()["predictions"]]
    return np.array(answered)


def expected_index(recorded: dict, digits: np.ndarray, answered: np.ndarray
                   ) -> dict[str, float]:
    """The index of each statistic, computed here from the reference in metadata.json
    and the images as the server's preprocessing gives them to the model."""
    images = np.stack([prepare(png(d), 10**6) for d in digits])[..., np.newaxis]
    values = {"ink_fraction": ink_fraction(images), "mean_intensity": mean_intensity(images),
              "bbox_size": bbox_size(images)}
    statistics = recorded["statistics"]
    live = {"digit": np.bincount(answered, minlength=10)}
    for name, value in values.items():
        edges = np.array(statistics[name]["edges"])
        bins = np.clip(np.searchsorted(edges, value, side="right") - 1, 0, len(edges) - 2)
        live[name] = np.bincount(bins, minlength=len(edges) - 1)
    index = {}
    for name, counts in live.items():
        p = np.maximum(counts / counts.sum(), 1e-4)
        reference = np.array(statistics[name]["counts"])
        q = np.maximum(reference / reference.sum(), 1e-4)
        index[name] = float(np.sum((p - q) * np.log(p / q)))
    return index


def scraped(url: str, model: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {sample.labels["statistic"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "input_drift_psi" for sample in family.samples
            if sample.labels["model"] == model}


def stream(drift_server, digits: np.ndarray, model: str = "mnist_cnn") -> dict[str, float]:
    """Send a window's worth of digits; once /metrics shows the index of exactly these
    (the window slid past everything before), return it."""
    server, models = drift_server
    assert len(digits) == WINDOW
    answered = send(server.url, model, digits)
    recorded = json.loads((models / model / "1" / "metadata.json").read_text())
    expected = expected_index(recorded["drift_reference"], digits, answered)
    wait_until(lambda: scraped(server.url, model).keys() == expected.keys() and all(
        math.isclose(scraped(server.url, model)[k], v, abs_tol=1e-9)
        for k, v in expected.items()), "input_drift_psi of the last window", timeout=30)
    print(f"\n{model}: " + ", ".join(f"{k} {v:.3f}" for k, v in expected.items()))
    return expected


def real_digits(mnist, seed: int = 7) -> np.ndarray:
    """A window of test digits drawn across the whole test set (its two halves come
    from different writers)."""
    return mnist.x_test[np.random.default_rng(seed).permutation(len(mnist.x_test))[:WINDOW]]


def test_real_test_digits_keep_every_index_below_the_stable_bound(drift_server, mnist):
    index = stream(drift_server, real_digits(mnist))
    assert all(value < STABLE for value in index.values()), index


def thick(digits: np.ndarray) -> np.ndarray:
    """Strokes dilated by a 3×3 maximum filter: about twice as thick."""
    padded = np.pad(digits, ((0, 0), (1, 1), (1, 1)))
    return sliding_window_view(padded, (3, 3), axis=(1, 2)).max(axis=(-2, -1))


def test_thick_strokes_push_ink_and_intensity_past_the_alert(drift_server, mnist):
    index = stream(drift_server, thick(real_digits(mnist)))
    assert index["ink_fraction"] >= SIGNIFICANT and index["mean_intensity"] >= SIGNIFICANT


def test_only_ones_push_the_digit_and_box_size_past_the_alert(drift_server, mnist):
    index = stream(drift_server, mnist.x_test[mnist.y_test == 1][:WINDOW])
    assert index["digit"] >= SIGNIFICANT and index["bbox_size"] >= SIGNIFICANT


def test_a_removed_models_index_goes_back_to_zero_with_no_request_for_it(drift_server,
                                                                         mnist):
    server, models = drift_server
    stream(drift_server, mnist.x_test[mnist.y_test == 1][:WINDOW], model="removed")
    shutil.rmtree(models / "removed")  # its only version retires: no request comes again
    wait_until(lambda: scraped(server.url, "removed") == dict.fromkeys(NAMES, 0.0),
               "the removed model's index back to 0", timeout=60)


def test_a_version_without_a_reference_answers_and_exports_no_index(drift_server, mnist):
    server, _ = drift_server
    assert len(send(server.url, "legacy", mnist.x_test[:300])) == 300
    # The drift thread takes requests in order: once mnist_cnn's later window shows,
    # anything legacy's requests led to would have shown too.
    stream(drift_server, real_digits(mnist, seed=8))
    assert scraped(server.url, "legacy") == {}
