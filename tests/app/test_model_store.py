"""app/model_store.py: the versions the policy names, each complete; broken ones skipped."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from app.errors import ModelNotFound, ModelNotReady
from app.model_store import ModelStore
from app.version_policy import VersionPolicy
from tests.conftest import wait_until
from training.data import to_model_input
from training.export_format import Bounds, manifest


@pytest.fixture
def models_dir(tmp_path, served_models):
    """A fresh MODELS_DIR holding a copy of the trained tiny net as version 1."""
    shutil.copytree(served_models / "mnist_tiny" / "1", tmp_path / "mnist_tiny" / "1")
    return tmp_path


def add_version(models_dir, version: int):
    target = models_dir / "mnist_tiny" / str(version)
    shutil.copytree(models_dir / "mnist_tiny" / "1", target)
    return target


def loaded(models_dir, policy: str = "latest") -> ModelStore:
    store = ModelStore(models_dir, "mnist_tiny", policy=VersionPolicy.parse(policy))
    store.load()
    return store


def test_the_highest_version_is_served(models_dir):
    add_version(models_dir, 3)
    store = loaded(models_dir)
    assert store.ready
    assert store.get().version == 3
    assert store.present_versions("mnist_tiny") == [1, 3]


def test_served_model_classifies_real_digits(models_dir, mnist):
    probabilities = loaded(models_dir).get().predict(to_model_input(mnist.x_test[:200]))
    assert probabilities.shape == (200, 10)
    assert (probabilities.argmax(axis=1) == mnist.y_test[:200]).mean() > 0.8


def mutilate_missing_pb(folder):
    (folder / "saved_model.pb").unlink()


def mutilate_corrupt_pb(folder):
    """Garbage where the graph was, under a manifest that lists it (the exporter's own
    bytes were garbage), so only loading it can tell."""
    (folder / "saved_model.pb").write_bytes(b"\x00garbage" * 10)
    remanifest(folder)


def remanifest(folder):
    """The manifest rewritten to list the folder's files as they are now."""
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["files"] = manifest(folder)
    (folder / "metadata.json").write_text(json.dumps(metadata))


def mutilate_no_metadata(folder):
    (folder / "metadata.json").unlink()


def mutilate_bad_json(folder):
    (folder / "metadata.json").write_text("{ half written")


def mutilate_no_totals(folder):
    metadata = json.loads((folder / "metadata.json").read_text())
    del metadata["summary"]["totals"]
    (folder / "metadata.json").write_text(json.dumps(metadata))


def mutilate_wrong_count(folder):
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["summary"]["totals"]["params"] += 1
    (folder / "metadata.json").write_text(json.dumps(metadata))


def mutilate_missing_variables(folder):
    shutil.rmtree(folder / "variables")


def mutilate_truncated_variables(folder):
    (data,) = (folder / "variables").glob("variables.data-*")
    data.write_bytes(data.read_bytes()[:100])


@pytest.mark.parametrize(("mutilate", "reason"), [
    (mutilate_missing_pb, "no saved_model.pb"),
    (mutilate_corrupt_pb, "SavedModel does not load"),
    (mutilate_no_metadata, "no metadata.json"),
    (mutilate_bad_json, "unreadable metadata.json"),
    (mutilate_no_totals, "metadata.json is invalid at summary: 'totals' is a required"),
    (mutilate_wrong_count, "parameters, metadata says"),
    (mutilate_missing_variables, "no variables/variables.index"),
    (mutilate_truncated_variables, "has 100 bytes, the manifest says"),
])
def test_a_broken_version_is_skipped_with_a_reason(models_dir, caplog, mutilate, reason):
    mutilate(add_version(models_dir, 2))
    with caplog.at_level(logging.WARNING, logger="app.model_store"):
        store = loaded(models_dir)
    assert store.get().version == 1
    assert any("mnist_tiny/2" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records), caplog.text
    assert reason in store.rejected_versions("mnist_tiny")["2"]


def test_staging_folders_are_hidden_and_files_are_listed_as_no_version(models_dir):
    (models_dir / "mnist_tiny" / ".tmp-123-abc").mkdir()
    (models_dir / "mnist_tiny" / "notes.txt").write_text("hello")
    store = loaded(models_dir)
    assert store.present_versions("mnist_tiny") == [1]
    assert store.rejected_versions("mnist_tiny") == {"notes.txt": "a file, not a folder"}


