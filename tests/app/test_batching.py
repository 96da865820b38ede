"""app/batching.py: concurrent requests share model calls, and nothing mixes or hangs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app.batching import Deadline, MicroBatcher, on_batcher_death
from app.errors import DeadlineExceeded, ModelFailed, ModelNotReady, Overloaded
from app.metrics import Metrics
from app.model_store import ModelStore
from app.servable import _Direct
from tests.conftest import wait_until
from training.data import to_model_input


@pytest.fixture(scope="module")
def model(fit_run):
    """The real trained CNN, loaded as the server loads it, batching off."""
    store = ModelStore(fit_run.models_dir, "mnist_cnn")
    store.load()
    return store.get()


@pytest.fixture(scope="module")
def requests_(mnist):
    """60 requests of 1 to 3 real test digits each."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 4, 60)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [to_model_input(mnist.x_test[s:s + n]) for s, n in zip(starts, sizes, strict=True)]


def queue_gauge():
    """A real ``model_queue_requests`` gauge for a batcher, and its value as /metrics
    exports it: how the tests see requests waiting for a batch."""
    metrics = Metrics()
    return (metrics.queued.labels("model"),
            lambda: metrics.registry.get_sample_value("model_queue_requests",
                                                      {"model": "model"}))


def recording(predict, calls: list[int]):
    """``predict``, noting the number of images of each model call in ``calls``."""
    def call(images):
        calls.append(len(images))
        return predict(images)
    return call


def held_until_all_arrive(predict, gate: threading.Event):
    """``predict`` whose first call waits (up to 60 s) for ``gate``: the requests sent
    meanwhile queue behind it, so they must share the calls that follow."""
    first = threading.Lock()

    def call(images):
        if first.acquire(blocking=False):
            gate.wait(60)
        return predict(images)
    return call


def test_many_concurrent_clients_get_exactly_their_own_results(model, requests_):
    calls, gate = [], threading.Event()
    gauge, queued = queue_gauge()
    batcher = MicroBatcher(recording(held_until_all_arrive(model.predict, gate), calls),
                           max_size=32, timeout_ms=5, queue_gauge=gauge)
    with ThreadPoolExecutor(len(requests_)) as pool:
        futures = [pool.submit(batcher.run, images) for images in requests_]
        wait_until(lambda: queued() == len(requests_) - 1, "all but one queued")
        gate.set()
        batched = [future.result(timeout=60) for future in futures]
    batcher.close()
    for images, result in zip(requests_, batched, strict=True):
        direct = model.predict(images)
        assert result.shape == direct.shape
        np.testing.assert_allclose(result, direct, atol=1e-5)
        assert (result.argmax(axis=1) == direct.argmax(axis=1)).all()
    # Each image was computed once, and the 59 queued requests shared a few calls.
    assert sum(calls) == sum(map(len, requests_))
    assert len(calls) <= 1 + -(-sum(map(len, requests_[1:])) // 32) + 1, calls


def test_a_batch_never_exceeds_the_maximum(model, requests_):
    calls = []
    small = MicroBatcher(recording(model.predict, calls), max_size=4, timeout_ms=5)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(small.run, requests_))
    small.close()
    assert sum(calls) == sum(map(len, requests_)) and max(calls) <= 4


def test_a_request_larger_than_the_maximum_runs_alone(model, mnist):
    calls = []
    small = MicroBatcher(recording(model.predict, calls), max_size=4, timeout_ms=5)
    images = to_model_input(mnist.x_test[:10])
    np.testing.assert_allclose(small.run(images), model.predict(images), atol=1e-5)
    small.close()
    assert calls == [10]


def test_a_request_that_fills_a_batch_runs_at_once_beside_a_held_batch(model, mnist,
                                                                        requests_):
    gate, seen, calls = threading.Event(), [], []

    def small_ones_held(images):
        if len(images) < 4:
            seen.append(len(images))
            gate.wait(60)
        return model.predict(images)

    gauge, queued = queue_gauge()
    batcher = MicroBatcher(recording(small_ones_held, calls), max_size=4,
                           timeout_ms=600_000, queue_gauge=gauge)
    first = occupy(batcher, requests_[0], seen)  # holds the model until the gate opens
    full = to_model_input(mnist.x_test[:4])
    try:
        result = {}
        assert finishes(lambda: result.update(full=batcher.run(full)))
        np.testing.assert_allclose(result["full"], model.predict(full), atol=1e-5)
        assert first.is_alive() and queued() == 0  # it never queued behind it
    finally:
        gate.set()
        first.join(60)
        batcher.close()
    assert calls == [len(requests_[0]), 4]


def finishes(target, *args, within: float = 60.0) -> bool:
    """Whether ``target(*args)`` returns within ``within`` s: far below the 10-minute
    batch timeouts these tests set, so a slow machine cannot make them pass or fail."""
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    thread.join(within)
    return not thread.is_alive()


