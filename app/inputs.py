"""Read the images of a /predict request, whatever form they came in, as model input.

Plain functions of the request's parts (body bytes, media type, uploaded files), so they
are tested without HTTP. Accepted forms:

- the raw image as the body, with an ``image/*`` media type;
- ``multipart/form-data`` with one or more files under any field names, in order;
- JSON ``{"instances": [...]}``, each a 28×28 (or 28×28×1) array of numbers in [0, 1]
  (already MNIST form) or ``{"b64": "<base64 image>"}`` (TensorFlow Serving's convention);
- ``application/x-npy``: a NumPy ``.npy`` array of N×28×28 (or N×28×28×1, N×1×28×28,
  N×784, or one 28×28) MNIST-form digits, floats in [0, 1] or uint8 pixels, read with
  ``allow_pickle=False``.

Any of them may arrive compressed (``Content-Encoding: gzip`` or ``deflate``); the
decompressed size is held to the same limit as the body, so a gzip bomb gets a 413.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import zlib
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain

import numpy as np
import orjson

from app.batching import Deadline
from app.errors import InvalidInput, PayloadTooLarge, UnprocessableInput, UnsupportedMediaType
from app.preprocess import SIDE, DecodeBudget, peek_size, prepare

JSON_TYPES = {"application/json"}
MULTIPART_TYPE = "multipart/form-data"
NPY_TYPES = {"application/x-npy", "application/npy"}
GZIP_CHUNK = 1 << 16
GZIP_MAGIC = b"\x1f\x8b"  # the start of every gzip member
SLOW_JSON_BYTES = 1 << 20  # largest body the standard library's JSON parser may re-read
NPY_HEADER_BYTES = 10_000  # NumPy's own default cap on an .npy header
WBITS = {"gzip": 31, "deflate": 15}  # zlib's window bits for each Content-Encoding
NUMBER_TYPES = frozenset({int, float})  # what JSON numbers parse to; bool is neither
MAX_NESTING = 5  # [N, 28, 28, 1] is the deepest array of pixels any form sends
# The most JSON values one image takes: the 28×28×1 form makes each pixel a one-element
# list (784 numbers + 784 lists + 28 rows + the image), and a wrapper such as {"b64": ...}.
JSON_VALUES_PER_IMAGE = 2 * SIDE * SIDE + SIDE + 4
JSON_ENVELOPE_VALUES = 1_000  # the keys, parameters and outputs around the images
# A parsed value (a float and its list slot, or an empty list: 32-64 bytes) held in the
# decode budget as 16 decoded pixels (~4 bytes each).
JSON_VALUE_PIXELS = 16


@dataclass(frozen=True)
class Limits:
    """What one request may hold, and what its decoding may wait for."""

    max_batch: int
    max_image_pixels: int
    max_request_pixels: int
    budget: DecodeBudget | None = None  # the worker's decoded pixels in flight
    deadline: Deadline | None = None  # the request's (REQUEST_TIMEOUT_MS)

    @property
    def max_values(self) -> int:
        """Numbers a request's digits may hold: MAX_BATCH × 784."""
        return self.max_batch * SIDE * SIDE


def check_batch(count: int, limits: Limits) -> None:
    """A request's image count, before its images are read: 400 for none, 413 over
    MAX_BATCH."""
    if count == 0:
        raise InvalidInput("the request holds no image")
    if count > limits.max_batch:
        raise PayloadTooLarge(f"{count} images in one request; the limit is "
                              f"{limits.max_batch} (MAX_BATCH)")


def _check_pixels(blobs: list[bytes], limits: Limits) -> None:
    """All images of a request together, from their headers, before decoding any: a
    batch of large images (each within MAX_IMAGE_PIXELS) must not stall a worker."""
    total = sum(width * height for width, height in map(peek_size, blobs))
    if total > limits.max_request_pixels:
        raise PayloadTooLarge(f"the request's images hold {total:,} pixels in all; the "
                              f"limit is {limits.max_request_pixels:,} (MAX_REQUEST_PIXELS)")


def from_images(blobs: Iterable[bytes], limits: Limits, preprocess: bool) -> np.ndarray:
    """Encoded images → (N, 28, 28, 1) float32. Errors name the image's position."""
    blobs = list(blobs)
    check_batch(len(blobs), limits)
    _check_pixels(blobs, limits)
    digits = []
    for index, blob in enumerate(blobs):
        try:
            digits.append(prepare(blob, limits.max_image_pixels, preprocess, limits.budget,
                                  limits.deadline))
        except (InvalidInput, UnprocessableInput) as err:
            if len(blobs) > 1:
                err.message = f"image {index}: {err.message}"
            raise
    return np.stack(digits)[..., np.newaxis]