def test_no_servable_version_means_not_ready(tmp_path):
    (tmp_path / "mnist_tiny" / "1").mkdir(parents=True)
    store = loaded(tmp_path)
    assert not store.ready
    assert store.rejected == {"mnist_tiny": "1: no saved_model.pb (incomplete export?)"}
    with pytest.raises(ModelNotReady, match="make train"):
        store.get()


def test_a_missing_models_dir_means_not_ready(tmp_path):
    store = loaded(tmp_path / "nothing-here")
    assert not store.ready


def test_an_unknown_name_is_not_found(models_dir):
    with pytest.raises(ModelNotFound, match="mnist_tiny"):
        loaded(models_dir).get("other")


def test_outputs_match_the_keras_model(models_dir, mnist):
    import keras

    folder = models_dir / "mnist_tiny" / "1"
    images = to_model_input(mnist.x_test[:16])
    served = loaded(models_dir).get().predict(images)
    reference = keras.saving.load_model(folder / "model.keras").predict(images, verbose=0)
    np.testing.assert_allclose(served, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("policy", "expected"), [
    ("latest", [3]), ("latest:2", [2, 3]), ("all", [1, 2, 3]), ("1,3", [1, 3]),
    ("3,9", [3]),
])
def test_the_version_policy_picks_what_is_loaded(models_dir, policy, expected):
    add_version(models_dir, 2)
    add_version(models_dir, 3)
    store = loaded(models_dir, policy)
    assert list(store.versions["mnist_tiny"]) == expected
    assert store.get().version == expected[-1]  # a request without a version: the highest
    assert [store.get("mnist_tiny", v).version for v in expected] == expected


def test_a_version_the_policy_left_out_is_not_found(models_dir):
    add_version(models_dir, 2)
    with pytest.raises(ModelNotFound, match=r"version 1 of 'mnist_tiny' is not loaded"):
        loaded(models_dir).get("mnist_tiny", 1)


def test_latest_n_skips_a_broken_version_and_takes_the_next(models_dir):
    add_version(models_dir, 2)
    mutilate_missing_pb(add_version(models_dir, 3))
    add_version(models_dir, 4)
    assert list(loaded(models_dir, "latest:2").versions["mnist_tiny"]) == [2, 4]


def test_a_listed_version_that_does_not_exist_is_logged(models_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="app.model_store"):
        store = loaded(models_dir, "1,5")
    assert list(store.versions["mnist_tiny"]) == [1]
    assert "has no version 5" in caplog.text


def test_the_signature_defs_are_read_from_the_saved_model(models_dir):
    model = loaded(models_dir).get()
    signature = model.signature_defs["serving_default"]
    assert list(signature["inputs"]) == [model.input_name] == ["image"]
    assert model.output_name == "output_0"
    assert signature["inputs"]["image"]["dtype"] == "DT_FLOAT"


def test_a_signature_with_two_outputs_is_skipped_with_a_reason(tmp_path, caplog):
    import tensorflow as tf

    class TwoOutputs(tf.Module):
        def __init__(self):
            super().__init__()
            self.weights = tf.Variable(tf.ones((784, 10)))

        @tf.function(input_signature=[tf.TensorSpec([None, 28, 28, 1], tf.float32, "image")])
        def serve(self, image):
            logits = tf.reshape(image, (-1, 784)) @ self.weights
            return {"probabilities": tf.nn.softmax(logits), "logits": logits}

    folder = tmp_path / "mnist_tiny" / "1"
    module = TwoOutputs()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    (folder / "metadata.json").write_text(json.dumps({"summary": {
        "layers": [], "totals": {"params": 7840, "param_bytes": 31360,
                                 "activations_per_image": 794}}, "files": manifest(folder)}))
    with caplog.at_level(logging.WARNING, logger="app.model_store"):
        store = loaded(tmp_path)
    assert not store.ready
    assert "must have one input (images) and one output" in caplog.text


# Watching MODELS_DIR: each refresh() is one poll of the background thread, called
# directly so that nothing here waits on a timer.

@pytest.fixture
def watched(tmp_path, untrained_tiny):
    """MODELS_DIR with the untrained tiny net as digits/1, and a store serving it."""
    shutil.copytree(untrained_tiny, tmp_path / "digits" / "1")
    store = ModelStore(tmp_path, "digits", batch_max_size=8, batch_timeout_ms=2)
    store.load()
    yield store
    store.close()


