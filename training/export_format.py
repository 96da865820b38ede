"""The on-disk export format, defined once: what a servable version folder is.

Training writes it (training/export.py), ``training.fit --if-missing`` checks it, and the
server's folder scanner and loader read it (app/repository.py, app/model_store.py); all of
them ask ``servable`` here, so the exporter cannot publish, nor ``--if-missing`` accept, a
version the server would refuse for anything short of running it.

    <models>/<name>/<version>/   name: see valid_model_name
                                 version: ASCII digits only ("12", never "²" or "1.5")
        saved_model.pb, variables/variables.index, variables/variables.data-*
        model.tflite             the same network converted for LiteRT (float32)
        metadata.json            validated against METADATA_SCHEMA; "files" lists every
                                 other file with its size and SHA-256
        model.keras, plots/*.png
        (metadata.json's "drift_reference": the inputs' reference distributions)

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
import itertools
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import jsonschema

METADATA_FILE = "metadata.json"
SAVED_MODEL_FILE = "saved_model.pb"
VARIABLES_INDEX = "variables/variables.index"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"  # the same network for LiteRT (PREFER_TFLITE_MODEL)
SIGNATURE = "serving_default"
INPUT_SHAPE = [-1, 28, 28, 1]  # the serving signature: a batch of MNIST images in,
OUTPUT_SHAPE = [-1, 10]  # one probability per digit out
PLOTS_DIR = "plots"
# TF Serving's warm-up records (training/warmup.py writes them, app/warmup.py replays
# them); listed in the manifest like every other file. TF Serving reads at most 1,000.
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
WARMUP_MAX_RECORDS = 1000
STAGING_PREFIX = ".tmp-"
LOCK_FILE = ".export.lock"
# A staging folder with no lock file is younger than this while its writer starts (the
# lock is taken right after the folder is made) or after a writer of an older release.
STAGING_GRACE_SECONDS = 600
_VERSION_NAME = re.compile(r"0|[1-9][0-9]{0,17}")  # int64; "01" would alias "1"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # URL- and label-safe
_HASH_CHUNK = 1 << 20
# Size limits per file kind read whole into memory: an export's metadata.json is ~12 KB
# and a plot ~30 KB, so these leave room for growth while a 1 GB (even sparse) file in
# their place is refused before it is read.
METADATA_LIMIT_BYTES = 1 << 20
PLOT_LIMIT_BYTES = 8 << 20
# The most entries a version folder may hold, and how deep: an export has about 15
# files two levels deep, so a folder far past these is no export (``ln -s /usr 3``) and
# is refused without being read to the end.
MAX_VERSION_ENTRIES = 1000
MAX_VERSION_DEPTH = 8
# How deep metadata.json may nest: an export's is 8 levels deep (a signature's dims).
# Validation recurses once per level or more, so a file hundreds deep would raise
# RecursionError in every reader instead of being refused with a reason.
MAX_METADATA_DEPTH = 32
# What checking a version's files may cost. An export's files total ~5 MB, so a manifest
# over VERSION_LIMIT_BYTES is no export, and a listed file with far fewer bytes on disk
# than its size (a 60 GB ``truncate -s``) is refused from its stat, before it is read;
# hashing stops at CHECK_SECONDS (a slow filesystem) and the version is tried again
# later. The server takes both from MODEL_MAX_BYTES and MODEL_CHECK_SECONDS.
VERSION_LIMIT_BYTES = 1 << 30
CHECK_SECONDS = 10.0
SPARSE_MIN_BYTES = 1 << 20  # smaller files may be stored inline or in a compressed tail
SPARSE_RATIO = 8  # size over bytes on disk: far beyond what compression does to weights

# What the server sends on from metadata.json goes out through orjson, which refuses an
# integer beyond 64 bits and a lone surrogate (a 500 on every listing): every field it
# reads is typed and bounded here, so such a file rejects its version at load instead.
_INT64_MAX = 2**63 - 1
_TEXT = {"type": "string", "pattern": "^[^\ud800-\udfff]*$"}
_VALUE = {"$ref": "#/$defs/value"}  # any JSON that can be sent on, at any depth
_COUNT = {"type": "integer", "minimum": 0, "maximum": 10**12}  # memory sums stay in int64
_ACTIVATIONS = {**_COUNT, "maximum": 10**9}  # × 4 bytes × MAX_BATCH stays in int64
_RATIO = {"type": "number", "minimum": 0, "maximum": 1}
_SHAPE = {"type": "array", "minItems": 1, "maxItems": 16,
          "items": {"type": ["integer", "null"], "minimum": 0, "maximum": 10**9}}
# The reference distributions the server's drift index compares live inputs with
# (training/reference.py writes them, app/drift.py reads them): the predicted digit's
# ten counts, and a histogram of each input statistic with its bin edges in [0, 1].
DRIFT_REFERENCE = "drift_reference"
DRIFT_HISTOGRAMS = ("ink_fraction", "mean_intensity", "bbox_size")
DRIFT_MAX_BINS = 20
# A dimension's size as protobuf's JSON form writes an int64: a string ("-1" unknown).
_DIM_SIZE = r"-1|0|[1-9][0-9]{0,17}"


def _record(required: list[str], **properties: dict[str, Any]) -> dict[str, Any]:
    """An object sent on whole: the named fields typed, any others sendable JSON."""
    return {"type": "object", "required": required, "properties": properties,
            "propertyNames": _TEXT, "additionalProperties": _VALUE}


# One tensor of a SignatureDef exactly as ``json_format.MessageToDict`` writes it: the
# metadata endpoints of both protocols describe it from these fields alone.
_TENSOR = _record(["dtype", "tensor_shape"], name=_TEXT, dtype=_TEXT, tensor_shape=_record(
    ["dim"], unknown_rank={"const": False}, dim={"type": "array", "items": _record(
        ["size"], name=_TEXT, size={"type": "string", "pattern": f"^({_DIM_SIZE})$"})}))
_TENSORS = {"type": "object", "propertyNames": _TEXT, "additionalProperties": _TENSOR}
_BIN_COUNTS = {"type": "array", "minItems": 1, "maxItems": DRIFT_MAX_BINS, "items": _COUNT}
_HISTOGRAM = _record(["edges", "counts"], counts=_BIN_COUNTS, edges={
    "type": "array", "minItems": 2, "maxItems": DRIFT_MAX_BINS + 1,
    "items": {"type": "number", "minimum": 0, "maximum": 1}})
_DRIFT_REFERENCE = _record(
    ["images", "statistics"], images={**_COUNT, "minimum": 1}, statistics=_record(
        ["digit", *DRIFT_HISTOGRAMS],
        digit=_record(["counts"], counts={**_BIN_COUNTS, "minItems": 10, "maxItems": 10}),
        **dict.fromkeys(DRIFT_HISTOGRAMS, _HISTOGRAM)))

METADATA_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "metadata.json of one exported version (every field the server reads)",
    "$defs": {"value": {
        "type": ["object", "array", "string", "number", "boolean", "null"],
        "minimum": -_INT64_MAX - 1, "maximum": _INT64_MAX, "pattern": _TEXT["pattern"],
        "items": _VALUE, "propertyNames": _TEXT, "additionalProperties": _VALUE}},
    "type": "object",
    "required": ["summary"],
    "properties": {
        "name": _TEXT,
        "version": {"type": ["integer", "null"], "minimum": 0, "maximum": _INT64_MAX},
        "arch": {**_TEXT, "type": ["string", "null"]},
        "created": _TEXT,
        # The model page (app/static/model.js) reads each layer's shape and counts.
        "summary": {
            "type": "object",
            "required": ["layers", "totals"],
            "properties": {
                "layers": {"type": "array", "items": _record(
                    ["name", "type", "output_shape", "weights", "biases", "params",
                     "activations"],
                    name=_TEXT, type=_TEXT, input_shape=_SHAPE, output_shape=_SHAPE,
                    weights=_COUNT, biases=_COUNT, params=_COUNT, trainable_params=_COUNT,
                    activations=_ACTIVATIONS)},
                "totals": _record(["params", "param_bytes", "activations_per_image"],
                                  params=_COUNT, trainable_params=_COUNT,
                                  param_bytes=_COUNT, activations_per_image=_ACTIVATIONS),
                "notes": {"type": "array", "items": _TEXT},
            },
        },
        "test": {"type": "object", "properties": {
            "accuracy": {**_RATIO, "type": ["number", "null"]},
            "per_class": {"type": "array", "items": _record(
                [], digit={"type": "integer", "minimum": 0, "maximum": 9},
                correct=_COUNT, total=_COUNT, accuracy=_RATIO)}}},
        "input": _record([]),
        # The SavedModel's SignatureDefs in protobuf's JSON form, so that a server that
        # never imports TensorFlow (LiteRT) still describes the tensors exactly.
        "signature_defs": _record([SIGNATURE], **{
            SIGNATURE: _record([], inputs=_TENSORS, outputs=_TENSORS)}),
        DRIFT_REFERENCE: _DRIFT_REFERENCE,
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
    """The verdict on one version folder: true when complete, else ``reason`` says why;
    ``retry`` when the folder may pass unchanged (it could not be checked in time)."""

    reason: str | None = None
    retry: bool = False

    def __bool__(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class Bounds:
    """What checking one version's files may cost: bytes listed, seconds of hashing."""

    max_bytes: int = VERSION_LIMIT_BYTES
    seconds: float = CHECK_SECONDS


