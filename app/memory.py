"""Freeing retired versions at once (BENCHMARKS.md, "Memory over hot swaps").

A loaded SavedModel is a web of reference cycles (its trackable objects, functions and
captured variables point at each other), so when the store drops a retired version its
reference counts never reach zero: only Python's cyclic collector frees it, and that
collector's full pass runs rarely in a process holding TensorFlow's ~300,000 long-lived
objects (it waits until they have grown by a quarter). A worker kept every retired CNN,
~8 MB each: +330 MB over 40 swaps, levelling off only when a full pass finally ran.
glibc's arenas were not the cause: ``malloc_trim(0)`` after each swap and
``MALLOC_ARENA_MAX=2`` each changed the plateau by about 1 MB.

So the store runs a full collection after each swap (``reclaim``), and the objects that
exist before the first version loads (TensorFlow's, the app's: modules and registries
kept for the process's life) are moved out of the collector's sight first
(``freeze_imports``): a full pass then looks at ~20,000 objects, not 330,000 with
TensorFlow or 48,000 with LiteRT alone.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)
_frozen = False


def freeze_imports() -> None:
    """Once per process, after importing TensorFlow and before loading the first
    version: what exists now lives as long as the process (modules, their registries),
    and ``gc.freeze`` keeps every later collection from scanning it again. A version
    loaded before this call would never be freed, hence "before the first"."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def reclaim() -> None:
    """The full collection, run by the store's watch thread right after a swap, when the
    versions it retired have become unreachable."""
    started = time.perf_counter()
    unreachable = gc.collect()
    log.info("collected %d unreachable objects after a swap in %.1f ms", unreachable,
             (time.perf_counter() - started) * 1000)
