"""app/affinity.py: each worker runs on its own CPU when the workers fill the CPUs evenly,
every thread it starts (request threads, the batcher, the model's) stays there, and
replacements and reloads keep the spread even."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.affinity import cpu_for
from app.config import Config, ConfigError
from tests.conftest import ROOT, start_server, stop_server, wait_until

CPUS = sorted(os.sched_getaffinity(0))[:2]  # the servers below run on at most two


def test_workers_take_the_least_used_cpu_in_turn():
    assert cpu_for(2, {0, 1}, [], "auto") == 0
    assert cpu_for(2, {0, 1}, [0], "auto") == 1
    assert cpu_for(4, {2, 5}, [2, 5, 2], "auto") == 5
    assert cpu_for(3, {0, 1, 2}, [None, 1], "on") == 0  # a floating worker holds none


def test_a_reload_then_a_replacement_keep_one_worker_per_cpu():
    old = [0, 1]
    new = []
    for _ in range(2):  # a HUP starts the new workers while the old ones still run
        new.append(cpu_for(2, {0, 1}, old + new, "auto"))
    assert sorted(new) == [0, 1]
    survivor = [cpu for cpu in new if cpu != new[1]]  # then one of the new ones dies
    assert cpu_for(2, {0, 1}, survivor, "auto") == new[1]


def test_auto_leaves_uneven_or_sparse_workers_to_the_kernel():
    assert cpu_for(3, {0, 1}, [], "auto") is None  # two would share a core
    assert cpu_for(2, set(range(64)), [], "auto") is None  # a pod that may use a whole node
    assert cpu_for(1, {0, 1}, [], "auto") is None  # a lone worker keeps both cores


def test_on_pins_even_uneven_workers_and_off_never_pins():
    assert cpu_for(3, {0, 1}, [0, 1], "on") == 0
    assert cpu_for(2, {0, 1}, [], "off") is None


FORKED_WORKER = """
import logging, os, runpy, sys, threading, types
hooks = runpy.run_path("app/gunicorn.conf.py")
logging.basicConfig(stream=sys.stdout, level="INFO", format="%(message)s")
server = types.SimpleNamespace(log=logging.getLogger("gunicorn.error"))
hooks["post_fork"](server, types.SimpleNamespace(pid=os.getpid(), cpu=int(sys.argv[1])))
seen = {}
thread = threading.Thread(target=lambda: seen.update(cpus=os.sched_getaffinity(0)))
thread.start()
thread.join()
print(sorted(os.sched_getaffinity(0)), sorted(seen["cpus"]))
"""


def test_a_cpu_the_system_refuses_leaves_the_worker_floating(tmp_path):
    """gunicorn's post_fork hook, in a process of its own, given a CPU the kernel
    refuses (EINVAL): it warns, and the worker and the threads it starts keep every CPU
    they had."""
    before = sorted(os.sched_getaffinity(0))
    worker = subprocess.run(
        [sys.executable, "-c", FORKED_WORKER, "10000"], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert worker.returncode == 0, worker.stderr
    assert "could not be pinned to CPU 10000: left floating" in worker.stdout
    assert worker.stdout.splitlines()[-1] == f"{before} {before}"


def test_a_cpu_the_system_grants_pins_the_worker_and_its_threads(tmp_path):
    """The same hook given a CPU it may use: the control for the test above."""
    worker = subprocess.run(
        [sys.executable, "-c", FORKED_WORKER, str(CPUS[-1])], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert worker.returncode == 0, worker.stderr
    assert f"pinned to CPU {CPUS[-1]}" in worker.stdout
    assert worker.stdout.splitlines()[-1] == f"{[CPUS[-1]]} {[CPUS[-1]]}"


def test_an_unknown_mode_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match="CPU_AFFINITY must be one of auto, on, off"):
        Config.from_env({"CPU_AFFINITY": "fast"})


def parse_cpu_list(text: str) -> set[int]:
    """``0-3,6`` → {0, 1, 2, 3, 6}."""
    cpus = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def thread_cpus(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of a process's threads, from /proc (threads that end while
    they are read are skipped)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found.add(frozenset(parse_cpu_list(line.split(":", 1)[1].strip())))
    return found


def worker_cpus(server) -> list[int]:
    """Each worker's one CPU, asserting that every thread of it is there."""
    cpus = []
    for pid in sorted(server.worker_pids()):
        (threads,) = thread_cpus(pid)  # all threads alike
        assert len(threads) == 1, f"worker {pid} may run on {sorted(threads)}"
        cpus.append(next(iter(threads)))
    return cpus


@contextmanager
def on_cpus(cpus: list[int]):
    """Start what is started inside on these CPUs only (children inherit the mask)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def workers_settled(server, count: int, pins: int) -> bool:
    return (server.log().count("pinned to CPU") == pins
            and len(server.worker_pids()) == count)


def test_each_worker_runs_on_its_own_cpu_through_a_reload_and_a_replacement(
        fit_run, tmp_path):
    with on_cpus(CPUS):
        server = start_server(fit_run.models_dir, tmp_path / "gunicorn.log",
                              WORKERS=str(len(CPUS)), PREFER_TFLITE_MODEL="1")
    try:
        assert sorted(worker_cpus(server)) == CPUS
        server.process.send_signal(signal.SIGHUP)  # new workers, then the old ones go
        wait_until(lambda: workers_settled(server, len(CPUS), 2 * len(CPUS)), "a reload")
        assert sorted(worker_cpus(server)) == CPUS
        os.kill(max(server.worker_pids()), signal.SIGKILL)
        wait_until(lambda: workers_settled(server, len(CPUS), 2 * len(CPUS) + 1),
                   "a replacement pinned")
        assert sorted(worker_cpus(server)) == CPUS
    finally:
        stop_server(server)


def test_off_leaves_every_worker_on_every_cpu(fit_run, tmp_path):
    with on_cpus(CPUS):
        server = start_server(fit_run.models_dir, tmp_path / "gunicorn.log",
                              CPU_AFFINITY="off", PREFER_TFLITE_MODEL="1")
    try:
        assert [thread_cpus(pid) for pid in server.worker_pids()] == [{frozenset(CPUS)}] * 2
    finally:
        stop_server(server)
    assert "pinned to CPU" not in server.log()
