"""Safe rollouts through a real gunicorn (two workers): MODEL_CONFIG_FILE in TF Serving's
format, version labels on every route and protocol, a sticky canary split, a rollback by
moving ``stable`` back, a malformed file that keeps the last good one, and the shadow
comparison's figures against a direct comparison.

Model ``digits``: version 1 is the tiny net with its random initial weights, version 2
the CNN of ``fit_run``, so the two answer recognisably differently.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests

from app.model_config import ModelConfigError, parse_model_config
from tests.conftest import ROOT, start_server, stop_server, wait_until

POLL_SECONDS = 0.25
WORKERS = 2
CONFIG = """model_config_list {{
  config {{
    name: "digits"
    base_path: "{base}"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
{labels}  }}
}}
{rules}"""


def config_text(base: str, rules: str = "", **labels: int) -> str:
    lines = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n'
                    for k, v in labels.items())
    return CONFIG.format(base=base, labels=lines, rules=rules)


@pytest.fixture(scope="module")
def rollout(tmp_path_factory, untrained_tiny, fit_run):
    """(server, config path): ``stable`` → 2, ``canary`` → 1 with 10% of the traffic."""
    root = tmp_path_factory.mktemp("rollout")
    models = root / "models"
    shutil.copytree(untrained_tiny, models / "digits_folder" / "1")
    shutil.copytree(fit_run.version_dir, models / "digits_folder" / "2")
    config = root / "models.config"
    config.write_text(config_text(str(models / "digits_folder"),
                                  "# rollout: digits canary weight 10\n", stable=2, canary=1))
    server = start_server(models, root / "gunicorn.log", MODEL_NAME="digits",
                          MODEL_CONFIG_FILE=str(config), WORKERS=str(WORKERS),
                          MODEL_POLL_SECONDS=str(POLL_SECONDS))
    yield server, config
    stop_server(server)


def rewrite(config, text: str) -> None:
    """Replace the file in one step, as an editor's save or a ConfigMap update does."""
    staged = config.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, config)


def apply(server, config, text: str, expect: str) -> float:
    """Write ``text`` and wait until every worker has logged ``expect``; the seconds
    from the write to the last worker's log line."""
    offset = len(server.log())
    written = time.monotonic()
    rewrite(config, text)
    wait_until(lambda: server.log()[offset:].count(expect) >= WORKERS,
               f"{expect!r} on every worker", timeout=30)
    return time.monotonic() - written


def digit_npy(mnist, index: int = 0) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, mnist.x_test[index:index + 1])
    return buffer.getvalue()


NPY = {"Content-Type": "application/x-npy"}


def test_the_config_module_parses_tf_servings_format_without_importing_tensorflow():
    code = ("import sys; from pathlib import Path; from app.model_config import "
            "parse_model_config; c = parse_model_config('model_config_list { config { "
            "name: \"m\" base_path: \"m\" version_labels { key: \"stable\" value: 3 } } }', "
            "Path('/srv')); assert dict(c.models['m'].labels) == {'stable': 3}; "
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'tensorflow'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_labels_resolve_on_every_route_and_protocol(rollout, mnist):
    server, _ = rollout
    url = f"{server.url}"
    info = requests.get(f"{url}/models/digits", timeout=30).json()
    assert (info["labels"], info["traffic"], info["version"]) == (
        {"canary": 1, "stable": 2}, {"canary": 10.0}, 2)
    for label, version in (("canary", 1), ("stable", 2)):
        answer = requests.post(f"{url}/models/digits/labels/{label}/predict",
                               data=digit_npy(mnist), headers=NPY, timeout=30)
        assert answer.json()["model"]["version"] == version
        status = requests.get(f"{url}/v1/models/digits/labels/{label}", timeout=30).json()
        assert status["model_version_status"][0]["version"] == str(version)
        metadata = requests.get(f"{url}/v1/models/digits/labels/{label}/metadata",
                                timeout=30).json()
        assert metadata["model_spec"]["version"] == str(version)
        instances = {"instances": (mnist.x_test[:2] / 255.0).tolist()}
        by_label = requests.post(f"{url}/v1/models/digits/labels/{label}:predict",
                                 json=instances, timeout=30).json()
        by_version = requests.post(f"{url}/v1/models/digits/versions/{version}:predict",
                                   json=instances, timeout=30).json()
        assert by_label == by_version
        v2 = requests.post(f"{url}/v2/models/digits/labels/{label}/infer", json={
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28],
                        "data": mnist.x_test[0].ravel().tolist()}]}, timeout=30)
        assert v2.json()["model_version"] == str(version)
    for path in ("/models/digits/labels/nope/predict", "/v1/models/digits/labels/nope",
                 "/v1/models/digits/labels/nope:predict", "/v2/models/digits/labels/nope/infer",
                 "/v1/models/other/labels/stable"):
        method = requests.get if path.endswith("nope") or path.endswith("stable") \
            else requests.post
        answer = method(f"{url}{path}", data=digit_npy(mnist), headers=NPY, timeout=30)
        assert answer.status_code == 404, (path, answer.text)