DEFAULT_BOUNDS = Bounds()


class TooSlow(Exception):
    """Hashing a file ran past its deadline."""


def valid_model_name(name: str) -> bool:
    """Letters, digits, '_', '-' and '.', starting with a letter or digit, not all digits:
    a name that fits in a URL path segment and a metric label as it is."""
    return bool(_MODEL_NAME.fullmatch(name)) and not name.isdigit()


def parse_version(name: str) -> int | None:
    """The version a folder name stands for, or None: ASCII digits, no leading zero."""
    return int(name) if _VERSION_NAME.fullmatch(name) else None


class NotAFolder(ValueError):
    """An entry where a model or version folder was expected, and why it is none."""


def folder_entry(path: Path, root: Path) -> Path:
    """``path`` as a folder that may be scanned, or NotAFolder saying why not.

    The symlink policy, in one place: a link is followed only when it resolves inside
    ``root`` (MODELS_DIR), to a folder that does not hold the link itself, so a
    ``current -> 7`` style switch works while a loop, a dangling link or a link out of
    the repository (``ln -s /usr 3``) is refused as one entry. Never opens anything
    (a FIFO or device in place of a folder is refused from its ``lstat``).
    """
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        try:
            target = Path(os.path.realpath(path, strict=True))
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise NotAFolder("a symlink loop") from None
            if err.errno == errno.ENOENT:
                raise NotAFolder("a dangling symlink") from None
            raise
        if Path(os.path.realpath(path.parent)).is_relative_to(target):
            raise NotAFolder("a symlink to a folder that holds it (a loop)")
        if not target.is_relative_to(os.path.realpath(root)):
            raise NotAFolder("a symlink that leads outside MODELS_DIR")
        info = target.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise NotAFolder(f"{_kind(info.st_mode)}, not a folder")
    return path