def test_a_new_version_is_swapped_in_and_the_old_one_released(watched, fit_run):
    old = watched.get()
    shutil.copytree(fit_run.version_dir, watched.models_dir / "digits" / "2")
    watched.refresh()
    assert watched.get().version == 2
    assert list(watched.versions["digits"]) == [2]
    assert old.retired and not old.batcher.alive


def test_a_request_already_in_its_slot_finishes_on_its_version(watched, fit_run, mnist):
    images = to_model_input(mnist.x_test[:8])
    old = watched.get()
    expected = old.predict(images)
    with old.slot() as slot:
        shutil.copytree(fit_run.version_dir, watched.models_dir / "digits" / "2")
        watched.refresh()
        assert old.retired and old.batcher.alive  # still in use: kept
        np.testing.assert_array_equal(slot.run(images), expected)
    assert not old.batcher.alive  # released when its last request left
    assert not np.allclose(watched.get().predict(images), expected)


def test_a_late_request_on_a_retired_version_is_still_answered(watched, fit_run, mnist):
    images = to_model_input(mnist.x_test[:4])
    old = watched.get()
    expected = old.predict(images)
    shutil.copytree(fit_run.version_dir, watched.models_dir / "digits" / "2")
    watched.refresh()
    with old.slot() as slot:  # looked up before the swap, arriving after it
        np.testing.assert_array_equal(slot.run(images), expected)


def test_a_removed_version_is_unloaded_and_the_next_lower_served(watched, fit_run):
    shutil.copytree(fit_run.version_dir, watched.models_dir / "digits" / "2")
    watched.refresh()
    newest = watched.get()
    shutil.rmtree(watched.models_dir / "digits" / "2")
    watched.refresh()
    assert watched.get().version == 1
    assert newest.retired


def test_a_removed_model_folder_is_unloaded(watched):
    model = watched.get()
    shutil.rmtree(watched.models_dir / "digits")
    watched.refresh()
    assert watched.versions == {} and not watched.ready
    assert model.retired
    with pytest.raises(ModelNotReady, match="no servable version"):
        watched.get()


def test_a_new_model_folder_is_served(watched, fit_run):
    shutil.copytree(fit_run.version_dir, watched.models_dir / "other" / "1")
    watched.refresh()
    assert watched.get("other").metadata["arch"] == "functional"
    assert watched.get().version == 1


def test_a_rejected_folder_is_logged_once_and_retried_when_it_changes(watched, fit_run,
                                                                       caplog):
    broken = shutil.copytree(fit_run.version_dir, watched.models_dir / "digits" / "2")
    good_metadata = (broken / "metadata.json").read_text()
    (broken / "metadata.json").write_text("{ half written")
    with caplog.at_level(logging.WARNING, logger="app.model_store"):
        for _ in range(3):
            watched.refresh()
    assert sum("digits/2" in r.getMessage() for r in caplog.records) == 1
    assert watched.get().version == 1
    (broken / "metadata.json").write_text(good_metadata)  # the copy finished
    watched.refresh()
    assert watched.get().version == 2
    assert watched.rejected_versions("digits") == {}


BAD_FOLDERS = {
    "3": "has 100 bytes, the manifest says",  # variables truncated
    "4": "unreadable metadata.json",
    "5": "serving_default input is DT_FLOAT [-1, 32, 32, 3], expected DT_FLOAT [-1, 28, 28, 1]",
    "6": "warm-up on blank images gave NaN or infinite outputs",
    "7": "metadata.json is invalid at summary: 'totals' is a required property",
    "²": "not a version number (ASCII digits only)",
    "01": "not a version number (ASCII digits only)",
}


def add_bad_folders(model_dir: Path, good: Path, foreign: dict[str, Path]) -> None:
    """One version folder per way a folder can be wrong, all above the good version."""
    mutilate_truncated_variables(shutil.copytree(good, model_dir / "3"))
    mutilate_bad_json(shutil.copytree(good, model_dir / "4"))
    shutil.copytree(foreign["wrong_shape"], model_dir / "5")
    shutil.copytree(foreign["nan_outputs"], model_dir / "6")
    mutilate_no_totals(shutil.copytree(good, model_dir / "7"))
    (model_dir / "²").mkdir()
    shutil.copytree(good, model_dir / "01")