def test_labels_and_the_canary_split_reach_grpc_clients(rollout, mnist):
    """TF Serving's ModelSpec.version_label picks the labelled version; a request that
    names none is split as REST's are, each x-client-id keeping its side."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    server, _ = rollout

    def answered_by(label: str = "", client: str | None = None) -> int | grpc.StatusCode:
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.version_label = "digits", label
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(
            (mnist.x_test[:1, ..., None] / 255.0).astype("float32")))
        metadata = [("x-client-id", client)] if client else None
        try:
            return stub.Predict(request, metadata=metadata, timeout=30).model_spec.version.value
        except grpc.RpcError as error:
            return error.code()

    with grpc.insecure_channel(server.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        assert (answered_by("canary"), answered_by("stable")) == (1, 2)
        assert answered_by("nope") == grpc.StatusCode.NOT_FOUND
        sides = {client: answered_by(client=client) for client in map(str, range(60))}
        assert set(sides.values()) == {1, 2}  # 10% of 60 clients: some on each side
        assert all(answered_by(client=client) == side for client, side in sides.items())


def version_requests(url: str) -> dict[int, float]:
    """model_version_requests_total of ``digits`` by version, over both workers."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    found = re.findall(r'^model_version_requests_total\{model="digits",version="(\d+)"\} (\S+)$',
                       text, flags=re.M)
    return {1: 0.0, 2: 0.0} | {int(version): float(value) for version, value in found}


def test_a_canary_at_10_percent_gets_10_percent_and_each_client_keeps_its_side(
        rollout, mnist):
    server, _ = rollout
    body, sides = digit_npy(mnist), {}
    before = version_requests(server.url)
    with requests.Session() as session:
        for client in range(2000):
            answer = session.post(f"{server.url}/models/digits/predict", data=body,
                                  headers={**NPY, "X-Client-ID": f"user-{client}"}, timeout=30)
            sides[client] = answer.json()["model"]["version"]
        canary = sum(version == 1 for version in sides.values())
        assert 170 <= canary <= 230, canary  # 10% ± 3 of 2,000
        counted = version_requests(server.url)
        assert (counted[1] - before[1], counted[2] - before[2]) == (canary, 2000 - canary)
        again = {client: session.post(
            f"{server.url}/models/digits/predict", data=body,
            headers={**NPY, "X-Client-ID": f"user-{client}"}, timeout=30
        ).json()["model"]["version"] for client in range(0, 2000, 5)}
    assert again == {client: sides[client] for client in again}
    print(f"\ncanary: {canary} of 2,000 clients")


def test_a_malformed_config_file_is_refused_with_its_line_and_the_last_good_stays(
        rollout, mnist):
    server, config = rollout
    good = config.read_text()
    bad = good.replace("versions: 2 }", "versions: 2")
    with pytest.raises(ModelConfigError, match=r"^line \d+: ") as refused:
        parse_model_config(bad, config.parent / "models")
    try:
        line = str(refused.value).split(":")[0]  # the log is JSON: its quotes escaped
        apply(server, config, bad, f"MODEL_CONFIG_FILE {config}: {line}: ")
        answer = requests.post(f"{server.url}/models/digits/labels/canary/predict",
                               data=digit_npy(mnist), headers=NPY, timeout=30)
        assert answer.json()["model"]["version"] == 1
        assert "the last good one stays in force" in server.log()
    finally:
        apply(server, config, good, f"MODEL_CONFIG_FILE {config} in force")


def test_moving_stable_back_is_served_by_every_worker_within_a_poll_without_failures(
        rollout, mnist):
    server, config = rollout
    base = str(config.parent / "models" / "digits_folder")
    body, answers, stop = digit_npy(mnist), [], threading.Event()

    def send(worker: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                sent = time.monotonic()
                answer = session.post(f"{server.url}/models/digits/predict", data=body,
                                      headers=NPY, timeout=30)
                answers.append((sent, answer.status_code, answer.status_code == 200 and
                                answer.json()["model"]["version"]))

    senders = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: len(answers) >= 20, "load before the rollback")
        seconds = apply(server, config, config_text(base, stable=1, canary=1),
                        "digits labels now canary=1, stable=1")
        done = time.monotonic()
        wait_until(lambda: sum(a[0] > done for a in answers) >= 40, "load after it")
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=30)
        apply(server, config, config_text(base, "# rollout: digits canary weight 10\n",
                                          stable=2, canary=1),
              "digits labels now canary=1, stable=2")
    statuses = [a[1] for a in answers]
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in statuses}
    assert {a[2] for a in answers if a[0] > done} == {1}
    assert seconds < POLL_SECONDS + 2.0, seconds  # one poll, with room for a busy CI
    print(f"\nrollback on both workers {seconds:.2f} s after the write; "
          f"{len(statuses)} requests, 0 failed")