def _kind(mode: int) -> str:
    """What a file of ``mode`` is, in words, for the reason an entry is refused."""
    for test, kind in ((stat.S_ISREG, "a file"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file or folder"


def scan_versions(model_dir: Path, root: Path | None = None
                  ) -> tuple[dict[int, Path], dict[str, str]]:
    """The one version scanner (training's ``--if-missing`` and export, and the server's
    folder scanner): version → folder, and each other visible entry → why it is no
    version. Hidden entries (``.tmp-*`` staging folders) are no part of the repository.
    ``root`` is MODELS_DIR for the symlink policy (default: the model folder's parent);
    raises OSError only when ``model_dir`` itself cannot be listed."""
    root = model_dir.parent if root is None else root
    versions, odd = {}, {}
    with os.scandir(model_dir) as entries:
        for count, entry in enumerate(e for e in entries if not e.name.startswith(".")):
            if count == MAX_VERSION_ENTRIES:
                odd["…"] = f"more than {MAX_VERSION_ENTRIES} entries; the rest are not read"
                break
            version, reason = _version_entry(Path(entry.path), root)
            if version is None:
                odd[printable(entry.name)] = reason
            else:
                versions[version] = Path(entry.path)
    return dict(sorted(versions.items())), dict(sorted(odd.items()))


def _version_entry(path: Path, root: Path) -> tuple[int | None, str]:
    """(version, "") for a version folder, else (None, why it is none)."""
    try:
        folder_entry(path, root)
    except NotAFolder as why:
        return None, str(why)
    except FileNotFoundError:  # removed while the folder was read
        return None, "removed while it was read"
    except OSError as err:
        return None, f"unreadable: {err.strerror}"
    version = parse_version(path.name)
    if version is None:
        return None, "not a version number (ASCII digits only)"
    return version, ""


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not (Python keeps them as
    surrogates) become ``\\xff`` escapes, so the name can be logged and sent as JSON."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def list_versions(model_dir: Path) -> list[int]:
    """The servable-looking version folders present, ascending (see scan_versions)."""
    try:
        return list(scan_versions(model_dir)[0])
    except (FileNotFoundError, NotADirectoryError):
        return []


def next_version(model_dir: Path) -> int:
    """One above the highest version name ever written (gaps are never reused), counting
    a file or a bad link that holds a version's name: a rename cannot replace it."""
    try:
        names = [e.name for e in os.scandir(model_dir)]
    except (FileNotFoundError, NotADirectoryError):
        return 1
    versions = [v for name in names if (v := parse_version(name)) is not None]
    return max(versions) + 1 if versions else 1


def read_metadata(folder: Path) -> dict[str, Any]:
    """The folder's metadata.json, validated; raises ValueError saying what is wrong."""
    try:
        data = read_regular(folder / METADATA_FILE, METADATA_LIMIT_BYTES)
    except FileNotFoundError:
        raise ValueError(f"no {METADATA_FILE}") from None
    except OSError as err:  # its strerror: the message would name the absolute path
        reason = err.strerror or type(err).__name__
        raise ValueError(f"unreadable {METADATA_FILE}: {reason}") from None
    too_deep = f"{METADATA_FILE} is nested deeper than {MAX_METADATA_DEPTH} levels"
    try:
        metadata = json.loads(data.decode("utf-8"))
    except RecursionError:  # the parser's own limit (~1,000 levels) comes first
        raise ValueError(too_deep) from None
    except ValueError as err:
        raise ValueError(f"unreadable {METADATA_FILE}: {err}") from None
    if _deeper_than(metadata, MAX_METADATA_DEPTH):
        raise ValueError(too_deep)
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(metadata))
    if error is not None:
        where = "/".join(map(str, error.absolute_path)) or "top level"
        raise ValueError(f"{METADATA_FILE} is invalid at {where}: {error.message[:200]}")
    return metadata


def _deeper_than(value: Any, limit: int) -> bool:
    """True when ``value`` nests objects and arrays more than ``limit`` levels deep;
    walked with a stack of its own, so no depth can exhaust the interpreter's."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def read_regular(path: Path, limit: int, inside: Path | None = None) -> bytes:
    """The bytes of ``path`` when it is a regular file of at most ``limit`` bytes that
    resolves inside ``inside`` (default: its own folder); raises OSError otherwise."""
    with open_regular(path, limit, inside) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew since it was checked
        raise OSError(errno.EFBIG, f"{path.name} has more than the {limit} bytes allowed")
    return data


def open_regular(path: Path, limit: int, inside: Path | None = None) -> BinaryIO:
    """``path`` opened for reading when it is a regular file of at most ``limit`` bytes
    that resolves inside ``inside`` (default: its own folder); raises OSError otherwise.

    Opened non-blocking, so a FIFO or device named like the file never holds the
    reader (the poll thread, a booting worker), and checked on the open descriptor, so
    what is read is what was checked even if the name is swapped meanwhile.
    """
    inside = path.parent if inside is None else inside
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(inside)):
        raise OSError(errno.EACCES, f"{path.name} leads outside its folder")
    handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY |
                               os.O_CLOEXEC), "rb")
    try:
        opened = _opened_path(handle.fileno(), path)
        if not Path(opened).is_relative_to(os.path.realpath(inside)):
            raise OSError(errno.EACCES, f"{path.name} leads outside its folder")
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{path.name} is {_kind(info.st_mode)}, "
                                        "not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"{path.name} has {info.st_size} bytes, more than "
                                       f"the {limit} allowed")
    except BaseException:
        handle.close()
        raise
    return handle


def _opened_path(fd: int, path: Path) -> str:
    """Where the open descriptor ``fd`` really leads: a link swapped in between the
    check of the name and the open (a rename race) shows here, not in the name."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: the name, resolved again, is the best left
        return os.path.realpath(path)


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


def servable(folder: Path, read_graph: bool = False, bounds: Bounds = DEFAULT_BOUNDS) -> Check:
    """Whether the server will serve ``folder``, by every check that runs no model: the
    files (``complete``), then the serving signature that metadata.json describes — and,
    with ``read_graph``, the one saved_model.pb holds (that imports TensorFlow's protobuf
    modules: for callers that load TensorFlow anyway). Only what needs the model loaded
    is left to the runtimes: its parameter count against the metadata, and finite
    answers at warm-up. ``bounds`` limits what checking the files may cost."""
    check = complete(folder, bounds)
    if not check:
        return check
    try:
        metadata = read_metadata(folder)
    except ValueError as err:  # changed since complete() read it
        return Check(str(err))
    if "signature_defs" not in metadata and (folder / TFLITE_FILE).exists():
        return Check(f"{METADATA_FILE} has no signature_defs, which {TFLITE_FILE} needs")
    described = [metadata.get("signature_defs")]
    if read_graph:
        try:
            described.append(read_signature_defs(folder))
        except Exception as err:  # noqa: BLE001 - protobuf's DecodeError, OSError, …
            return Check(f"SavedModel does not load ({type(err).__name__})")
    for signature_defs in described:
        if signature_defs is not None and (problem := signature_problem(signature_defs)):
            return Check(problem)
    if DRIFT_REFERENCE in metadata and (problem := reference_problem(metadata[DRIFT_REFERENCE])):
        return Check(problem)
    return Check()


def reference_problem(reference: dict[str, Any]) -> str | None:
    """What the schema cannot say is wrong with a drift reference, or None: each
    histogram has one count fewer than edges, its edges rise, and every statistic
    counts each of the reference's images once."""
    statistics = reference["statistics"]
    for name in ("digit", *DRIFT_HISTOGRAMS):
        counts = statistics[name]["counts"]
        if sum(counts) != reference["images"]:
            return (f"{DRIFT_REFERENCE} {name} counts {sum(counts)} images, not the "
                    f"{reference['images']} it says it has")
    for name in DRIFT_HISTOGRAMS:
        edges, counts = statistics[name]["edges"], statistics[name]["counts"]
        # `not a < b`, not `b <= a`: a NaN edge (JSON allows it) compares false both ways.
        if len(edges) != len(counts) + 1 or any(
                not a < b for a, b in itertools.pairwise(edges)):
            return (f"{DRIFT_REFERENCE} {name} needs rising edges, one more than its "
                    f"{len(counts)} counts")
    return None


def signature_problem(signature_defs: dict[str, Any]) -> str | None:
    """What is wrong with the serving signature, or None: one float input of
    INPUT_SHAPE and one output of OUTPUT_SHAPE, in protobuf's JSON form."""
    serving = signature_defs.get(SIGNATURE)
    if not isinstance(serving, dict):
        return f"no {SIGNATURE!r} signature"
    inputs, outputs = serving.get("inputs"), serving.get("outputs")
    if not (isinstance(inputs, dict) and isinstance(outputs, dict)
            and len(inputs) == 1 == len(outputs)
            and all(isinstance(t, dict) for t in (*inputs.values(), *outputs.values()))):
        return (f"the {SIGNATURE!r} signature must have one input (images) and one output "
                "(probabilities)")
    for role, tensor, expected in (("input", *inputs.values(), INPUT_SHAPE),
                                   ("output", *outputs.values(), OUTPUT_SHAPE)):
        shape = _shape(tensor)
        if shape is None:
            return (f"{SIGNATURE} {role} has a tensor_shape not in protobuf's JSON form "
                    '(each dim {"size": "<int64>"}, a known rank)')
        if tensor.get("dtype") != "DT_FLOAT" or shape != expected:
            return (f"{SIGNATURE} {role} is {tensor.get('dtype')} {shape}, "
                    f"expected DT_FLOAT {expected}")
    return None


def _shape(tensor: dict[str, Any]) -> list[int] | None:
    """The tensor's shape when it is written exactly as protobuf's JSON form writes one
    (each dimension a ``"size"`` string such as ``"-1"``, a known rank), else None: the
    metadata endpoints send these sizes as they are, so a missing or fractional one
    must refuse the version, not fail (or be rounded) on a request."""
    shape = tensor.get("tensor_shape")
    if not isinstance(shape, dict) or shape.get("unknown_rank", False) is not False:
        return None
    dims = shape.get("dim")
    if not isinstance(dims, list) or not all(isinstance(d, dict) for d in dims):
        return None
    sizes = [d.get("size") for d in dims]
    if not all(isinstance(s, str) and re.fullmatch(_DIM_SIZE, s) for s in sizes):
        return None
    return [int(s) for s in sizes]


def complete(folder: Path, bounds: Bounds = DEFAULT_BOUNDS) -> Check:
    """Whether ``folder`` holds a whole export, by files alone: servable's first part.

    A manifest in metadata.json (every export writes one) is checked file by file, size
    and SHA-256, so a truncated or half-copied version is never taken for complete —
    within ``bounds``: a manifest past ``max_bytes`` is refused unread, and one that
    takes longer than ``seconds`` to hash is refused for now (``retry``).
    """
    try:
        for required in (SAVED_MODEL_FILE, VARIABLES_INDEX):
            if not (folder / required).is_file():
                return Check(f"no {required} (incomplete export?)")
        files = read_metadata(folder).get("files")
        if files is None:
            return Check(f"{METADATA_FILE} has no manifest (\"files\"), which every export "
                         "writes: the loader would read files nothing checked")
        problem = _unlisted(folder, files)
        if problem:
            return Check(problem)
        listed = sum(expected["bytes"] for expected in files.values())
        if listed > bounds.max_bytes:
            return Check(f"its files total {listed} bytes, more than the "
                         f"{bounds.max_bytes} allowed (MODEL_MAX_BYTES)")
        deadline = time.monotonic() + bounds.seconds
        for name, expected in files.items():
            problem = _file_problem(folder, name, expected, deadline)
            if problem:
                return Check(problem)
    except TooSlow as slow:
        return Check(f"{slow} could not be checked within {bounds.seconds:g} s (a slow "
                     "filesystem?); tried again at a later poll", retry=True)
    except ValueError as err:
        return Check(str(err))
    except OSError as err:
        name = os.path.relpath(os.fsdecode(err.filename), folder) if err.filename else "."
        return Check(f"{name} is unreadable: {err.strerror}")
    return Check()


def _unlisted(folder: Path, files: dict[str, Any]) -> str | None:
    """The first entry of ``folder`` the loaders might read that the manifest does not
    list, or that is no regular file or folder (a FIFO would hold a loader for good),
    or None. Hidden entries (an editor's lock) are no part of an export."""
    seen = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in [*dirs, *names]:
            seen += 1
            if name.startswith(".") or seen > MAX_VERSION_ENTRIES:
                continue
            path = Path(root, name)
            relative = path.relative_to(folder).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode) and name in dirs:
                continue
            if not stat.S_ISREG(mode):
                return f"{relative} is {_kind(mode)}, not a regular file"
            if relative != METADATA_FILE and relative not in files:
                return f"{relative} is not in the manifest (added after the export?)"
    return None


