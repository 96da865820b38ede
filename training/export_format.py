"""The on-disk export format, defined once: what a servable version folder is.

Training writes it (training/export.py), ``training.fit --if-missing`` checks it, and the
server's folder scanner and loader read it (app/repository.py, app/saved_model.py); all of
them ask this module, so "complete" cannot mean two things.

    <models>/<name>/<version>/   name: see valid_model_name
                                 version: ASCII digits only ("12", never "²" or "1.5")
        saved_model.pb, variables/variables.index, variables/variables.data-*
        model.tflite             the same network converted for LiteRT (float32)
        metadata.json            validated against METADATA_SCHEMA; "files" lists every
                                 other file with its size and SHA-256
        model.keras, plots/*.png

A version is written into a staging folder ``.tmp-<random>`` beside the versions and
renamed into place when complete. The writer holds an exclusive ``flock`` on the staging
folder's lock file while it works: the kernel drops that lock when the process dies, so
a staging folder whose lock can be taken is abandoned and is reclaimed — whatever the
writer's PID was (PID 1 in a container, or a PID of another PID namespace).

Nothing here imports TensorFlow or Keras: a server that never loads them (LiteRT) and a
training run both use it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

METADATA_FILE = "metadata.json"
SAVED_MODEL_FILE = "saved_model.pb"
VARIABLES_INDEX = "variables/variables.index"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"  # the same network for LiteRT (PREFER_TFLITE_MODEL)
SIGNATURE = "serving_default"
PLOTS_DIR = "plots"
STAGING_PREFIX = ".tmp-"
LOCK_FILE = ".export.lock"
# A staging folder with no lock file is younger than this while its writer starts (the
# lock is taken right after the folder is made) or after a writer of an older release.
STAGING_GRACE_SECONDS = 600
_VERSION_NAME = re.compile(r"0|[1-9][0-9]{0,17}")  # int64; "01" would alias "1"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # URL- and label-safe
_HASH_CHUNK = 1 << 20

_COUNT = {"type": "integer", "minimum": 0, "maximum": 10**12}  # memory sums stay in int64
METADATA_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "metadata.json of one exported version (only what the server reads)",
    "type": "object",
    "required": ["summary"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": ["integer", "null"]},
        "arch": {"type": ["string", "null"]},
        "created": {"type": "string"},
        "summary": {
            "type": "object",
            "required": ["layers", "totals"],
            "properties": {
                "layers": {"type": "array", "items": {
                    "type": "object", "required": ["name", "type", "params"],
                    "properties": {"name": {"type": "string"}, "type": {"type": "string"},
                                   "params": _COUNT}}},
                "totals": {"type": "object",
                           "required": ["params", "param_bytes", "activations_per_image"],
                           "properties": {"params": _COUNT, "param_bytes": _COUNT,
                                          "activations_per_image": {
                                              **_COUNT, "maximum": 10**9}}},
            },
        },
        "test": {"type": "object", "properties": {
            "accuracy": {"type": "number"},
            "per_class": {"type": "array", "items": {"type": "object"}}}},
        "input": {"type": "object"},
        # The SavedModel's SignatureDefs in protobuf's JSON form, so that a server that
        # never imports TensorFlow (LiteRT) still describes the tensors exactly.
        "signature_defs": {"type": "object", "required": [SIGNATURE]},
        "tflite": {"type": "object", "required": ["file"],
                   "properties": {"file": {"const": TFLITE_FILE}}},
        "files": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["bytes", "sha256"],
            "properties": {"bytes": _COUNT,
                           "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(METADATA_SCHEMA)


@dataclass(frozen=True)
class Check:
    """The verdict on one version folder: true when complete, else ``reason`` says why."""

    reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is None


def valid_model_name(name: str) -> bool:
    """Letters, digits, '_', '-' and '.', starting with a letter or digit, not all digits:
    a name that fits in a URL path segment and a metric label as it is."""
    return bool(_MODEL_NAME.fullmatch(name)) and not name.isdigit()


def parse_version(name: str) -> int | None:
    """The version a folder name stands for, or None: ASCII digits, no leading zero."""
    return int(name) if _VERSION_NAME.fullmatch(name) else None


def list_versions(model_dir: Path) -> list[int]:
    """The version folders present, ascending; other names are not versions."""
    if not model_dir.is_dir():
        return []
    return sorted(v for p in model_dir.iterdir()
                  if p.is_dir() and (v := parse_version(p.name)) is not None)


def next_version(model_dir: Path) -> int:
    """One above the highest version ever written (gaps are never reused)."""
    versions = list_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def read_metadata(folder: Path) -> dict[str, Any]:
    """The folder's metadata.json, validated; raises ValueError saying what is wrong."""
    try:
        text = (folder / METADATA_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"no {METADATA_FILE}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable {METADATA_FILE}: {err}") from None
    try:
        metadata = json.loads(text)
    except ValueError as err:
        raise ValueError(f"unreadable {METADATA_FILE}: {err}") from None
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(metadata))
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "top level"
        raise ValueError(f"{METADATA_FILE} is invalid at {where}: {error.message[:200]}")
    return metadata