def test_a_lone_request_is_never_held_waiting_for_company(model, requests_):
    calls = []
    patient = MicroBatcher(recording(model.predict, calls), max_size=64, timeout_ms=600_000)
    assert finishes(patient.run, requests_[0])
    patient.close()
    assert calls == [len(requests_[0])]


def test_an_arriving_request_is_waited_for_and_joins_the_batch(model, requests_):
    calls = []
    gauge, queued = queue_gauge()
    patient = MicroBatcher(recording(model.predict, calls), max_size=64, timeout_ms=600_000,
                           queue_gauge=gauge)
    results = {}
    with patient.arriving() as ticket:
        other = threading.Thread(target=lambda: results.update(b=patient.run(requests_[1])))
        other.start()
        wait_until(lambda: queued() >= 1, "1 queued")
        assert other.is_alive()  # held: a request it knows of is still arriving
        results["a"] = ticket.run(requests_[0])
    other.join(60)
    patient.close()
    assert calls == [len(requests_[0]) + len(requests_[1])]
    np.testing.assert_allclose(results["b"], model.predict(requests_[1]), atol=1e-5)


def test_a_request_that_stops_arriving_releases_the_batch(model, requests_):
    patient = MicroBatcher(model.predict, max_size=64, timeout_ms=600_000)
    with pytest.raises(ValueError), patient.arriving():
        raise ValueError("this request's image was unreadable")
    assert finishes(patient.run, requests_[0])
    patient.close()


def test_a_poisoned_request_fails_alone(model, requests_):
    poison = np.full((1, 28, 28, 1), -1.0, np.float32)
    gate, calls = threading.Event(), []

    def fragile(images):
        calls.append(len(images))
        gate.wait(60)  # the first call holds the model until every request is queued
        if (images == -1.0).all(axis=(1, 2, 3)).any():
            calls[-1] = ("poisoned", len(images))
            raise RuntimeError("kernel crashed")
        return model.predict(images)

    gauge, queued = queue_gauge()
    batcher = MicroBatcher(fragile, max_size=64, timeout_ms=1, queue_gauge=gauge)
    inputs = [requests_[0], *requests_[1:8], poison, *requests_[8:16]]
    with ThreadPoolExecutor(17) as pool:
        futures = [pool.submit(batcher.run, inputs[0])]
        wait_until(lambda: calls, "the first model call")
        futures += [pool.submit(batcher.run, images) for images in inputs[1:]]
        wait_until(lambda: queued() >= len(inputs) - 1, "every request queued")
        gate.set()
    batcher.close()
    queued_images = sum(len(images) for images in inputs[1:])
    # The poison really was batched with the 15 others, then re-run alone.
    assert ("poisoned", queued_images) in calls and ("poisoned", 1) in calls
    for images, future in zip(inputs, futures, strict=True):
        if images is poison:
            with pytest.raises(ModelFailed):
                future.result()
        else:
            np.testing.assert_allclose(future.result(), model.predict(images), atol=1e-5)


def held_model(gate: threading.Event, seen: list):
    """A model that records what it is given and answers only once ``gate`` is set."""
    def predict(images):
        seen.append(images)
        gate.wait(60)
        return np.zeros((len(images), 10), np.float32)
    return predict


def occupy(batcher: MicroBatcher, images, seen: list) -> threading.Thread:
    """Start a lone request, which runs at once and holds the (gated) model."""
    first = threading.Thread(target=batcher.run, args=(images,))
    first.start()
    wait_until(lambda: seen, "the first model call")
    return first


def test_a_request_waiting_behind_others_has_a_deadline_and_is_never_computed(requests_):
    gate, seen = threading.Event(), []
    slow = MicroBatcher(held_model(gate, seen), max_size=8, timeout_ms=1)
    first = occupy(slow, requests_[0], seen)
    with pytest.raises(DeadlineExceeded, match="waited for the model"):
        slow.run(requests_[1], deadline=Deadline(0.2))  # the model is held: only this ends it
    gate.set()
    first.join()
    slow.close(timeout=30)
    assert len(seen) == 1  # dropped before the model: it computed the first request only


def test_a_full_queue_is_overloaded_at_once(requests_):
    gate, seen = threading.Event(), []
    gauge, queued = queue_gauge()
    batcher = MicroBatcher(held_model(gate, seen), max_size=64, timeout_ms=1, queue_gauge=gauge)
    first = occupy(batcher, requests_[0], seen)
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(batcher.run, requests_[i], max_queue=2) for i in (1, 2)]
        wait_until(lambda: queued() >= 2, "2 queued")
        with pytest.raises(Overloaded, match="QUEUE_MAX_REQUESTS") as refused:
            batcher.run(requests_[3], max_queue=2)
        gate.set()
        assert [len(f.result(timeout=60)) for f in waiting] == [len(requests_[1]),
                                                                 len(requests_[2])]
    first.join()
    batcher.close()
    assert refused.value.status == 503 and refused.value.retry_after == 1
    # the two queued ones ran as one batch; the refused request never reached the model
    assert [len(images) for images in seen] == [len(requests_[0]),
                                                len(requests_[1]) + len(requests_[2])]