def test_a_worker_boots_past_every_kind_of_bad_folder(tmp_path, fit_run, foreign_exports):
    from app.metrics import Metrics

    good = shutil.copytree(fit_run.version_dir, tmp_path / "mnist_cnn" / "2")
    add_bad_folders(tmp_path / "mnist_cnn", good, foreign_exports)
    (tmp_path / "not a name").mkdir()
    metrics = Metrics()
    store = ModelStore(tmp_path, "mnist_cnn", metrics=metrics)
    store.load()
    assert store.ready and store.get().version == 2
    rejected = store.rejected_versions("mnist_cnn")
    assert set(rejected) == set(BAD_FOLDERS)
    for folder, reason in BAD_FOLDERS.items():
        assert reason in rejected[folder], (folder, rejected[folder])
    assert metrics.registry.get_sample_value(
        "model_versions_rejected", {"model": "mnist_cnn"}) == len(BAD_FOLDERS)
    assert "not a model name" in store.rejected["not a name"]


def test_the_repository_index_gives_every_folders_state(tmp_path, fit_run, untrained_tiny):
    shutil.copytree(untrained_tiny, tmp_path / "digits" / "1")
    shutil.copytree(fit_run.version_dir, tmp_path / "digits" / "2")
    mutilate_bad_json(shutil.copytree(fit_run.version_dir, tmp_path / "digits" / "3"))
    (tmp_path / "digits" / "x").mkdir()
    store = ModelStore(tmp_path, "digits")
    store.load()
    rows = [(r.name, r.version, r.state, r.reason.split(":")[0]) for r in store.index()]
    assert rows == [
        ("digits", "1", "UNAVAILABLE", "not selected by MODEL_VERSION_POLICY latest"),
        ("digits", "2", "READY", ""),
        ("digits", "3", "UNAVAILABLE", "unreadable metadata.json"),
        ("digits", "x", "UNAVAILABLE", "not a version number (ASCII digits only)"),
    ]


def test_the_watch_thread_follows_the_folder_on_its_own(tmp_path, untrained_tiny, fit_run):
    shutil.copytree(untrained_tiny, tmp_path / "digits" / "1")
    store = ModelStore(tmp_path, "digits", poll_seconds=0.2)
    store.load()
    try:
        shutil.copytree(fit_run.version_dir, tmp_path / "digits" / "2")
        deadline = time.monotonic() + 60
        while store.get().version != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.get().version == 2
    finally:
        store.close()
    assert not store._poller.is_alive()


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture
def rare_full_collections():
    """Python's automatic collector off: in a worker its full pass is nearly so, as it
    waits until the long-lived objects have grown by a quarter and TensorFlow brings
    ~300,000 of them. What a retired version leaves to that pass stays."""
    gc.disable()
    yield
    gc.enable()


def swap_in_copy(store: ModelStore, models_dir: Path, version: int) -> None:
    """Publish a copy of the served version as ``version``, swap it in, delete the old."""
    folder = models_dir / "mnist_cnn"
    shutil.copytree(folder / str(version - 1), folder / str(version))
    store.refresh()
    assert store.get().version == version
    shutil.rmtree(folder / str(version - 1))


@pytest.mark.parametrize("prefer_tflite", [False, True], ids=["savedmodel", "litert"])
def test_a_version_retired_idle_is_freed_by_the_swap(tmp_path, fit_run, prefer_tflite,
                                                     rare_full_collections):
    """A loaded version is a web of reference cycles (a SavedModel's trackable objects;
    the interpreter and its signature runner): nothing frees it but the cyclic collector
    (app/memory.py)."""
    shutil.copytree(fit_run.version_dir, tmp_path / "mnist_cnn" / "1")
    store = ModelStore(tmp_path, "mnist_cnn", batch_max_size=64, batch_timeout_ms=2,
                       prefer_tflite=prefer_tflite)
    store.load()
    first = weakref.ref(store.get().runtime)
    assert first().kind == ("litert" if prefer_tflite else "savedmodel")
    swap_in_copy(store, tmp_path, 2)
    store.close()
    assert first() is None


