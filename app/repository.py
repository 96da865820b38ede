"""The folder scanner (TF Serving's *Source*): what MODELS_DIR holds right now.

A scan lists every model folder and its version folders with a *fingerprint* — the
names, sizes and modification times of the files inside — so the store can tell a
version that changed from one it has already loaded or rejected, and retries a rejected
folder only when its contents change. A scan never raises and never blocks without a
bound: every entry that is not served is reported with a reason, alone.

The repository may be hostile or broken (RELIABILITY.md, "Hostile model repository"):

- entries are classified from ``lstat`` and the symlink policy of
  ``training.export_format.folder_entry`` (links are followed only inside MODELS_DIR);
  nothing is opened, so a FIFO or device never blocks a scan;
- a version folder is read to at most ``MAX_VERSION_ENTRIES`` entries and
  ``MAX_VERSION_DEPTH`` levels; one past them is rejected, and not read again until the
  folder itself changes (its inode, mtime or ctime);
- every listing and walk runs in a helper thread that the scan waits on for at most
  ``timeout`` seconds (a hung network filesystem): a version that cannot be read in time
  is rejected with that reason, one read before keeps its last fingerprint, and a call
  still stuck is not started again until it returns.

Hidden entries (``.tmp-*`` staging folders among them) are no part of the repository.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from training.export_format import (
    MAX_VERSION_DEPTH,
    MAX_VERSION_ENTRIES,
    NotAFolder,
    folder_entry,
    printable,
    scan_versions,
    valid_model_name,
)

Fingerprint = tuple[tuple[str, int, int, int, int], ...]
T = TypeVar("T")
SCAN_TIMEOUT_SECONDS = 10.0  # a local disk answers in milliseconds, even when loaded


@dataclass(frozen=True)
class VersionFolder:
    version: int
    path: Path
    fingerprint: Fingerprint  # empty when the folder could not be read
    error: str | None = None  # why it could not be read


@dataclass(frozen=True)
class ModelFolder:
    name: str
    path: Path
    versions: dict[int, VersionFolder] = field(default_factory=dict)
    odd: dict[str, str] = field(default_factory=dict)  # entry name → why it is no version


@dataclass(frozen=True)
class Snapshot:
    models: dict[str, ModelFolder]
    odd: dict[str, str]  # top-level entry name → why it is no model
    error: str | None = None  # MODELS_DIR itself missing or unreadable


class TooLarge(OSError):
    """A version folder past MAX_VERSION_ENTRIES or MAX_VERSION_DEPTH."""


class NoAnswer(OSError):
    """A filesystem call that did not return in time (it may still be running)."""


def fingerprint(folder: Path) -> Fingerprint:
    """(relative path, size, inode, mtime and ctime in ns) of every entry below
    ``folder``, sorted. ctime and inode change with any write, copy or chmod, even one
    that restores an old mtime (``cp -p``). Hidden entries (an editor's ``.#file``
    lock, ``.DS_Store``) are no part of an export and are left out, links are not
    followed, and an entry that vanishes while the folder is read is skipped (the next
    scan sees the folder as it then is). Raises TooLarge past the bounds."""
    entries = []
    for root, dirs, files in os.walk(folder, onerror=_raise):
        depth = len(Path(root).relative_to(folder).parts)
        if depth > MAX_VERSION_DEPTH:
            raise TooLarge(f"more than {MAX_VERSION_DEPTH} folder levels (not an export?)")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs + sorted(f for f in files if not f.startswith(".")):
            path = Path(root, name)
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            entries.append((printable(path.relative_to(folder).as_posix()), info.st_size,
                            info.st_ino, info.st_mtime_ns, info.st_ctime_ns))
            if len(entries) > MAX_VERSION_ENTRIES:
                raise TooLarge(f"more than {MAX_VERSION_ENTRIES} entries (not an export?)")
    return tuple(entries)


def _raise(error: OSError) -> None:
    raise error


class Scanner:
    """Scans one MODELS_DIR again and again, remembering what it needs to stay cheap and
    bounded: the folders refused for their size, and the reads still stuck."""

    def __init__(self, models_dir: Path, timeout: float = SCAN_TIMEOUT_SECONDS):
        """``timeout`` bounds each listing and walk (``calls`` runs them)."""
        self.models_dir = Path(models_dir)
        self.calls = BoundedCalls(timeout)
        self._too_large: dict[Path, tuple[tuple[int, ...], str]] = {}
        self._last: Snapshot = Snapshot({}, {})

    def scan(self) -> Snapshot:
        """Every model and version folder under MODELS_DIR, with what is odd about it."""
        try:
            entries = self._bounded("list", self.models_dir, self._top_level)
        except OSError as err:
            return Snapshot({}, {}, f"MODELS_DIR {self.models_dir} is unreadable: "
                                    f"{_reason(err)}")
        models, odd = {}, {}
        for name, reason in entries:
            if reason:
                odd[printable(name)] = reason
            else:
                models[name] = self.scan_model(self.models_dir / name)
        self._last = Snapshot(models, odd)
        self._forget(set(models))
        return self._last

    def _top_level(self) -> list[tuple[str, str]]:
        """(name, why it is no model or "") of each visible top-level entry."""
        with os.scandir(self.models_dir) as entries:
            names = sorted(e.name for e in entries if not e.name.startswith("."))
        return [(name, _model_entry(self.models_dir / name, self.models_dir))
                for name in names]

    def scan_folders(self, folders: dict[str, Path]) -> Snapshot:
        """The named model folders only (MODEL_CONFIG_FILE's base paths), each under the
        name the config gives it, which may differ from the folder's."""
        root = os.path.realpath(self.models_dir)
        models = {}
        for name, path in folders.items():
            # The config's check ran when the file was read; a link on the way may have
            # been switched since (the file unchanged), so the policy holds at each scan.
            if not Path(os.path.realpath(path)).is_relative_to(root):
                models[name] = ModelFolder(name, path, {},
                                           {"": "base_path leads outside MODELS_DIR"})
            else:
                models[name] = self.scan_model(path, name)
        self._last = Snapshot(models, {})
        self._forget({path.name for path in folders.values()})
        return self._last

    def scan_model(self, model_dir: Path, name: str | None = None) -> ModelFolder:
        """One model folder's versions, as model ``name`` (default: the folder's name);
        one that cannot be listed keeps the versions of the last scan (if any) and
        says why."""
        name = name or model_dir.name
        try:
            found, odd = self._bounded("list", model_dir,
                                       lambda: scan_versions(model_dir, self.models_dir))
        except OSError as err:
            last = self._last.models.get(name)
            return ModelFolder(name, model_dir, last.versions if last else {},
                               {"": f"unreadable: {_reason(err)}"})
        versions = {v: self._version(v, path, name) for v, path in found.items()}
        return ModelFolder(name, model_dir, versions, odd)

    def _version(self, version: int, path: Path, name: str) -> VersionFolder:
        """The version folder with its fingerprint, or with the reason it has none."""
        try:
            return VersionFolder(version, path, self._fingerprint(path))
        except NoAnswer as err:
            last = self._last.models.get(name)
            seen = last.versions.get(version) if last else None
            if seen is not None and seen.fingerprint:  # loaded or checked before: as it was
                return seen
            return VersionFolder(version, path, (), f"unreadable: {_reason(err)}")
        except OSError as err:
            return VersionFolder(version, path, (), f"unreadable: {_reason(err)}")

    def _fingerprint(self, path: Path) -> Fingerprint:
        """The folder's fingerprint; one refused for its size is not walked again until
        its own stat changes."""
        key = self._bounded("stat", path, lambda: _stat_key(path))
        refused = self._too_large.get(path)
        if refused is not None and refused[0] == key:
            raise TooLarge(refused[1])
        try:
            return self._bounded("walk", path, lambda: fingerprint(path))
        except TooLarge as err:
            self._too_large[path] = (key, str(err))
            raise

    def _forget(self, models: set[str]) -> None:
        self._too_large = {p: v for p, v in self._too_large.items()
                           if p.parent.name in models}

    def _bounded(self, what: str, path: Path, work: Callable[[], T]) -> T:
        return self.calls.run((what, path), work)


class BoundedCalls:
    """Filesystem calls that a caller waits on for at most ``timeout`` seconds each.

    Calls run one after another in a daemon thread (a thread per call cost the watch
    ~1 ms a call, 60-110 ms a poll over 60 versions): a thread stuck in the kernel (a
    hung NFS server) cannot be stopped, but it must neither hold the caller nor keep the
    worker from exiting. The stuck thread is left to its call and the next call gets a
    thread of its own, and the same call is not started again while it is stuck.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._pending: dict[Hashable, _Call] = {}
        self._runner: _Runner | None = None

    def run(self, key: Hashable, work: Callable[[], T]) -> T:
        """``work()``'s result; raises NoAnswer when the call under ``key`` (this one, or
        an earlier one still stuck) has not returned within ``timeout`` seconds."""
        call = self._pending.get(key)
        if call is None:
            call = self._pending[key] = _Call(work)
            if self._runner is None or not self._runner.submit(call):
                self._runner = _Runner()
                self._runner.submit(call)
        if not call.done.wait(self.timeout):
            if self._runner is not None and self._runner.current is call:
                self._runner = None  # stuck in this call: later calls need another thread
            raise NoAnswer(f"no answer within {self.timeout:g} s (a hung filesystem?); "
                           "tried again at a later scan")
        del self._pending[key]
        return call.result()

    @property
    def stuck(self) -> int:
        """How many calls have not returned yet (each holds one thread)."""
        return sum(not call.done.is_set() for call in self._pending.values())


class _Call:
    """One call; its result or error is kept for the caller."""

    def __init__(self, work: Callable[[], object]):
        self.done = threading.Event()
        self._work = work
        self._value: object = None
        self._error: Exception | None = None

    def execute(self) -> None:
        try:
            self._value = self._work()
        except Exception as err:  # noqa: BLE001 - raised in the caller by result()
            self._error = err
        finally:
            self.done.set()

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


class _Runner:
    """A daemon thread that runs the calls submitted to it in turn, and ends once idle
    for IDLE_SECONDS (a store that is gone leaves no thread behind)."""

    IDLE_SECONDS = 30.0

    def __init__(self):
        self.current: _Call | None = None
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open = True
        threading.Thread(target=self._loop, name="model-scan", daemon=True).start()

    def submit(self, call: _Call) -> bool:
        """Queue ``call``; False when this thread has ended (idle) and takes no more."""
        with self._lock:
            if self._open:
                self._calls.put(call)
            return self._open

    def _loop(self) -> None:
        while True:
            try:
                call = self._calls.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._calls.empty():
                        self._open = False
                        return
                continue
            self.current = call
            call.execute()
            self.current = None


def _model_entry(path: Path, root: Path) -> str:
    """Why the top-level entry ``path`` is no model folder, or "" when it may be one."""
    try:
        folder_entry(path, root)
    except NotAFolder as why:
        return str(why)
    except FileNotFoundError:
        return "removed while it was read"
    except OSError as err:
        return f"unreadable: {err.strerror}"
    if not valid_model_name(path.name):
        return "not a model name (letters, digits, '_', '-', '.'; not only digits)"
    return ""


def _stat_key(path: Path) -> tuple[int, ...]:
    """What changes when anything is added, removed or renamed in the folder itself."""
    info = path.stat()
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns,
            stat.S_IFMT(info.st_mode))


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__

