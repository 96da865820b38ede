"""The folder scanner (TF Serving's *Source*): what MODELS_DIR holds right now.

A scan lists every model folder and its version folders with a *fingerprint* — the
names, sizes and modification times of the files inside — so the store can tell a
version that changed from one it has already loaded or rejected, and retries a rejected
folder only when its contents change. A scan never raises: an unreadable folder and a
name that is not a version (``²``, ``1.5``, ``latest``) are reported with a reason.
Hidden entries (``.tmp-*`` staging folders among them) and plain files are not models
or versions and are left out silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from training.export_format import parse_version, valid_model_name

Fingerprint = tuple[tuple[str, int, int, int, int], ...]


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
    odd: dict[str, str] = field(default_factory=dict)  # folder name → why it is no version


@dataclass(frozen=True)
class Snapshot:
    models: dict[str, ModelFolder]
    odd: dict[str, str]  # top-level folder name → why it is no model
    error: str | None = None  # MODELS_DIR itself missing or unreadable


def fingerprint(folder: Path) -> Fingerprint:
    """(relative path, size, inode, mtime and ctime in ns) of every entry below
    ``folder``, sorted. ctime and inode change with any write, copy or chmod, even one
    that restores an old mtime (``cp -p``). Hidden entries (an editor's ``.#file``
    lock, ``.DS_Store``) are no part of an export and are left out, links are not
    followed, and an entry that vanishes while the folder is read is skipped (the next
    scan sees the folder as it then is)."""
    entries = []
    for root, dirs, files in os.walk(folder, onerror=_raise):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs + sorted(f for f in files if not f.startswith(".")):
            path = Path(root, name)
            try:
                stat = path.lstat()
            except FileNotFoundError:
                continue
            entries.append((printable(path.relative_to(folder).as_posix()), stat.st_size,
                            stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns))
    return tuple(entries)


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not (Python keeps them as
    surrogates) become ``\\xff`` escapes, so the name can be logged and sent as JSON."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _raise(error: OSError) -> None:
    raise error


def scan(models_dir: Path) -> Snapshot:
    """Every model and version folder under ``models_dir``, with what is odd about it."""
    try:
        entries = sorted(_folders(models_dir))
    except OSError as err:
        return Snapshot({}, {}, f"MODELS_DIR {models_dir} is unreadable: {err.strerror}")
    models, odd = {}, {}
    for name in entries:
        if not valid_model_name(name):
            odd[printable(name)] = ("not a model name (letters, digits, '_', '-', '.'; "
                         "not only digits)")
            continue
        models[name] = scan_model(models_dir / name)
    return Snapshot(models, odd)


def scan_model(model_dir: Path) -> ModelFolder:
    """One model folder's versions; an unreadable model folder has none."""
    try:
        names = sorted(_folders(model_dir))
    except OSError as err:
        return ModelFolder(model_dir.name, model_dir, odd={"": f"unreadable: {err.strerror}"})
    versions, odd = {}, {}
    for name in names:
        version = parse_version(name)
        if version is None:
            odd[printable(name)] = "not a version number (ASCII digits only)"
            continue
        path = model_dir / name
        try:
            versions[version] = VersionFolder(version, path, fingerprint(path))
        except OSError as err:
            versions[version] = VersionFolder(version, path, (), f"unreadable: {err}")
    return ModelFolder(model_dir.name, model_dir, versions, odd)


def _folders(parent: Path) -> list[str]:
    """Names of the visible folders in ``parent``; raises OSError if it is unreadable."""
    with os.scandir(parent) as entries:
        return [e.name for e in entries
                if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)]
