"""Which CPU a gunicorn worker runs on (CPU_AFFINITY), as nginx's ``worker_cpu_affinity``.

A worker is one Python process whose request threads and model threads take turns on
whichever core the kernel picks. Left floating, a worker's threads migrate between the
cores and each call to the model finds its 4.7 MB of weights in the other core's cache:
measured in one process with 8 request threads, pinning it to one core cut the CPU per
request from 1.8 ms to 1.1 ms (LiteRT) and from 2.0 ms to 1.4 ms (SavedModel), and over
HTTP at c=32 raised req/s by ~10% for both runtimes (BENCHMARKS.md).

Pinning is only safe when the workers spread evenly over the CPUs this process may use:
``auto`` pins when the worker count is a whole multiple of them (2 workers on 2 CPUs,
4 on 2), and otherwise leaves placement to the kernel — 3 workers on 2 CPUs would put
two on one core, and 2 workers in a pod that may run on all 64 CPUs of its node would
pile every replica onto CPUs 0 and 1.
"""

from __future__ import annotations

import os
from collections.abc import Collection

MODES = ("auto", "on", "off")


def cpu_for(index: int, workers: int, allowed: Collection[int], mode: str) -> int | None:
    """The CPU worker number ``index`` (0, 1, …) should be pinned to, or None to float.

    Workers take the allowed CPUs in turn, so ``workers`` a multiple of them puts the
    same number on each."""
    cpus = sorted(allowed)
    if mode == "off" or not cpus:
        return None
    if mode == "auto" and workers % len(cpus) != 0:
        return None
    return cpus[index % len(cpus)]


def pin(index: int, workers: int, mode: str) -> int | None:
    """Pin the calling process (a freshly forked worker, before it starts any thread:
    threads inherit it) to its CPU; returns that CPU, or None when left floating (also
    where the system has no CPU affinity call, as on macOS)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = cpu_for(index, workers, os.sched_getaffinity(0), mode)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    return cpu
