"""Fuzzing the running service: schemathesis from /openapi.json, and hypothesis mutating
real image and .npy bytes through /predict and V2 binary tensors, and hostile
Authorization headers against a server that asks for tokens.

Short profiles run in ``make test``; ``make fuzz`` sets FUZZ_PROFILE=long (≥ 1,000
schemathesis cases over all operations, 600 mutated files per format, 60 hostile model
repositories). Every response must be a 200 or one of the typed 4xx, and the worker
must stay within its memory.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import stat
import struct
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import ADMIN_TOKEN, PREDICT_TOKEN, start_server, stop_server
from tests.restyle import canvas_seven, encode, ink_on_paper

LONG = os.environ.get("FUZZ_PROFILE") == "long"
SCHEMA_EXAMPLES = 60 if LONG else 5  # per operation; 26 operations, 7 without parameters
MUTATIONS = 600 if LONG else 40  # per format
SCHEMA_CASES_WANTED = 1000 if LONG else 90
TYPED = {200, 400, 404, 405, 413, 415, 422}
SLOWEST_S = 20.0  # one request, even a mutated 1 MB image, on a loaded 2-core machine
RSS_GROWTH_MB = 300  # a worker's growth over the whole fuzz run
# Formats without checksums over their pixel data, where some mutated files still decode
# (PNG's chunk CRCs and WebP's VP8 checks refuse nearly every mutation up front).
REACHES_PIXELS = {"JPEG", "GIF", "BMP", "TIFF"}
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp",
           "TIFF": "image/tiff", "BMP": "image/bmp"}


@pytest.fixture(scope="module")
def fuzz_server(fit_run, tmp_path_factory):
    running = start_server(fit_run.models_dir, tmp_path_factory.mktemp("fuzz") / "gunicorn.log",
                           WORKERS="1")
    yield running
    stop_server(running)
    assert "Traceback" not in running.log(), running.log()[-3000:]


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


def fuzz_operation(operation, cases: dict[str, int]) -> None:
    """Run hypothesis over one operation's generated requests, counting them."""
    @settings(max_examples=SCHEMA_EXAMPLES, deadline=None, derandomize=not LONG,
              database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def call(case):
        cases[operation.label] = cases.get(operation.label, 0) + 1
        case.call_and_validate(timeout=60, checks=CHECKS)

    call()


def test_generated_requests_get_no_5xx_and_match_the_schema(fuzz_server):
    # Each operation's strategy driven by hypothesis directly: schemathesis's pytest
    # plugin does not run under pytest 9 ('Function' object has no attribute '_nodeid').
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    cases: dict[str, int] = {}
    for operation in operations:
        fuzz_operation(operation, cases)
    assert set(cases) == {operation.label for operation in operations}  # all 26
    assert sum(cases.values()) >= SCHEMA_CASES_WANTED, cases
    print(f"schemathesis: {sum(cases.values())} cases over {len(cases)} operations")


@pytest.fixture(scope="module")
def seeds(mnist) -> dict[str, bytes]:
    """Real files: a test digit in every documented format, and as an .npy batch."""
    digit = ink_on_paper(mnist.x_test[0], np.random.default_rng(0)).convert("RGB")
    files = {fmt: encode(digit, fmt) for fmt in FORMATS}
    files["PNG-RGBA"] = encode(canvas_seven(600), "PNG")
    buffer = io.BytesIO()
    np.save(buffer, mnist.x_test[:4])
    files["NPY"] = buffer.getvalue()
    return files


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with a few bytes flipped, inserted, deleted, repeated or cut off: the
    headers, lengths and chunk sizes a decoder trusts are in the first few hundred."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "repeat", "cut"]))
        at = draw(st.integers(0, max(0, min(len(out) - 1, draw(st.sampled_from(
            [64, 512, len(out) - 1]))))))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and out:
            out[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[at:at + draw(st.integers(1, 16))]
        elif kind == "repeat":
            out[at:at] = out[at:at + 64] * draw(st.integers(1, 64))
        elif kind == "cut":
            del out[at:]
    return bytes(out)


def binary_v2(blob: bytes) -> tuple[bytes, dict]:
    """A V2 binary request carrying ``blob`` as one BYTES element."""
    element = struct.pack("<I", len(blob)) + blob
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(element)}}]})
    return header.encode() + element, {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}