def test_ten_load_and_retire_cycles_free_every_retired_version(tmp_path, fit_run, caplog,
                                                               rare_full_collections):
    """TF Serving users report leaks across swaps (tensorflow/serving#1346, #2017); here
    each retired CNN stayed (~8 MB each) until Python's full collection ran. Every
    retired version is released and collected, runtime and all, with no collection by
    the test, and memory grows by less than two versions' weights (keeping all ten would
    cost at least five times that)."""
    weights_mb = sum(path.stat().st_size for path in
                     (fit_run.version_dir / "variables").glob("variables.data-*")) / 2**20
    shutil.copytree(fit_run.version_dir, tmp_path / "mnist_cnn" / "1")
    caplog.set_level(logging.INFO, logger="app.servable")
    store = ModelStore(tmp_path, "mnist_cnn", batch_max_size=64, batch_timeout_ms=2)
    store.load()
    retired: dict[int, tuple[weakref.ref, weakref.ref]] = {}

    def cycle(version: int) -> None:
        old = store.get()
        retired[old.version] = (weakref.ref(old), weakref.ref(old.runtime))
        del old
        swap_in_copy(store, tmp_path, version)

    for version in (2, 3):  # allocator and TensorFlow caches settle first
        cycle(version)
    before = rss_mb()
    for version in range(4, 14):
        cycle(version)
    growth = rss_mb() - before
    print(f"RSS growth over 10 load/retire cycles: {growth:.1f} MB "
          f"(one version's weights: {weights_mb:.1f} MB)")
    store.close()
    released = {int(line.rsplit(" ", 1)[1]) for line in caplog.messages
                if line.startswith("released mnist_cnn version ")}
    assert released >= set(range(1, 13))
    kept = [version for version, refs in retired.items() if any(ref() for ref in refs)]
    assert kept == [], f"retired versions {kept} are still referenced"
    assert growth < 2 * weights_mb


def test_a_dangling_link_in_a_served_version_leaves_it_served(watched):
    """An editor's lock file (``.#metadata.json``) is a link to nowhere."""
    model = watched.get()
    (model.path / ".#metadata.json").symlink_to("nobody@host.1234")
    watched.refresh()
    assert watched.get() is model and not model.retired


def test_a_repair_that_restores_old_timestamps_is_retried(watched, fit_run):
    """``cp -p`` and ``rsync -a`` keep mtimes; the change still shows in ctime."""
    broken = shutil.copytree(fit_run.version_dir, watched.models_dir / "digits" / "2")
    (data,) = (broken / "variables").glob("variables.data-*")
    good, stamp = data.read_bytes(), data.stat()
    flipped = bytearray(good)
    flipped[100] ^= 0xFF
    data.write_bytes(bytes(flipped))
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    watched.refresh()
    assert watched.get().version == 1
    data.write_bytes(good)
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    watched.refresh()
    assert watched.get().version == 2


def test_folder_names_that_are_not_utf8_are_listed_not_fatal(watched):
    from app import create_app
    from app.config import Config

    os.mkdir(os.fsencode(watched.models_dir) + b"/\xff\xfe")
    os.mkdir(os.fsencode(watched.models_dir / "digits") + b"/\xff")
    app = create_app(Config(models_dir=watched.models_dir, model_name="digits",
                            model_poll_seconds=0))
    client = app.test_client()
    assert client.get("/models").get_json()["rejected"]["\\xff\\xfe"].startswith("not a model")
    assert client.get("/models/digits").get_json()["rejected"] == {
        "\\xff": "not a version number (ASCII digits only)"}
    index = client.post("/v2/repository/index").get_json()
    assert {"name": "digits", "version": "\\xff", "state": "UNAVAILABLE",
            "reason": "not a version number (ASCII digits only)"} in index


def test_litert_refuses_signature_defs_that_describe_no_tensors(watched, fit_run):
    folder = shutil.copytree(fit_run.version_dir, watched.models_dir / "digits" / "2")
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["signature_defs"] = {"serving_default": {}}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    store = ModelStore(watched.models_dir, "digits", prefer_tflite=True)
    store.load()
    assert store.get().version == 1
    assert "must have one input" in store.rejected_versions("digits")["2"]