def test_a_lone_request_past_its_deadline_never_reaches_the_model(requests_):
    gate, seen = threading.Event(), []
    gate.set()
    batcher = MicroBatcher(held_model(gate, seen), max_size=8, timeout_ms=1)
    with pytest.raises(DeadlineExceeded, match="before the model ran"):
        batcher.run(requests_[0], deadline=Deadline(0.0))
    batcher.close()
    assert seen == []


def test_without_batching_a_model_failure_is_a_model_error_and_deadlines_hold(requests_):
    def broken(images):
        raise RuntimeError("kernel crashed")

    with pytest.raises(ModelFailed):
        _Direct(broken).run(requests_[0])
    with pytest.raises(DeadlineExceeded):
        _Direct(broken).run(requests_[0], deadline=Deadline(0.0))


def test_a_dead_batcher_refuses_at_once_and_calls_its_death_handlers(requests_):
    deaths = []
    unregister = on_batcher_death(lambda: deaths.append(1))

    def fatal(images):
        raise SystemExit("a BaseException escaping the model")

    gauge, queued = queue_gauge()
    batcher = MicroBatcher(fatal, max_size=8, timeout_ms=600_000, queue_gauge=gauge)
    try:
        with batcher.arriving():  # keeps the next request off the lone path: it queues
            waiting = ThreadPoolExecutor(1).submit(batcher.run, requests_[0])
            wait_until(lambda: queued() >= 1, "1 queued")
        with pytest.raises(ModelNotReady, match="stopped"):
            waiting.result(timeout=60)  # answered at once, not after 30 s
        assert not batcher.alive and deaths == [1]
        with pytest.raises(ModelNotReady, match="replaced"):
            batcher.run(requests_[1])
    finally:
        unregister()


def test_a_lone_request_runs_in_its_own_thread(model, requests_):
    threads = []

    def recording(images):
        threads.append(threading.current_thread())
        return model.predict(images)

    batcher = MicroBatcher(recording, max_size=8, timeout_ms=1)
    batcher.run(requests_[0])
    batcher.close()
    assert threads == [threading.current_thread()]


def test_shutdown_answers_requests_in_flight_then_refuses(model, mnist):
    gate, seen = threading.Event(), []
    gauge, queued = queue_gauge()
    batcher = MicroBatcher(held_model(gate, seen), max_size=2, timeout_ms=1, queue_gauge=gauge)
    singles = [to_model_input(mnist.x_test[i:i + 1]) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(batcher.run, images) for images in singles]
        wait_until(lambda: queued() == 11, "11 queued behind the first")
        closer = threading.Thread(target=batcher.close, kwargs={"timeout": 60})
        closer.start()
        wait_until(lambda: not batcher.alive, "the close to begin")
        with pytest.raises(ModelNotReady, match="shutting down"):
            batcher.run(singles[0])  # refused while the queue is still being answered
        gate.set()
        closer.join(60)
        assert not closer.is_alive()  # close returned: the batcher thread ended
        results = [future.result(timeout=60) for future in futures]
    assert [len(result) for result in results] == [1] * 12 and queued() == 0
    assert [len(images) for images in seen] == [1, 2, 2, 2, 2, 2, 1]  # then 11 queued, by 2


def sleeps(thread: threading.Thread) -> int:
    """How often ``thread`` has gone to sleep in the kernel (voluntary context switches,
    from /proc): once per wake-up of a thread that then waits again."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines()
                if line.startswith("voluntary_ctxt_switches:"))


def waiting(thread: threading.Thread) -> bool:
    """``thread`` is blocked in the kernel on a futex (a lock or condition), not running
    or runnable, from /proc."""
    task = Path(f"/proc/self/task/{thread.native_id}")
    state = next(line for line in (task / "status").read_text().splitlines()
                 if line.startswith("State:"))
    return "S (sleeping)" in state and (task / "wchan").read_text().startswith("futex")


def test_a_lone_request_never_wakes_the_batcher_thread(model, requests_):
    """The lone lane costs nothing: waking the batcher for each of a lone request's
    steps cost it ~0.4 ms of GIL hand-offs (BENCHMARKS.md). The real model releases the
    GIL while it computes, which is when a woken batcher thread would run."""
    calls, others = [], set(threading.enumerate())
    batcher = MicroBatcher(recording(model.predict, calls), max_size=8, timeout_ms=1)
    (thread,) = set(threading.enumerate()) - others  # the batcher's own
    wait_until(lambda: waiting(thread), "the batcher thread to wait for work")
    before = sleeps(thread)
    for images in requests_ * 5:  # 300 requests, one at a time
        with batcher.arriving() as ticket:
            ticket.run(images)
    woken = sleeps(thread) - before
    batcher.close()
    assert calls == [len(images) for images in requests_ * 5]
    assert woken <= 3, f"the batcher thread ran {woken} times for 300 lone requests"