def all_numbers(value: object) -> bool:
    """Whether every leaf of nested JSON arrays is a number. NumPy would read ``true`` and
    ``"0.5"`` as pixels (and a ``true`` among floats without a trace); the protocols take
    numbers only. Walks the nesting a level at a time with ``map`` and ``chain``, in C:
    a batch of 256 digits takes about as long as NumPy's own conversion."""
    level = [value]
    for _ in range(MAX_NESTING + 1):
        kinds = set(map(type, level))
        if kinds != {list}:
            return kinds <= NUMBER_TYPES
        level = list(chain.from_iterable(level))
    return False


def from_array(instance: object, index: int) -> np.ndarray:
    """One JSON array instance → (28, 28) float32, checked for shape, NaN and range."""
    if not all_numbers(instance):
        raise InvalidInput(f"instance {index}: pixels must be JSON numbers, not true, false, "
                           "null or strings")
    try:
        array = np.asarray(instance, dtype=np.float64)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise UnprocessableInput(f"instance {index}: expected a 28×28 array of numbers") from None
    if array.shape == (SIDE, SIDE, 1):
        array = array[..., 0]
    if array.shape != (SIDE, SIDE):
        raise UnprocessableInput(f"instance {index}: expected shape 28×28, got "
                                 f"{'×'.join(map(str, array.shape)) or 'a scalar'}")
    return _checked_values(array, f"instance {index}")


def quoted(names: Iterable[object], most: int = 3) -> str:
    """The first ``most`` of a client's names for an error message, each cut to 40
    characters, so that an answer never echoes a body's worth of keys back."""
    names = list(names)
    shown = [repr(name)[:40] for name in names[:most]]
    if len(names) > most:
        shown.append(f"and {len(names) - most:,} more")
    return ", ".join(shown) or "none"


def _b64(instance: dict, index: int) -> bytes:
    """``{"b64": "<base64>"}`` → the image bytes; raises InvalidInput."""
    value = instance.get("b64")
    if set(instance) != {"b64"} or not isinstance(value, str):
        raise InvalidInput(f'instance {index}: an encoded image is {{"b64": "<base64 '
                           f'string>"}}, got keys {quoted(instance)}')
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"instance {index}: 'b64' is not valid base64") from None


def _unwrap(instance: object, index: int, input_name: str) -> object:
    """TF Serving's named form ``{"<input>": value}`` → value; other instances as they are
    (a dict left after unwrapping is checked as ``{"b64": ...}`` by ``_b64``)."""
    if isinstance(instance, dict) and "b64" not in instance:
        if set(instance) != {input_name}:
            raise InvalidInput(f"instance {index}: expected the model's input {input_name!r} "
                               f'or {{"b64": ...}}, got keys {quoted(instance)}')
        instance = instance[input_name]
    return instance


def from_instances(instances: object, limits: Limits, preprocess: bool,
                   input_name: str = "image") -> np.ndarray:
    """A JSON list of instances → (N, 28, 28, 1) float32.

    Each instance is a 28×28 (or 28×28×1) array of numbers in [0, 1], ``{"b64": ...}``
    holding an encoded image, or either of them under the input's name.
    """
    if not isinstance(instances, list):
        raise InvalidInput("instances must be a list, one entry per image")
    check_batch(len(instances), limits)
    instances = [_unwrap(instance, index, input_name)
                 for index, instance in enumerate(instances)]
    encoded = {index: _b64(instance, index) for index, instance in enumerate(instances)
               if isinstance(instance, dict)}
    _check_pixels(list(encoded.values()), limits)
    digits = []
    for index, instance in enumerate(instances):
        if index in encoded:
            try:
                digits.append(prepare(encoded[index], limits.max_image_pixels, preprocess,
                                      limits.budget, limits.deadline))
            except (InvalidInput, UnprocessableInput) as err:
                err.message = f"instance {index}: {err.message}"
                raise
        else:
            digits.append(from_array(instance, index))
    return np.stack(digits)[..., np.newaxis]