@pytest.fixture
def eager_thread_switches():
    """Threads switch every microsecond instead of every 5 ms, so that a reader iterating
    a mapping the poll thread changes meets the change within seconds, not hours."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def hammer(app, stop: threading.Event, failures: list) -> None:
    """GET /models and POST /v2/repository/index until stopped; keep every non-2xx."""
    client = app.test_client()
    while not stop.is_set():
        for response in (client.get("/models"), client.post("/v2/repository/index")):
            if not 200 <= response.status_code < 300:
                failures.append((response.status_code, response.get_data(as_text=True)))


def test_listings_answer_while_the_watch_rejects_and_forgets_folders(
        tmp_path, untrained_tiny, eager_thread_switches):
    from app import create_app
    from app.config import Config

    model_dir = tmp_path / "digits"
    shutil.copytree(untrained_tiny, model_dir / "1")
    for version in range(100, 120):  # rejected at boot: long mappings to iterate
        (model_dir / str(version)).mkdir()
    app = create_app(Config(models_dir=tmp_path, model_name="digits",
                            model_poll_seconds=0.005))
    store = app.extensions["model_store"]
    stop, failures = threading.Event(), []
    threads = [threading.Thread(target=hammer, args=(app, stop, failures))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        for cycle in range(200):  # broken, then gone: one entry added, one removed
            name = str(200 + cycle)
            (model_dir / name).mkdir()
            wait_until(lambda n=name: n in store.rejected_versions("digits"),
                       f"version {name} rejected")
            (model_dir / name).rmdir()
            wait_until(lambda n=name: n not in store.rejected_versions("digits"),
                       f"version {name} forgotten")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        store.close()
    assert failures == []


def test_reasons_name_folders_relative_to_models_dir_and_hide_exception_text(
        tmp_path, untrained_tiny, caplog):
    from app import create_app
    from app.config import Config

    shutil.copytree(untrained_tiny, tmp_path / "digits" / "1")
    (shutil.copytree(untrained_tiny, tmp_path / "digits" / "2") / "metadata.json").unlink()
    (tmp_path / "digits" / "2" / "metadata.json").mkdir()  # read → IsADirectoryError
    mutilate_corrupt_pb(shutil.copytree(untrained_tiny, tmp_path / "digits" / "3"))
    shutil.copytree(tmp_path / "digits" / "2", tmp_path / "broken" / "1")
    with caplog.at_level(logging.WARNING):
        app = create_app(Config(models_dir=tmp_path, model_name="broken",
                                model_poll_seconds=0))
    client = app.test_client()
    answers = [client.get("/models"), client.post("/v2/repository/index"),
               client.get("/models/broken"), client.get("/ready"),
               client.post("/v2/models/broken/infer", json={"inputs": []})]
    assert [a.status_code for a in answers] == [200, 200, 503, 503, 503]
    for answer in answers:
        assert str(tmp_path) not in answer.get_data(as_text=True)
    rejected = client.get("/models/digits").get_json()["rejected"]
    assert rejected == {"2": "unreadable metadata.json: Is a directory",
                        "3": "SavedModel does not load (DecodeError)"}
    assert str(tmp_path / "digits" / "3") in caplog.text  # the detail is logged


def set_first_layer(field, value):
    return lambda m: m["summary"]["layers"][0].update({field: value})


BAD_METADATA = {  # what the server would send on, or the model page would trip over
    "huge integer in input": (lambda m: m.update(input={"x": 2**70}), "input/x"),
    "huge layer weights": (set_first_layer("weights", 2**70), "summary/layers/0/weights"),
    "huge extra total": (lambda m: m["summary"]["totals"].update(extra=2**70),
                         "summary/totals/extra"),
    "huge digit count": (lambda m: m.update(test={"per_class": [{"digit": 0, "x": -2**70}]}),
                         "test/per_class/0/x"),
    "huge signature field": (lambda m: m.update(signature_defs={
        "serving_default": {}, "other": {"x": [2**70]}}), "signature_defs/other/x/0"),
    "notes as a string": (lambda m: m["summary"].update(notes="read me"), "summary/notes"),
    "layer without a shape": (lambda m: m["summary"]["layers"][0].pop("output_shape"),
                              "summary/layers/0"),
    "accuracy as text": (lambda m: m.update(test={"accuracy": "high"}), "test/accuracy"),
    "arch as a number": (lambda m: m.update(arch=5), "arch"),
    "lone surrogate": (lambda m: m.update(arch="\ud800"), "arch"),
}


@pytest.mark.parametrize("bad", BAD_METADATA)
def test_metadata_the_server_cannot_send_rejects_its_version_alone(tmp_path, untrained_tiny,
                                                                   bad):
    from app import create_app
    from app.config import Config

    shutil.copytree(untrained_tiny, tmp_path / "digits" / "1")
    folder = shutil.copytree(untrained_tiny, tmp_path / "odd" / "1")
    change, where = BAD_METADATA[bad]
    metadata = json.loads((folder / "metadata.json").read_text())
    change(metadata)
    (folder / "metadata.json").write_text(json.dumps(metadata))
    client = create_app(Config(models_dir=tmp_path, model_name="digits",
                               model_poll_seconds=0)).test_client()
    for path in ("/models", "/models/digits", "/summary", "/models/digits/summary"):
        assert client.get(path).status_code == 200, path
    answer = client.get("/models/odd")
    assert answer.status_code == 503
    assert f"metadata.json is invalid at {where}" in answer.get_json()["error"]["message"]


class PublishOnFirstRejection(logging.Handler):
    """Copies a good version into the model folder the moment the store logs its first
    rejection (in the poll thread, mid-pass), then records what the store logs after."""

    def __init__(self, good: Path, target: Path):
        super().__init__()
        self.good, self.target, self.after = good, target, []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.target.exists():
            self.after.append(message)
        elif message.startswith("not serving"):
            shutil.copytree(self.good, self.target)


def test_a_good_version_published_while_bad_ones_load_waits_for_one_load_at_most(
        tmp_path, foreign_exports, untrained_tiny):
    model_dir = tmp_path / "digits"
    for version in range(1, 13):  # each fails only once loaded (NaN at warm-up)
        shutil.copytree(foreign_exports["nan_outputs"], model_dir / str(version))
    watcher = PublishOnFirstRejection(untrained_tiny, model_dir / "13")
    logger = logging.getLogger("app.model_store")
    logger.addHandler(watcher)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        store = ModelStore(tmp_path, "digits")
        store.load()  # the first poll: version 13 appears while it rejects version 12
        store.refresh()  # the second
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)
    assert store.get().version == 13
    served = next(i for i, message in enumerate(watcher.after)
                  if message.startswith("loaded digits version 13"))
    rejected_meanwhile = [m for m in watcher.after[:served] if m.startswith("not serving")]
    assert len(rejected_meanwhile) <= 1, rejected_meanwhile


def publish_with_a_huge_sparse_file(good: Path, target: Path) -> None:
    """The attack: a copy of ``good`` whose manifest lists a 60 GB sparse big.bin."""
    folder = shutil.copytree(good, target)
    with open(folder / "big.bin", "wb") as handle:
        handle.truncate(60 << 30)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["files"]["big.bin"] = {"bytes": 60 << 30, "sha256": "0" * 64}
    (folder / "metadata.json").write_text(json.dumps(metadata))


@pytest.mark.parametrize(("bounds", "reason"), [
    (Bounds(), "its files total 64424"),
    (Bounds(max_bytes=10**12), "big.bin is sparse ("),
])
def test_a_huge_sparse_file_in_a_manifest_costs_the_watch_nothing(watched, bounds, reason):
    """Hashing 60 GB of holes held the poll (and the version in LOADING) for minutes,
    and a good version published after it was not seen: now each bound alone refuses
    it from a stat, and the next poll serves the newcomer."""
    models = watched.models_dir / "digits"
    watched.bounds = bounds
    publish_with_a_huge_sparse_file(models / "1", models / "90")
    watched.refresh()
    assert watched.get().version == 1
    assert watched.rejected_versions("digits")["90"].startswith(reason)
    shutil.copytree(models / "1", models / "91")
    watched.refresh()
    assert watched.get().version == 91


def test_a_version_not_checked_in_time_is_tried_again_at_the_next_poll(watched):
    """Unlike a folder that failed a check, one that could not be checked in time may
    pass unchanged (the filesystem was slow): it is not held back until it changes."""
    models = watched.models_dir / "digits"
    shutil.copytree(models / "1", models / "2")
    watched.bounds = Bounds(seconds=0)
    watched.refresh()
    assert watched.get().version == 1
    assert "could not be checked within 0 s" in watched.rejected_versions("digits")["2"]
    watched.bounds = Bounds()  # the filesystem answers in time again; the folder is as it was
    watched.refresh()
    assert watched.get().version == 2
    assert "2" not in watched.rejected_versions("digits")