def read_signature_defs(folder: Path) -> dict[str, Any]:
    """The SavedModel's SignatureDefs as TensorFlow Serving reports them: tensor names,
    DT_ dtypes and shapes straight from saved_model.pb, so the metadata endpoints of both
    protocols describe what was exported rather than what we believe was. Imports
    TensorFlow's protobuf modules: call it where TensorFlow is loaded anyway."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((folder / SAVED_MODEL_FILE).read_bytes())
    return {name: json_format.MessageToDict(signature, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
            for name, signature in saved.meta_graphs[0].signature_def.items()}


def complete(folder: Path) -> Check:
    """Whether ``folder`` holds a whole export, by files alone (no model is loaded).

    A manifest in metadata.json (every export writes one) is checked file by file, size
    and SHA-256, so a truncated or half-copied version is never taken for complete.
    """
    try:
        for required in (SAVED_MODEL_FILE, VARIABLES_INDEX):
            if not (folder / required).is_file():
                return Check(f"no {required} (incomplete export?)")
        metadata = read_metadata(folder)
        for name, expected in metadata.get("files", {}).items():
            problem = _file_problem(folder, name, expected)
            if problem:
                return Check(problem)
    except ValueError as err:
        return Check(str(err))
    except OSError as err:
        return Check(f"unreadable: {err}")
    return Check()


def _file_problem(folder: Path, name: str, expected: dict[str, Any]) -> str | None:
    path = folder / name
    if ".." in Path(name).parts or Path(name).is_absolute() or not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)"
    if _sha256(path) != expected["sha256"]:
        return f"{name} does not match its SHA-256 in the manifest (corrupt?)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` but the metadata and the lock: size and SHA-256."""
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.name not in (METADATA_FILE, LOCK_FILE))
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size,
                                               "sha256": _sha256(p)} for p in files}


@contextmanager
def staging(model_dir: Path) -> Iterator[Path]:
    """A locked, empty staging folder under ``model_dir``; removed unless published.

    Abandoned staging folders of other writers are reclaimed first.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    reclaim_staging(model_dir)
    folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=model_dir))
    folder.chmod(0o755)  # mkdtemp's 0700 would hide the version from a server's other uid
    # Locked before it gets its name: a reclaimer never finds the lock file unlocked.
    lock = os.open(folder / f"{LOCK_FILE}.new", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.rename(folder / f"{LOCK_FILE}.new", folder / LOCK_FILE)
        yield folder
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.close(lock)


def reclaim_staging(model_dir: Path) -> list[Path]:
    """Remove staging folders nobody writes to any more; returns what was removed."""
    removed = []
    for folder in model_dir.glob(STAGING_PREFIX + "*"):
        if folder.is_dir() and _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _abandoned(folder: Path) -> bool:
    """True when no live process holds the folder's lock (or, without a lock file,
    when the folder is older than the grace period)."""
    try:
        lock = os.open(folder / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > STAGING_GRACE_SECONDS
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(lock)
    return True


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON and fsync it, so a rename after it publishes complete bytes."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def publish(folder: Path, model_dir: Path, metadata: dict[str, Any]) -> Path:
    """Write metadata (with the manifest) and rename ``folder`` to the next free version.

    Retries with the next number if a concurrent export took this one; the staging
    folder's lock file is removed first, so it never appears in a version.
    """
    files = manifest(folder)
    (folder / LOCK_FILE).unlink(missing_ok=True)
    while True:
        version = next_version(model_dir)
        write_json(folder / METADATA_FILE, {**metadata, "version": version, "files": files})
        check = complete(folder)
        if not check:
            raise ValueError(f"refusing to publish an incomplete export: {check.reason}")
        target = model_dir / str(version)
        try:
            os.rename(folder, target)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue  # a concurrent export published this number first
            raise
        _fsync_dir(model_dir)
        return target


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
