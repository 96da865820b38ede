"""app/affinity.py: each worker runs on its own CPU when the workers fill the CPUs evenly,
and every thread it starts (request threads, the batcher, the model's) stays there."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from app.affinity import cpu_for, pin
from app.config import Config, ConfigError
from tests.conftest import start_server, stop_server, wait_until

ALLOWED = sorted(os.sched_getaffinity(0))


def test_workers_take_the_cpus_in_turn_when_they_fill_them_evenly():
    assert [cpu_for(i, 2, {0, 1}, "auto") for i in range(2)] == [0, 1]
    assert [cpu_for(i, 4, {2, 5}, "auto") for i in range(4)] == [2, 5, 2, 5]
    assert [cpu_for(i, 3, {0, 1, 2}, "on") for i in range(3)] == [0, 1, 2]


def test_auto_leaves_uneven_or_sparse_workers_to_the_kernel():
    assert [cpu_for(i, 3, {0, 1}, "auto") for i in range(3)] == [None] * 3  # two on one core
    assert cpu_for(0, 2, set(range(64)), "auto") is None  # a pod that may use a whole node
    assert cpu_for(0, 1, {0, 1}, "auto") is None  # a lone worker keeps both cores


def test_on_pins_even_uneven_workers_and_off_never_pins():
    assert [cpu_for(i, 3, {0, 1}, "on") for i in range(3)] == [0, 1, 0]
    assert cpu_for(0, 2, {0, 1}, "off") is None


def test_a_system_without_cpu_affinity_leaves_workers_floating(monkeypatch):
    monkeypatch.delattr(os, "sched_setaffinity")
    assert pin(0, 1, "on") is None


def test_an_unknown_mode_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match="CPU_AFFINITY must be one of auto, on, off"):
        Config.from_env({"CPU_AFFINITY": "fast"})


def allowed_cpus(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of every thread of a process, from /proc."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found.add(frozenset(parse_cpu_list(line.split(":", 1)[1].strip())))
    return found


def parse_cpu_list(text: str) -> set[int]:
    """``0-3,6`` → {0, 1, 2, 3, 6}."""
    cpus = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def worker_cpus(server) -> list[set[frozenset[int]]]:
    return [allowed_cpus(pid) for pid in sorted(server.worker_pids())]


def test_each_worker_and_all_its_threads_run_on_its_own_cpu_even_after_a_restart(
        fit_run, tmp_path):
    server = start_server(fit_run.models_dir, tmp_path / "gunicorn.log",
                          WORKERS=str(len(ALLOWED)), PREFER_TFLITE_MODEL="1")
    try:
        expected = {frozenset({cpu}) for cpu in ALLOWED}
        placed = worker_cpus(server)
        assert all(len(threads) == 1 for threads in placed), placed  # no thread strays
        assert {next(iter(threads)) for threads in placed} == expected
        victim = server.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: server.log().count("pinned to CPU") == len(ALLOWED) + 1
                   and len(server.worker_pids()) == len(ALLOWED), "a replacement pinned")
        replaced = worker_cpus(server)
        assert {next(iter(threads)) for threads in replaced} == expected, replaced
    finally:
        stop_server(server)


def test_off_leaves_every_worker_on_every_cpu(fit_run, tmp_path):
    server = start_server(fit_run.models_dir, tmp_path / "gunicorn.log",
                          CPU_AFFINITY="off", PREFER_TFLITE_MODEL="1")
    try:
        assert worker_cpus(server) == [{frozenset(ALLOWED)}] * 2
    finally:
        stop_server(server)
    assert "pinned to CPU" not in server.log()
