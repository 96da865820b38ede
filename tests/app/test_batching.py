"""app/batching.py: concurrent requests share model calls, and nothing mixes or hangs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.batching import MicroBatcher
from app.errors import BatchTimeout, ModelFailed, ModelNotReady
from app.model_store import ModelStore
from training.data import to_model_input


@pytest.fixture(scope="module")
def model(served_models):
    """The real trained CNN, loaded as the server loads it, batching off."""
    store = ModelStore(served_models, "mnist_cnn")
    store.load()
    return store.get()


@pytest.fixture(scope="module")
def requests_(mnist):
    """60 requests of 1 to 3 real test digits each."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 4, 60)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [to_model_input(mnist.x_test[s:s + n]) for s, n in zip(starts, sizes, strict=True)]


@pytest.fixture
def batcher(model):
    running = MicroBatcher(model.predict, max_size=32, timeout_ms=5)
    yield running
    running.close()


def test_many_concurrent_clients_get_exactly_their_own_results(batcher, model, requests_):
    with ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(batcher.run, requests_))
    for images, result in zip(requests_, batched, strict=True):
        direct = model.predict(images)
        assert result.shape == direct.shape
        np.testing.assert_allclose(result, direct, atol=1e-5)
        assert (result.argmax(axis=1) == direct.argmax(axis=1)).all()
    assert max(batcher.batch_sizes) > 3  # requests were really combined


def test_a_batch_never_exceeds_the_maximum(model, requests_):
    small = MicroBatcher(model.predict, max_size=4, timeout_ms=5)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(small.run, requests_))
    small.close()
    assert max(small.batch_sizes) <= 4


def test_a_request_larger_than_the_maximum_runs_alone(model, mnist):
    small = MicroBatcher(model.predict, max_size=4, timeout_ms=5)
    images = to_model_input(mnist.x_test[:10])
    np.testing.assert_allclose(small.run(images), model.predict(images), atol=1e-5)
    small.close()
    assert list(small.batch_sizes) == [10]


def test_a_lone_request_is_never_held_waiting_for_company(model, requests_):
    patient = MicroBatcher(model.predict, max_size=64, timeout_ms=5_000)
    started = time.perf_counter()
    patient.run(requests_[0])
    assert time.perf_counter() - started < 1.0  # far below the 5 s it may wait for others
    patient.close()


def test_an_arriving_request_is_waited_for_and_joins_the_batch(model, requests_):
    patient = MicroBatcher(model.predict, max_size=64, timeout_ms=2_000)
    results = {}
    with patient.arriving() as ticket:
        other = threading.Thread(target=lambda: results.update(b=patient.run(requests_[1])))
        other.start()
        time.sleep(0.2)
        assert other.is_alive()  # held: a request it knows of is still arriving
        results["a"] = ticket.run(requests_[0])
    other.join(5)
    patient.close()
    assert list(patient.batch_sizes) == [len(requests_[0]) + len(requests_[1])]
    np.testing.assert_allclose(results["b"], model.predict(requests_[1]), atol=1e-5)


def test_a_request_that_stops_arriving_releases_the_batch(model, requests_):
    patient = MicroBatcher(model.predict, max_size=64, timeout_ms=5_000)
    with pytest.raises(ValueError), patient.arriving():
        raise ValueError("this request's image was unreadable")
    started = time.perf_counter()
    patient.run(requests_[0])
    assert time.perf_counter() - started < 1.0
    patient.close()


def test_a_poisoned_request_fails_alone(model, requests_):
    poison = np.full((1, 28, 28, 1), -1.0, np.float32)

    def fragile(images):
        if (images == -1.0).all(axis=(1, 2, 3)).any():
            raise RuntimeError("kernel crashed")
        return model.predict(images)

    batcher = MicroBatcher(fragile, max_size=64, timeout_ms=20)
    inputs = [*requests_[:8], poison, *requests_[8:16]]
    with ThreadPoolExecutor(17) as pool:
        futures = [pool.submit(batcher.run, images) for images in inputs]
    batcher.close()
    for images, future in zip(inputs, futures, strict=True):
        if images is poison:
            with pytest.raises(ModelFailed):
                future.result()
        else:
            np.testing.assert_allclose(future.result(), model.predict(images), atol=1e-5)


def test_a_request_waiting_behind_others_has_a_deadline(requests_):
    def stuck(images):
        time.sleep(2)
        return np.zeros((len(images), 10), np.float32)

    slow = MicroBatcher(stuck, max_size=8, timeout_ms=1, deadline_s=0.2)
    first = threading.Thread(target=slow.run, args=(requests_[0],))
    first.start()  # alone: it runs at once and keeps the model busy for 2 s
    time.sleep(0.1)
    started = time.perf_counter()
    with pytest.raises(BatchTimeout):
        slow.run(requests_[1])
    assert time.perf_counter() - started < 1.0
    first.join()
    slow.close(timeout=5)


def test_a_lone_request_runs_in_its_own_thread(model, requests_):
    threads = []

    def recording(images):
        threads.append(threading.current_thread())
        return model.predict(images)

    batcher = MicroBatcher(recording, max_size=8, timeout_ms=1)
    batcher.run(requests_[0])
    batcher.close()
    assert threads == [threading.current_thread()]


def test_shutdown_answers_requests_in_flight_then_refuses(model, requests_):
    gate = threading.Event()

    def held(images):
        gate.wait(10)
        return model.predict(images)

    batcher = MicroBatcher(held, max_size=2, timeout_ms=1)
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(batcher.run, images) for images in requests_[:12]]
        deadline = time.monotonic() + 10
        while batcher.queued() < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        closer = threading.Thread(target=batcher.close, kwargs={"timeout": 30})
        closer.start()
        gate.set()
        closer.join(30)
        results = [f.result(timeout=30) for f in futures]
    assert [len(r) for r in results] == [len(images) for images in requests_[:12]]
    with pytest.raises(ModelNotReady, match="shutting down"):
        batcher.run(requests_[0])
