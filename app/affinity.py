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
pile every replica onto CPUs 0 and 1. The master chooses each new worker's CPU from the
CPUs its live workers hold (the least used), so replacements and reloads keep the spread
even; the choice is made per spawn, so after TTIN/TTOU to an uneven count new workers
float while the others stay where they are.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable

MODES = ("auto", "on", "off")


def cpu_for(workers: int, allowed: Collection[int], taken: Iterable[int | None],
            mode: str) -> int | None:
    """The CPU for a new worker, or None to leave it floating: the allowed CPU that
    the fewest live workers hold (``taken``: their CPUs), the lowest on a tie."""
    cpus = sorted(allowed)
    if mode == "off" or not cpus:
        return None
    if mode == "auto" and workers % len(cpus) != 0:
        return None
    load = dict.fromkeys(cpus, 0)
    for cpu in taken:
        if cpu in load:
            load[cpu] += 1
    return min(cpus, key=lambda cpu: (load[cpu], cpu))


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on; none where the system cannot tell (macOS)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set()


def pin(cpu: int) -> bool:
    """Pin the calling process (a freshly forked worker, before it starts any thread:
    threads inherit it) to ``cpu``; False where the system refuses (the CPU left the
    cpuset meanwhile, a sandbox forbids it), and the worker then floats. Only called
    with a CPU from ``allowed_cpus``, so where the call is missing it is never reached."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return False
    return True
