"""Freeing retired versions at once (BENCHMARKS.md, "Memory over hot swaps").

A loaded version is a web of reference cycles (a SavedModel's trackable objects,
functions and captured variables; LiteRT's interpreter and its signature runner), so
when the store drops a retired version its reference counts never reach zero: only
Python's cyclic collector frees it, and that collector's full pass runs rarely in a
process holding TensorFlow's ~330,000 long-lived objects (it waits until the survivors
of younger passes reach a quarter of them). A worker kept every retired CNN, ~8 MB each:
+335 MB after 40 swaps, levelling off only once full passes began to run. glibc's arenas
were not the cause: ``MALLOC_ARENA_MAX=2`` left the growth as it was, and
``malloc_trim(0)`` after each collection gave back about 1 MB.

So the store runs a full collection after each swap (``reclaim``), and the objects that
exist before the first version loads (TensorFlow's or LiteRT's, the app's: modules and
registries kept for the process's life) are moved out of the collector's sight first
(``freeze_imports``): a full pass then looks at ~20,000 objects, not 330,000 with
TensorFlow or 48,000 with LiteRT.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)
_frozen = False


def freeze_imports() -> None:
    """Once per process, after importing the runtime and before loading the first
    version: what exists now lives as long as the process (modules, their registries),
    and ``gc.freeze`` keeps every later collection from scanning it again. A version
    loaded before this call would never be collected, hence "before the first"."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def reclaim() -> None:
    """The full collection, run by the store right after a refresh that swapped (in the
    watch thread, or at boot), when the versions it retired have become unreachable."""
    started = time.perf_counter()
    unreachable = gc.collect()
    log.info("collected %d unreachable objects after a swap in %.1f ms", unreachable,
             (time.perf_counter() - started) * 1000)
