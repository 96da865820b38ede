"""Atomic, versioned exports in TensorFlow Serving's layout: ``<models>/<name>/<version>/``.

A version folder holds the SavedModel (written by Keras 3's ``model.export``, servable
without Keras), the ``.keras`` file, ``metadata.json`` and ``plots/``. Everything is
written into a hidden staging folder beside the versions and renamed into place only
when complete: a rename within one filesystem is atomic, so a crash leaves at most a
``.tmp-*`` folder (never a number), and an existing version is never overwritten.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

STAGING_PREFIX = ".tmp-"
METADATA_FILE = "metadata.json"
KERAS_FILE = "model.keras"
PLOTS_DIR = "plots"


def list_versions(model_dir: Path) -> list[int]:
    """The version numbers present, ascending; anything not all digits is ignored."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def complete_versions(model_dir: Path) -> list[int]:
    """Versions with a SavedModel and metadata: what a server could load."""
    return [v for v in list_versions(model_dir)
            if (model_dir / str(v) / "saved_model.pb").is_file()
            and (model_dir / str(v) / METADATA_FILE).is_file()]


def next_version(model_dir: Path) -> int:
    """One above the highest version ever written (gaps are never reused)."""
    versions = list_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(model_dir: Path) -> None:
    """Delete staging folders left by exports whose process has died."""
    for path in model_dir.glob(STAGING_PREFIX + "*"):
        pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON and fsync it, so a rename after it publishes complete bytes."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(staging: Path, model_dir: Path, metadata: dict[str, Any]) -> Path:
    """Rename staging to the next free version, retrying if another export took it."""
    while True:
        version = next_version(model_dir)
        write_json(staging / METADATA_FILE, {**metadata, "version": version})
        target = model_dir / str(version)
        try:
            os.rename(staging, target)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue  # a concurrent export published this number first
            raise
        _fsync_dir(model_dir)
        return target


def export_version(
    model: keras.Model,
    model_dir: Path,
    metadata: dict[str, Any],
    write_artifacts: Callable[[Path], None] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Export ``model`` as the next version under ``model_dir`` and return its folder.

    ``write_artifacts(folder)`` adds files (plots) to the staging folder's ``plots/``;
    ``write_extra(folder)`` adds files to the version folder itself (the PyTorch
    ``model.pt``), so they are published atomically with the rest. If anything fails,
    the staging folder is removed and no version appears.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(model_dir)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=model_dir))
    try:
        model.export(str(staging), format="tf_saved_model", verbose=False)
        model.save(staging / KERAS_FILE)
        if write_artifacts is not None:
            (staging / PLOTS_DIR).mkdir()
            write_artifacts(staging / PLOTS_DIR)
        if write_extra is not None:
            write_extra(staging)
        return _publish(staging, model_dir, metadata)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