def predict_many(url: str, path: str, images: np.ndarray) -> tuple[np.ndarray, set]:
    """(probabilities, versions that answered) for ``images``, 100 to a request."""
    probabilities, versions = [], set()
    with requests.Session() as session:
        for start in range(0, len(images), 100):
            buffer = io.BytesIO()
            np.save(buffer, images[start:start + 100])
            answer = session.post(f"{url}{path}", data=buffer.getvalue(), headers=NPY,
                                  timeout=60).json()
            versions.add(answer["model"]["version"])
            probabilities += [p["probabilities"] for p in answer["predictions"]]
    return np.array(probabilities), versions


def test_shadow_agreement_matches_a_direct_comparison_on_1000_test_digits(rollout, mnist):
    server, config = rollout
    base = str(config.parent / "models" / "digits_folder")
    images = mnist.x_test[:1000]
    apply(server, config, config_text(base, "# rollout: digits candidate shadow 100\n",
                                      stable=2, candidate=1),
          "digits labels now candidate=1, stable=2")
    try:
        _, served_by = predict_many(server.url, "/models/digits/predict", images)
        assert served_by == {2}  # the shadow never answers

        def compared() -> list[dict]:
            rows = requests.get(f"{server.url}/models/digits", timeout=30).json()["shadow"]
            return [r for r in rows if (r["serving"], r["shadow"]) == (2, 1)]

        wait_until(lambda: compared() and compared()[0]["compared"] >= 1000,
                   "1,000 shadow comparisons")
    finally:
        apply(server, config, config_text(base, "# rollout: digits canary weight 10\n",
                                          stable=2, canary=1),
              "digits labels now canary=1, stable=2")
    serving, _ = predict_many(server.url, "/models/digits/versions/2/predict", images)
    shadow, _ = predict_many(server.url, "/models/digits/versions/1/predict", images)
    agreement = float(np.mean(serving.argmax(axis=1) == shadow.argmax(axis=1)))
    difference = float(np.abs(serving - shadow).mean(axis=1).mean())
    (row,) = compared()
    assert row["compared"] == 1000
    assert abs(row["agreement"] - agreement) <= 0.002, (row, agreement)  # ties, rounding
    assert abs(row["mean_abs_difference"] - difference) <= 1e-5, (row, difference)
    exposition = requests.get(f"{server.url}/metrics", timeout=30).text
    assert 'shadow_images_total{model="digits",serving="2",shadow="1"} 1000.0' in exposition
    print(f"\nshadow: agreement {row['agreement']:.3f} (direct {agreement:.3f}), mean abs "
          f"difference {row['mean_abs_difference']:.5f} (direct {difference:.5f})")


def test_grpc_requests_are_answered_and_shadowed_while_a_shadow_is_configured(rollout,
                                                                               mnist):
    """A gRPC call has no WSGI response to copy the request after: it must still be
    answered (not INTERNAL) and its images still reach the shadow version."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    server, config = rollout
    base = str(config.parent / "models" / "digits_folder")
    images = mnist.x_test[:8]
    request = pb.ModelInferRequest(model_name="digits", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8",
                                              shape=[len(images), 28, 28])],
        raw_input_contents=[images.astype(np.uint8).tobytes()])

    def compared() -> int:
        rows = requests.get(f"{server.url}/models/digits", timeout=30).json()["shadow"]
        return sum(r["compared"] for r in rows if (r["serving"], r["shadow"]) == (2, 1))

    apply(server, config, config_text(base, "# rollout: digits candidate shadow 100\n",
                                      stable=2, candidate=1),
          "digits labels now candidate=1, stable=2")
    try:
        before = compared()
        with grpc.insecure_channel(server.grpc) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(WORKERS * 2):  # connections may land on either worker
                answer = stub.ModelInfer(request, timeout=30)
                assert answer.model_version == "2"
        wait_until(lambda: compared() >= before + WORKERS * 2 * len(images),
                   "the gRPC requests' shadow comparisons")
    finally:
        apply(server, config, config_text(base, "# rollout: digits canary weight 10\n",
                                          stable=2, canary=1),
              "digits labels now canary=1, stable=2")


def test_a_store_does_not_start_on_a_malformed_config_file(tmp_path):
    from app.model_store import ModelStore

    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "digits" base_path: "digits" }\n')
    store = ModelStore(tmp_path, "digits", config_file=config)
    with pytest.raises(ModelConfigError, match=r"models.config: line 1: Expected \"}\""):
        store.load()