def send(url: str, kind: str, blob: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    if kind == "NPY":
        response = requests.post(url + "/predict", data=blob, timeout=60,
                                 headers={"Content-Type": "application/x-npy"})
    else:
        response = requests.post(url + "/predict", data=blob, timeout=60,
                                 headers={"Content-Type": FORMATS.get(kind, "image/png")})
        assert response.status_code in TYPED, (kind, response.status_code, response.text)
        body, headers = binary_v2(blob)
        response = requests.post(url + "/v2/models/mnist_cnn/infer", data=body, timeout=60,
                                 headers=headers)
    return response.status_code, time.perf_counter() - started


@pytest.mark.parametrize("kind", [*FORMATS, "PNG-RGBA", "NPY"])
def test_mutated_real_files_get_only_typed_answers_in_bounded_time_and_memory(
        fuzz_server, seeds, kind):
    before = max(fuzz_server.worker_rss_mb().values())
    statuses = []

    @settings(max_examples=MUTATIONS, deadline=None, derandomize=not LONG, database=None,
              suppress_health_check=list(HealthCheck))
    @given(blob=mutated(seeds[kind]))
    def check(blob):
        status, seconds = send(fuzz_server.url, kind, blob)
        statuses.append(status)
        assert status in TYPED, (kind, status)
        assert seconds < SLOWEST_S, (kind, seconds)

    check()
    print(f"{kind}: {len(statuses)} answers, statuses {dict(sorted(Counter(statuses).items()))}")
    assert len(statuses) >= MUTATIONS // 2  # hypothesis really ran the cases
    assert max(fuzz_server.worker_rss_mb().values()) - before < RSS_GROWTH_MB
    assert requests.get(fuzz_server.url + "/ready", timeout=10).status_code == 200
    if kind in REACHES_PIXELS:  # some mutations still decode: the decoders were reached
        assert 200 in statuses, sorted(set(statuses))


def test_a_real_image_seed_is_answered_200(fuzz_server, seeds):
    """The seeds themselves are valid, so what the mutations change is what is refused."""
    for kind, blob in seeds.items():
        assert send(fuzz_server.url, kind, blob)[0] == 200, kind
    with Image.open(io.BytesIO(seeds["PNG-RGBA"])) as image:
        assert image.mode == "RGBA"


# --- JSON: every route that reads a JSON body, with hostile text where any value goes ----

JSON_EXAMPLES = 300 if LONG else 40  # random combinations per route, after the sweep
ZEROS = [[0.0] * 28 for _ in range(28)]
HOSTILE_JSON = [  # JSON text that orjson refuses or reads differently from the stdlib
    '"\\ud800"', '"\\udfff"', '"a\\udc00b"', '"\\ud83d"', '"\\ude00\\ud83d"',
    '"\\ud83d\\ude00"', str(2**70), str(-2**70), str(2**64), str(2**63), str(10**400),
    "1" * 5000, "1e400", "-1e400", "1e-400", "NaN", "-Infinity", "[[[[[[[[1]]]]]]]]",
]


def json_routes(output: str) -> dict[str, dict]:
    """Every JSON route of the service, each with a body it answers 200."""
    tensor = {"name": "image", "shape": [1, 28, 28], "datatype": "FP32", "data": ZEROS,
              "parameters": {}}
    return {
        "/predict": {"instances": [ZEROS]},
        "/v1/models/mnist_cnn:predict": {"signature_name": "serving_default",
                                         "instances": [ZEROS]},
        "/v1/models/mnist_cnn/versions/1:predict": {"inputs": {"image": [ZEROS]}},
        "/v2/models/mnist_cnn/infer": {
            "id": "fuzz", "parameters": {"binary_data_output": False}, "inputs": [tensor],
            "outputs": [{"name": output, "parameters": {"classification": 2}}]},
        "/v2/repository/index": {"ready": True},
    }


@pytest.fixture(scope="module")
def json_bodies(fuzz_server) -> dict[str, dict]:
    output = requests.get(fuzz_server.url + "/v2/models/mnist_cnn", timeout=10).json()
    return json_routes(output["outputs"][0]["name"])


def places(document: object, path: tuple = ()) -> list[tuple]:
    """Where a hostile token may go: every value (path) and every key (path + (key, None)),
    through the first item of each list (the first row and pixel stand for all)."""
    found = [path]
    if isinstance(document, dict):
        for key, value in document.items():
            found += [(*path, key, None), *places(value, (*path, key))]
    elif isinstance(document, list) and document:
        found += places(document[0], (*path, 0))
    return found


def with_marker(document: object, place: tuple, marker: str) -> object:
    """A copy of ``document`` with ``marker`` as the value (or key) at ``place``."""
    if not place:
        return marker
    head, rest = place[0], place[1:]
    if rest == (None,):  # the key itself
        return {(marker if k == head else k): v for k, v in document.items()}
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[head] = with_marker(document[head], rest, marker)
    return copy


def hostile_text(document: object, changes: list[tuple[tuple, str]]) -> bytes:
    """``document`` as JSON text with each (place, token) of ``changes`` written in."""
    tokens = {}
    for index, (place, token) in enumerate(changes):
        marker = f"@hostile{index}@"
        if place in places(document):  # an earlier change may have replaced its parent
            document = with_marker(document, place, marker)
            tokens[json.dumps(marker)] = token
    text = json.dumps(document)
    for marker, token in tokens.items():
        text = text.replace(marker, token)
    return text.encode()


def assert_typed_json_answer(session: requests.Session, url: str, body: bytes) -> int:
    response = session.post(url, data=body, timeout=60,
                            headers={"Content-Type": "application/json"})
    assert response.status_code in TYPED, (url, body[:300], response.text[:300])
    if response.headers["Content-Type"] != "application/octet-stream":  # V2 binary
        response.json()  # the answer, even an error quoting the body, is valid JSON
    return response.status_code


def test_json_routes_answer_200_to_the_unmutated_bodies(fuzz_server, json_bodies):
    for path, document in json_bodies.items():
        response = requests.post(fuzz_server.url + path, json=document, timeout=60)
        assert response.status_code == 200, (path, response.text)


@pytest.mark.parametrize("path", list(json_routes("output")))
def test_every_hostile_token_in_every_place_of_a_json_body_gets_a_typed_answer(
        fuzz_server, json_bodies, path):
    """The sweep: each lone surrogate, huge or infinite number, NaN and deep list, alone,
    as each value and each key of a body the route answers 200 (~1,000 requests)."""
    document = json_bodies[path]
    with requests.Session() as session:
        statuses = Counter(
            assert_typed_json_answer(session, fuzz_server.url + path,
                                     hostile_text(document, [(place, token)]))
            for place in places(document) for token in HOSTILE_JSON)
    print(f"{path}: statuses {dict(sorted(statuses.items()))}")
    assert statuses[400] > 0  # the hostile tokens were reached and refused


@pytest.mark.parametrize("path", list(json_routes("output")))
def test_random_combinations_of_hostile_json_tokens_get_typed_answers(
        fuzz_server, json_bodies, path):
    document = json_bodies[path]
    change = st.tuples(st.sampled_from(places(document)), st.sampled_from(HOSTILE_JSON))
    statuses = []

    session = requests.Session()

    @settings(max_examples=JSON_EXAMPLES, deadline=None, derandomize=not LONG, database=None,
              suppress_health_check=list(HealthCheck))
    @given(changes=st.lists(change, min_size=2, max_size=4))
    def check(changes):
        body = hostile_text(document, changes)
        statuses.append(assert_typed_json_answer(session, fuzz_server.url + path, body))

    with session:
        check()
    print(f"{path}: {len(statuses)} answers, statuses {dict(sorted(Counter(statuses).items()))}")
    assert len(statuses) >= JSON_EXAMPLES // 2


# --- a hostile model repository ------------------------------------------------------
# Random entries where models and versions belong, created and removed while a real
# server (two workers, a 0.2 s poll) watches: no 5xx, the watch keeps up (a marker entry
# appears in the index), the served model stays served, no byte of a file outside the
# repository is served, and a worker killed at the end boots past whatever is there.

HOSTILE_EXAMPLES = 60 if LONG else 6
HOSTILE_KINDS = ["loop", "outside", "dangling", "up", "alias", "fifo", "device", "file",
                 "sparse", "fifo_metadata", "sparse_metadata", "plot_to_passwd", "deep",
                 "many"]
VERSION_KINDS = {"fifo_metadata", "sparse_metadata", "plot_to_passwd"}  # copies of v1
HOSTILE_NAMES = ["2", "3", "7", "10", "latest", "²", "01", "a b", os.fsdecode(b"\xff")]
SPARSE_BYTES = 1 << 30
WATCH_S = 180.0  # the poll may be loading a version meanwhile, on a loaded machine
skipped_kinds: dict[str, str] = {}


@pytest.fixture(scope="module")
def hostile(fit_run, tmp_path_factory):
    models = tmp_path_factory.mktemp("hostile") / "models"
    shutil.copytree(fit_run.version_dir, models / "mnist_cnn" / "1")
    running = start_server(models, models.parent / "gunicorn.log", MODEL_POLL_SECONDS="0.2")
    yield models, running
    stop_server(running)
    assert "rescanning" not in running.log(), running.log()[-3000:]  # no poll pass died


def make_entry(path: Path, kind: str, good: Path) -> None:
    """One hostile entry of ``kind`` at ``path``; a kind the system refuses is skipped."""
    if kind in ("loop", "outside", "dangling", "up", "alias"):
        path.symlink_to({"loop": path.name, "outside": "/usr", "dangling": "nowhere",
                         "up": "..", "alias": good.name}[kind])
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError as err:
            skipped_kinds["device"] = f"mknod refused: {err.strerror} (no CAP_MKNOD)"
    elif kind == "file":
        path.write_bytes(b"not a folder")
    elif kind == "sparse":
        with open(path, "wb") as handle:
            handle.truncate(SPARSE_BYTES)
    elif kind == "deep":
        path.joinpath(*["d"] * 12).mkdir(parents=True)
    elif kind == "many":
        path.mkdir()
        for index in range(1100):
            (path / str(index)).touch()
    else:
        hostile_version(shutil.copytree(good, path), kind)


def hostile_version(folder: Path, kind: str) -> None:
    """A copy of a good version with its metadata.json or a plot made hostile."""
    metadata = folder / "metadata.json"
    if kind == "fifo_metadata":
        metadata.unlink()
        os.mkfifo(metadata)
    elif kind == "sparse_metadata":
        with open(metadata, "r+b") as handle:
            handle.truncate(SPARSE_BYTES)
    else:  # a version whose history plot leads to /etc/passwd
        (folder / "plots" / "history.png").unlink()
        (folder / "plots" / "history.png").symlink_to("/etc/passwd")


def remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def wait_for_watch(url: str, marker: str) -> None:
    """Until a worker's poll has listed ``marker``, a file made after the entries."""
    deadline = time.monotonic() + WATCH_S
    while True:
        rows = requests.post(url + "/v2/repository/index", timeout=30).json()
        if any(row["name"] == marker for row in rows):
            return
        assert time.monotonic() < deadline, f"the watch did not list {marker} in time"
        time.sleep(0.2)


def probe(url: str, png: bytes) -> Counter:
    """Every route that reads the repository: no 5xx, no foreign bytes, still serving."""
    statuses: Counter = Counter()
    secret = Path("/etc/passwd").read_bytes()
    with requests.Session() as session:
        ready = session.get(url + "/ready", timeout=30)
        assert ready.status_code == 200, ready.text
        assert "mnist_cnn" in ready.json()["models"]
        predicted = session.post(url + "/predict", data=png, timeout=60,
                                 headers={"Content-Type": "image/png"})
        assert predicted.status_code == 200, predicted.text
        for path in ("/models", "/models/mnist_cnn", "/summary",
                     *(f"/models/mnist_cnn/plots/{p}.png"
                       for p in ("history", "confusion", "samples"))):
            response = session.get(url + path, timeout=30)
            statuses[response.status_code] += 1
            assert response.status_code in {200, 404}, (path, response.text[:300])
            assert secret[:64] not in response.content, path
            if path.endswith(".png") and response.status_code == 200:
                assert response.content.startswith(b"\x89PNG"), path
        index = session.post(url + "/v2/repository/index", timeout=30)
        assert index.status_code == 200
    return statuses


def every_kind_once(test):
    """Explicit examples that make each kind at least once, in a version's place and at
    the top level, whatever the random draw covers."""
    for start in range(0, len(HOSTILE_KINDS), 4):
        entries = [(index % 2 == 1 and kind not in VERSION_KINDS, HOSTILE_NAMES[index], kind)
                   for index, kind in enumerate(HOSTILE_KINDS[start:start + 4])]
        test = example(entries=entries)(test)
    return test


def test_a_hostile_model_repository_never_stops_serving_nor_leaks(hostile, seeds, fit_run):
    models, server = hostile
    good, png = models / "mnist_cnn" / "1", seeds["PNG"]
    statuses: Counter = Counter()
    kinds: Counter = Counter()
    examples = []

    @settings(max_examples=HOSTILE_EXAMPLES, deadline=None, derandomize=not LONG,
              database=None, suppress_health_check=list(HealthCheck))
    @every_kind_once
    @given(entries=st.lists(st.tuples(st.booleans(), st.sampled_from(HOSTILE_NAMES),
                                      st.sampled_from(HOSTILE_KINDS)),
                            min_size=1, max_size=4, unique_by=lambda e: (e[0], e[1])))
    def check(entries):
        examples.append(len(examples))
        made = []
        for top_level, name, kind in entries:
            path = (models if top_level else models / "mnist_cnn") / name
            make_entry(path, kind, good)
            made.append(path)
            kinds[kind] += 1
        marker = f"watch-{len(examples)}"
        (models / marker).touch()
        made.append(models / marker)
        try:
            wait_for_watch(server.url, marker)
            statuses.update(probe(server.url, png))
        finally:
            for path in made:
                remove_entry(path)

    check()
    print(f"hostile repository: {len(examples)} examples, entries {dict(kinds)}, "
          f"statuses {dict(statuses)}, skipped {skipped_kinds}")
    assert len(examples) >= HOSTILE_EXAMPLES // 2
    for where, kind in (("mnist_cnn/9", "fifo_metadata"), ("mnist_cnn/8", "loop"),
                        ("loop", "loop"), ("mnist_cnn/3", "outside"),
                        ("mnist_cnn/4", "sparse_metadata"), ("mnist_cnn/5", "fifo")):
        make_entry(models / where, kind, good)
    boots = server.log().count("mnist_cnn now serves")
    before = set(server.worker_pids())
    os.kill(min(before), signal.SIGKILL)
    deadline = time.monotonic() + WATCH_S
    while server.log().count("mnist_cnn now serves") == boots:  # the new worker's boot
        assert time.monotonic() < deadline, "a worker did not boot past the entries"
        time.sleep(0.2)
    probe(server.url, png)


# --- gRPC: hostile messages to both services, through a raw channel -------------------------

GRPC_EXAMPLES = 600 if LONG else 40  # per method, mutated bytes and hostile fields each
GRPC_REFUSED = {"UNKNOWN", "INTERNAL"}  # what bad input must never get
MAX_CONTENT_LENGTH = 10 * 1024 * 1024  # the fuzz server's default
DATATYPES = ["FP32", "FP64", "FP16", "UINT8", "BYTES", "INT8", "BOOL", "", "fp32", "FP32\u00e9"]


def grpc_seeds(mnist, png: bytes) -> dict[str, bytes]:
    """Valid messages for ModelInfer (raw FP32, contents FP32, BYTES PNG) and Predict."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2
    from tritonclient.grpc import service_pb2 as pb

    digits = (mnist.x_test[:2] / 255.0).astype("<f4")
    tensor = pb.ModelInferRequest.InferInputTensor
    seeds = {
        "raw": pb.ModelInferRequest(model_name="mnist_cnn", raw_input_contents=[
            digits.tobytes()], inputs=[tensor(name="image", datatype="FP32", shape=[2, 28, 28])]),
        "contents": pb.ModelInferRequest(model_name="mnist_cnn", inputs=[tensor(
            name="image", datatype="FP32", shape=[2, 28, 28, 1],
            contents=pb.InferTensorContents(fp32_contents=digits.ravel()))]),
        "png": pb.ModelInferRequest(model_name="mnist_cnn", inputs=[tensor(
            name="image", datatype="BYTES", shape=[1],
            contents=pb.InferTensorContents(bytes_contents=[png]))]),
    }
    predict = predict_pb2.PredictRequest()
    predict.model_spec.name = "mnist_cnn"
    predict.inputs["image"].CopyFrom(tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_content=digits.tobytes(),
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[
            tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in (2, 28, 28, 1)])))
    return {**{name: message.SerializeToString() for name, message in seeds.items()},
            "predict": predict.SerializeToString()}


def grpc_method(name: str) -> str:
    return "/tensorflow.serving.PredictionService/Predict" if name == "predict" else \
        "/inference.GRPCInferenceService/ModelInfer"


@st.composite
def hostile_fields(draw) -> bytes:
    """A well-formed ModelInferRequest whose shape, datatype and data disagree: dims up to
    2^63 - 1 and below 0, any datatype, raw data of any size up to past the message limit."""
    from tritonclient.grpc import service_pb2 as pb

    shape = draw(st.lists(st.one_of(st.integers(-2**63, 2**63 - 1), st.sampled_from(
        [0, 1, 28, 784, 256, 257])), max_size=6))
    size = draw(st.one_of(st.integers(0, 4096), st.sampled_from(
        [784 * 4, MAX_CONTENT_LENGTH - 1024, MAX_CONTENT_LENGTH + 1])))
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["mnist_cnn", "", "x"])),
                                   model_version=draw(st.sampled_from(["", "1", "0", "01"])),
                                   inputs=[pb.ModelInferRequest.InferInputTensor(
                                       name="image", datatype=draw(st.sampled_from(DATATYPES)),
                                       shape=shape)])
    if draw(st.booleans()):
        request.raw_input_contents.append(bytes([draw(st.sampled_from([0, 0x3F, 0xFF]))]) * size
                                          if size else b"")
    else:
        request.inputs[0].contents.fp32_contents.extend([0.5] * min(size, 4096))
    return request.SerializeToString()


@pytest.mark.parametrize("seed", ["raw", "contents", "png", "predict", "fields"])
def test_hostile_grpc_messages_never_get_unknown_or_internal(fuzz_server, mnist, seeds, seed):
    import grpc

    messages = grpc_seeds(mnist, seeds["PNG"])
    codes = Counter()
    with grpc.insecure_channel(fuzz_server.grpc, options=[
            ("grpc.max_send_message_length", 2 * MAX_CONTENT_LENGTH)]) as channel:
        call = channel.unary_unary(grpc_method(seed))  # bytes in, bytes out: no stub

        def answer(message: bytes) -> str:
            try:
                call(message, timeout=SLOWEST_S)
            except grpc.RpcError as err:
                return err.code().name
            return "OK"

        if seed != "fields":
            assert answer(messages[seed]) == "OK", seed  # the seed itself is valid

        @settings(max_examples=GRPC_EXAMPLES, deadline=None, derandomize=not LONG,
                  database=None, suppress_health_check=list(HealthCheck))
        @given(message=hostile_fields() if seed == "fields" else mutated(messages[seed]))
        def check(message):
            code = answer(message)
            codes[code] += 1
            assert code not in GRPC_REFUSED, (seed, code)

        check()
        live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
        assert live(b"", timeout=10) == b"\x08\x01"  # ServerLiveResponse(live=True)
    print(f"gRPC {seed}: {dict(sorted(codes.items()))}")
    assert sum(codes.values()) >= GRPC_EXAMPLES // 2
    assert "INVALID_ARGUMENT" in codes


# --- Authorization: huge, malformed and many headers against a server asking for tokens --

AUTH_EXAMPLES = 400 if LONG else 40
# 401/403 the app's; 200 a listed token; 400 and 431 gunicorn's own (a header it cannot
# parse, one over 8,190 bytes, more than 100 headers).
AUTH_TYPED = {200, 400, 401, 403, 431}
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=64)
AUTHORIZATION = st.one_of(
    HEADER_TEXT,
    st.builds(lambda scheme, token: f"{scheme} {token}",
              st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Bearer ", ""]),
              HEADER_TEXT),
    st.builds(lambda n, c: "Bearer " + c * n, st.integers(1, 12_000),
              st.sampled_from(["a", "=", "é", " ", "\t"])),
    st.sampled_from([f"Bearer {PREDICT_TOKEN}", f"Bearer {PREDICT_TOKEN}x",
                     f"Bearer {PREDICT_TOKEN[:-1]}", f"Bearer  {PREDICT_TOKEN}  ",
                     f"Bearer sha256:{'0' * 64}", f"Bearer {ADMIN_TOKEN}"]),
)


def send_authorization(url: str, path: str, values: list[str]) -> tuple[int, bytes]:
    """One request with these Authorization headers, as latin-1 bytes on the wire."""
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.putrequest("POST", path)
        for value in values:
            connection.putheader("Authorization", value.encode("latin-1"))
        connection.putheader("Content-Type", "application/json")
        body = json.dumps({"instances": [[[0.0] * 28] * 28]}).encode()
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", ["/predict", "/v2/models/mnist_cnn/infer"])
def test_hostile_authorization_headers_get_401_403_or_gunicorns_own_never_500(secured, path):
    statuses = []

    @settings(max_examples=AUTH_EXAMPLES, deadline=None, derandomize=not LONG,
              database=None, suppress_health_check=list(HealthCheck))
    @given(values=st.lists(AUTHORIZATION, min_size=0, max_size=120))
    @example(values=[])
    @example(values=[f"Bearer {PREDICT_TOKEN}"] * 2)
    @example(values=["Bearer " + "a" * 9000])
    @example(values=[f"Bearer {PREDICT_TOKEN}"] * 101)
    def check(values):
        status, body = send_authorization(secured.url, path, values)
        statuses.append(status)
        assert status in AUTH_TYPED, (status, body[:300])
        if status in (401, 403):
            error = json.loads(body)["error"]
            assert isinstance(error, dict if path == "/predict" else str), error

    check()
    print(f"{path}: {len(statuses)} answers, statuses {dict(sorted(Counter(statuses).items()))}")
    assert {401, 431} <= set(statuses), sorted(set(statuses))
    assert requests.get(secured.url + "/ready", timeout=10).status_code == 200