def parse_json(body: bytes) -> object:
    """The JSON document of a body, or InvalidInput saying where it is malformed.

    orjson first: it reads a batch of 64 digits as numbers ~8× faster than the standard
    library (2.4 vs 21 ms). The standard library then gets what orjson refuses, because
    TF Serving's REST API allows the ``NaN`` and ``Infinity`` tokens strict JSON lacks
    (they then get the clear 422 any NaN gets) — but only bodies up to SLOW_JSON_BYTES:
    re-parsing megabytes that orjson already refused would cost seconds per request.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as err:
        if len(body) > SLOW_JSON_BYTES:
            raise InvalidInput(f"malformed JSON: {err} (NaN and Infinity are read only in "
                               f"bodies up to {SLOW_JSON_BYTES} bytes)") from None
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise InvalidInput(f"malformed JSON: {err}") from None
    _refuse_lone_surrogates(document)
    return document


def _refuse_lone_surrogates(document: object) -> None:
    """InvalidInput when a string holds half of a UTF-16 pair (``"\\ud800"``): no Unicode
    text, so orjson refuses it; the standard library keeps it, and it would then fail
    wherever the string is echoed or encoded, long after the body was accepted."""
    try:
        json.dumps(document, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidInput("malformed JSON: a string holds a lone UTF-16 surrogate "
                           "(\\ud800 to \\udfff without its pair)") from None
    except RecursionError:  # the parser's own depth bound, met again from a deeper stack
        raise InvalidInput("malformed JSON: nested too deeply") from None


def json_values_bound(body: bytes) -> int:
    """The most values a JSON text can parse to, counted without parsing it: every value
    but the first in an array or object, and the document itself, follows a comma, so
    values ≤ commas + arrays + objects + 1 (commas and brackets inside strings only add)."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


def read_json(body: bytes, limits: Limits) -> object:
    """``parse_json`` for a body that carries images: refused (413) before parsing when
    it may hold more values than MAX_BATCH images take (a 10 MB body of 3.3 million
    empty lists parses to 230 MB of objects), and parsed inside the worker's decode
    budget, each value held as JSON_VALUE_PIXELS pixels, so concurrent bodies cannot add
    up past it. The budget is freed before any image in the document is decoded (which
    takes its own), so a request never holds it while waiting for more."""
    values, most = json_values_bound(body), (limits.max_batch * JSON_VALUES_PER_IMAGE
                                             + JSON_ENVELOPE_VALUES)
    if values > most:
        raise PayloadTooLarge(f"the JSON body holds up to {values:,} values (commas and "
                              f"brackets, counted before parsing); {limits.max_batch} images "
                              f"(MAX_BATCH) take at most {most:,}")
    held = nullcontext() if limits.budget is None else \
        limits.budget.hold(values * JSON_VALUE_PIXELS, limits.deadline)
    with held:
        return parse_json(body)


def from_json(body: bytes, limits: Limits, preprocess: bool) -> np.ndarray:
    """``{"instances": [...]}`` → (N, 28, 28, 1) float32."""
    document = read_json(body, limits)
    if not isinstance(document, dict) or "instances" not in document:
        raise InvalidInput('JSON body must be an object with an "instances" list')
    return from_instances(document["instances"], limits, preprocess)


def decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding`` gzip or deflate (zlib, as HTTP defines it), refusing
    (413) as soon as the output passes ``limit``. A gzip body may hold several members
    (RFC 1952; ``cat a.gz b.gz``), each inflated; bytes after the last member, or after
    a deflate stream, are an InvalidInput rather than silently dropped."""
    parts, size, pending = [], 0, data
    while True:
        inflater = zlib.decompressobj(wbits=WBITS[encoding])
        try:
            while pending and not inflater.eof:
                chunk = inflater.decompress(pending, GZIP_CHUNK)
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body decompresses to more than {limit} "
                                          "bytes (MAX_CONTENT_LENGTH)")
                parts.append(chunk)
                pending = inflater.unconsumed_tail
        except zlib.error as err:
            raise InvalidInput(f"Content-Encoding is {encoding} but the body is not: "
                               f"{err}") from None
        if not inflater.eof:
            raise InvalidInput(f"the {encoding} body is truncated")
        pending = inflater.unused_data
        if not pending:
            return b"".join(parts)
        if encoding != "gzip" or not pending.startswith(GZIP_MAGIC):
            raise InvalidInput(f"{len(pending)} bytes follow the end of the {encoding} data")


def read_npy(body: bytes, max_values: int) -> np.ndarray:
    """An .npy file → the array, a view of ``body``; its header is checked before
    anything is allocated: a numeric dtype, at most ``max_values`` elements, and exactly
    the bytes that shape × itemsize needs (a header that declares 10¹² elements must not
    reach NumPy's allocator). Raises InvalidInput, UnprocessableInput or PayloadTooLarge."""
    stream = io.BytesIO(body)
    try:
        major, _ = np.lib.format.read_magic(stream)
        if major not in (1, 2):  # 3.0 exists only for structured dtypes' unicode names
            raise ValueError(f"format version {major} is not read here")
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(stream, max_header_size=NPY_HEADER_BYTES)
    except Exception as err:  # noqa: BLE001 - every way NumPy's header parser fails
        # The header is a Python literal from the client, read by ast and tokenize: besides
        # ValueError and SyntaxError they raise TokenError (unbalanced brackets), and
        # RecursionError or MemoryError on deep nesting. None of that is the server's fault.
        raise InvalidInput(f"not a readable .npy array: {err}") from None
    if not all(type(dim) is int and dim >= 0 for dim in shape):  # (-1, -28, 28), (True, 28)
        raise InvalidInput(f"not a readable .npy array: its shape {shape} is not a tuple of "
                           "sizes (whole numbers, 0 or more)")
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.itemsize == 0:
        raise UnprocessableInput(f"the array must hold numbers, not {dtype}")
    count = math.prod(shape)
    if count > max_values or any(dim > max_values for dim in shape):
        raise PayloadTooLarge(f"the array's shape {'×'.join(map(str, shape))} holds more than "
                              f"{max_values:,} values (MAX_BATCH × 784)")
    data = body[stream.tell():]
    if len(data) != count * dtype.itemsize:
        raise InvalidInput(f"not a readable .npy array: its header declares "
                           f"{count * dtype.itemsize} bytes of data, the body has {len(data)}")
    array = np.frombuffer(data, dtype=dtype, count=count)
    return array.reshape(shape[::-1]).transpose() if fortran_order else array.reshape(shape)


def from_npy(body: bytes, limits: Limits) -> np.ndarray:
    """An .npy array of MNIST-form digits → (N, 28, 28, 1) float32."""
    array = read_npy(body, limits.max_values)
    if array.ndim == 2 and array.shape[1] != SIDE * SIDE:
        array = array[np.newaxis]  # one digit
    return from_numbers(array, limits, "the array")


def from_numbers(array: np.ndarray, limits: Limits, what: str) -> np.ndarray:
    """A batch of MNIST-form digits — N×28×28, N×28×28×1, N×1×28×28 (channels first, as
    PyTorch clients send them: the same bytes) or N×784 (rows of pixels) — floats in
    [0, 1] or uint8 pixels → (N, 28, 28, 1) float32."""
    if array.dtype.kind not in "uif":
        raise UnprocessableInput(f"{what} must hold numbers, not {array.dtype}")
    shape = array.shape
    if shape[1:] in ((SIDE, SIDE, 1), (1, SIDE, SIDE), (SIDE * SIDE,)):
        array = array.reshape(-1, SIDE, SIDE)
    if array.ndim != 3 or array.shape[1:] != (SIDE, SIDE):
        raise UnprocessableInput(f"{what}: expected N×28×28, N×28×28×1, N×1×28×28 or N×784, got "
                                 f"{'×'.join(map(str, shape)) or 'a scalar'}")
    check_batch(len(array), limits)
    array = array / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)
    return _checked_values(array, what)[..., np.newaxis]


def _checked_values(array: np.ndarray, what: str) -> np.ndarray:
    """float32 copy, or UnprocessableInput for NaN, infinity or values outside [0, 1]."""
    if not np.isfinite(array).all():
        raise UnprocessableInput(f"{what} contains NaN or infinity")
    if array.min() < 0.0 or array.max() > 1.0:
        raise UnprocessableInput(f"{what}: values must lie in [0, 1], got "
                                 f"{array.min():g}..{array.max():g}")
    return array.astype(np.float32)


def read_request(media_type: str, body: bytes, files: list[bytes], limits: Limits,
                 preprocess: bool = True) -> np.ndarray:
    """Dispatch on the media type; raises UnsupportedMediaType for anything else."""
    if media_type in JSON_TYPES or media_type.endswith("+json"):
        return from_json(body, limits, preprocess)
    if media_type in NPY_TYPES:
        return from_npy(body, limits)
    if media_type == MULTIPART_TYPE:
        if not files:
            raise InvalidInput("multipart request has no file parts")
        return from_images(files, limits, preprocess)
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        return from_images([body], limits, preprocess)
    raise UnsupportedMediaType(
        f"unsupported Content-Type {media_type or '(none)'!r}: send an image (image/png, "
        "image/jpeg, image/gif, image/bmp, image/webp, image/tiff), multipart/form-data "
        'with image files, application/json with {"instances": [...]}, or '
        "application/x-npy")