def _file_problem(folder: Path, name: str, expected: dict[str, Any],
                  deadline: float) -> str | None:
    """What is wrong with the listed file ``name``, or None; raises TooSlow (naming
    it) when hashing it runs past ``deadline`` (``time.monotonic``)."""
    path = folder / name
    if ".." in Path(name).parts or Path(name).is_absolute() or not path.is_file():
        return f"{name} is missing"
    info = path.stat()
    if info.st_size != expected["bytes"]:
        return (f"{name} has {info.st_size} bytes, the manifest says {expected['bytes']} "
                "(truncated?)")
    if info.st_size > SPARSE_MIN_BYTES and info.st_blocks * 512 * SPARSE_RATIO < info.st_size:
        return (f"{name} is sparse ({info.st_blocks * 512} of its {info.st_size} bytes "
                "are on disk): no export writes one")
    try:
        digest = _sha256(path, deadline)
    except TooSlow:
        raise TooSlow(name) from None
    if digest != expected["sha256"]:
        return f"{name} does not match its SHA-256 in the manifest (corrupt?)"
    return None


def _sha256(path: Path, deadline: float = float("inf")) -> str:
    """The file's SHA-256; raises TooSlow once ``deadline`` has passed between chunks."""
    digest = hashlib.sha256()
    with open_regular(path, path.stat().st_size, inside=path.parent) as handle:
        while chunk := handle.read(_HASH_CHUNK):
            if time.monotonic() >= deadline:
                raise TooSlow(path.name)
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
        check = servable(folder)
        if not check:
            raise ValueError(f"refusing to publish an unservable export: {check.reason}")
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
