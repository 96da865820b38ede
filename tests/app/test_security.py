"""Who may call (app/auth.py, app/cors.py): one real gunicorn with a tokens file and one
allowed CORS origin (``secured`` in tests/conftest.py, shared with tests/test_fuzz.py),
called by requests and by Chromium on another origin."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from app.auth import TokenFileError, TokenTable, check
from app.errors import PermissionDenied, Unauthenticated
from tests.app.test_pages import browser  # noqa: F401 - the same headless Chromium
from tests.conftest import ADMIN_TOKEN, PREDICT_TOKEN, ROOT, TOKENS, wait_until
from tests.deploy.slow_clients import digit_png

ZEROS = {"instances": [[[0.0] * 28] * 28]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("text", "line", "why"), [
    ("a-valid-token-0123456 predict\nno-scope-0123456789\n", 2, "expected '<token> <scope>"),
    ("\n# comment\nshort predict\n", 3, "the token must be"),
    ("a-valid-token-0123456 predict,root\n", 1, "unknown scope 'root'"),
    ("sha256:abc predict\n", 1, "the token must be"),
    ("a-valid-token-0123456 predict\na-valid-token-0123456 admin\n", 2, "this token is listed"),
])
def test_a_malformed_line_is_refused_by_number(text, line, why):
    with pytest.raises(TokenFileError, match=f"line {line}: {why}"):
        TokenTable.parse(text)


def test_a_file_without_tokens_is_refused_rather_than_read_as_auth_off():
    with pytest.raises(TokenFileError, match="no tokens"):
        TokenTable.parse("# nothing yet\n\n")


def test_a_fifo_or_huge_file_in_place_of_the_tokens_file_is_refused_without_hanging(
        tmp_path):
    """Opening a FIFO for reading blocks until a writer comes, with the reload lock
    held: every authenticated call of the worker would wait behind it for good."""
    import os
    import threading

    from app.auth import TOKENS_LIMIT_BYTES, TokenFile

    path = tmp_path / "tokens"
    path.write_text(f"{PREDICT_TOKEN} predict\n")
    tokens = TokenFile(path)
    path.unlink()
    os.mkfifo(path)
    answers: list = []
    reader = threading.Thread(target=lambda: answers.append(tokens.current()), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert answers == [tokens.table], "current() hung opening the FIFO"
    assert check(tokens.current(), f"Bearer {PREDICT_TOKEN}", "predict")
    with pytest.raises(TokenFileError, match="not a regular file"):
        TokenTable.read(path)
    path.unlink()
    path.write_text(f"{PREDICT_TOKEN} predict\n" + "#" * TOKENS_LIMIT_BYTES)
    with pytest.raises(TokenFileError, match="more than"):
        TokenTable.read(path)


def test_check_tells_no_token_from_unknown_token_from_missing_scope():
    table = TokenTable.parse(TOKENS)
    assert check(table, f"bearer  {PREDICT_TOKEN} ", "predict") == {"predict"}
    assert check(table, f"Bearer {ADMIN_TOKEN}", "admin") == {"admin"}
    for value, error in ((None, None), (f"Basic {PREDICT_TOKEN}", "invalid_request"),
                         ("Bearer ", "invalid_request"), ("Bearer nope", "invalid_token"),
                         (f"Bearer sha256:{hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}",
                          "invalid_token")):
        with pytest.raises(Unauthenticated) as caught:
            check(table, value, "predict")
        assert caught.value.headers["WWW-Authenticate"].startswith("Bearer realm=")
        assert (f'error="{error}"' in caught.value.headers["WWW-Authenticate"]) == bool(error)
    with pytest.raises(PermissionDenied):
        check(table, f"Bearer {ADMIN_TOKEN}", "predict")


def test_without_a_token_each_protocol_answers_401_with_a_bearer_challenge(secured):
    for method, path, shape in (("POST", "/predict", dict), ("GET", "/models", dict),
                                ("POST", "/v1/models/mnist_cnn:predict", str),
                                ("GET", "/v1/models/mnist_cnn", str),
                                ("POST", "/v2/models/mnist_cnn/infer", str),
                                ("GET", "/no/such/path", dict)):
        for headers in ({}, bearer("not-a-listed-token-000000"),
                        {"Authorization": f"Basic {PREDICT_TOKEN}"}):
            response = requests.request(method, secured.url + path, json=ZEROS,
                                        headers=headers, timeout=30)
            assert response.status_code == 401, (path, response.text)
            assert response.headers["WWW-Authenticate"].startswith('Bearer realm="'), path
            error = response.json()["error"]
            assert isinstance(error, shape), (path, error)
            if shape is dict:
                assert error["code"] == "unauthenticated"


def test_a_token_without_the_scope_gets_403(secured):
    for path, token, scope in (("/metrics", PREDICT_TOKEN, "admin"),
                               ("/v2/models/stats", PREDICT_TOKEN, "admin"),
                               ("/v2/models/mnist_cnn/versions/1/stats", PREDICT_TOKEN,
                                "admin"),
                               ("/predict", ADMIN_TOKEN, "predict"),
                               ("/v2/models/mnist_cnn/infer", ADMIN_TOKEN, "predict")):
        method = "GET" if path.endswith(("/metrics", "/stats")) else "POST"
        response = requests.request(method, secured.url + path, json=ZEROS,
                                    headers=bearer(token), timeout=30)
        assert response.status_code == 403, (path, response.text)
        assert f'error="insufficient_scope", scope="{scope}"' in \
            response.headers["WWW-Authenticate"]
    index = requests.post(f"{secured.url}/v2/repository/index", headers=bearer(PREDICT_TOKEN),
                          timeout=30)
    assert index.status_code == 403
    assert index.json() == {"error": "the token lacks the 'admin' scope this endpoint needs"}


def test_the_right_token_gets_its_answer(secured):
    digit = requests.post(f"{secured.url}/predict", data=digit_png(), timeout=30,
                          headers={**bearer(PREDICT_TOKEN), "Content-Type": "image/png"})
    assert digit.status_code == 200, digit.text
    assert digit.json()["predictions"][0]["digit"] == 7
    for path in ("/models", "/v1/models/mnist_cnn/metadata", "/v2/models/mnist_cnn"):
        assert requests.get(secured.url + path, headers=bearer(PREDICT_TOKEN),
                            timeout=30).status_code == 200, path
    for path in ("/metrics", "/v2/models/mnist_cnn/stats"):
        assert requests.get(secured.url + path, headers=bearer(ADMIN_TOKEN),
                            timeout=30).status_code == 200, path
    assert requests.post(f"{secured.url}/v2/repository/index", headers=bearer(ADMIN_TOKEN),
                         timeout=30).status_code == 200


def test_grpc_calls_need_the_same_tokens_and_scopes_as_rest(secured):
    """The `authorization` metadata, checked as the header is: probes open, no token →
    UNAUTHENTICATED, wrong scope → PERMISSION_DENIED, the right one answered."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    def code(call, request, token: str | None = None) -> grpc.StatusCode:
        metadata = [("authorization", f"Bearer {token}")] if token else None
        try:
            call(request, metadata=metadata, timeout=30)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with grpc.insecure_channel(secured.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = pb.ModelMetadataRequest(name="mnist_cnn")
        index = pb.RepositoryIndexRequest()
        assert code(stub.ServerReady, pb.ServerReadyRequest()) == grpc.StatusCode.OK
        assert code(stub.ModelMetadata, metadata) == grpc.StatusCode.UNAUTHENTICATED
        assert code(stub.ModelMetadata, metadata, "x" * 20) == grpc.StatusCode.UNAUTHENTICATED
        assert code(stub.ModelMetadata, metadata, ADMIN_TOKEN) == (
            grpc.StatusCode.PERMISSION_DENIED)
        assert code(stub.ModelMetadata, metadata, PREDICT_TOKEN) == grpc.StatusCode.OK
        assert code(stub.RepositoryIndex, index, PREDICT_TOKEN) == (
            grpc.StatusCode.PERMISSION_DENIED)
        assert code(stub.RepositoryIndex, index, ADMIN_TOKEN) == grpc.StatusCode.OK
        # Bytes that are no message: refused for the token before anything is parsed.
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        assert code(garbage, b"\xff" * 64) == grpc.StatusCode.UNAUTHENTICATED
        assert code(garbage, b"\xff" * 64, ADMIN_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
        assert code(garbage, b"\xff" * 64, PREDICT_TOKEN) == grpc.StatusCode.INVALID_ARGUMENT
        stats = pb.ModelStatisticsRequest(name="mnist_cnn")
        assert code(stub.ModelStatistics, stats, PREDICT_TOKEN) == (
            grpc.StatusCode.PERMISSION_DENIED)
        assert code(stub.ModelStatistics, stats, ADMIN_TOKEN) == grpc.StatusCode.OK
        # Two `authorization` values are refused whatever they hold, in either order.
        for tokens in ((ADMIN_TOKEN, "x" * 20), (PREDICT_TOKEN, ADMIN_TOKEN)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelStatistics(stats, timeout=30, metadata=[
                    ("authorization", f"Bearer {token}") for token in tokens])
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "one Authorization" in refused.value.details()


def test_probes_and_pages_stay_open(secured):
    for path in ("/health", "/ready", "/v2/health/live", "/v2/health/ready", "/", "/model",
                 "/static/auth.js", "/openapi.json"):
        assert requests.get(secured.url + path, timeout=30).status_code == 200, path


def test_a_new_token_file_is_used_without_a_restart_and_a_broken_one_is_not(
        secured, tokens_file):
    rotated = "rotated-token-0123456789abc"
    url = f"{secured.url}/models"

    def answers(token: str) -> int:
        return requests.get(url, headers=bearer(token), timeout=30).status_code

    try:
        tokens_file.write_text(f"{rotated} predict\n")
        wait_until(lambda: answers(rotated) == 200, "the rotated token being accepted")
        assert answers(PREDICT_TOKEN) == 401
        tokens_file.write_text(f"{rotated} predict\nbroken line with three fields\n")
        wait_until(lambda: answers(rotated) == 200 and "line 2: expected" in secured.log(),
                   "the broken file being refused, and said so")  # the tokens in force stay
        assert answers("anything-at-all-0123456789") == 401
    finally:
        tokens_file.write_text(TOKENS)
        wait_until(lambda: answers(PREDICT_TOKEN) == 200, "the first tokens coming back")


def test_a_malformed_tokens_file_stops_the_server_naming_the_line(tmp_path, fit_run):
    bad = tmp_path / "tokens"
    bad.write_text(f"{PREDICT_TOKEN} predict\n# fine so far\n{ADMIN_TOKEN} root\n")
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "app/gunicorn.conf.py", "app:create_app()"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "MODELS_DIR": str(fit_run.models_dir), "PORT": "1",
             "AUTH_TOKENS_FILE": str(bad)})
    assert result.returncode != 0
    assert f"AUTH_TOKENS_FILE {bad}, line 3: unknown scope 'root'" in result.stderr


def test_a_server_open_beyond_loopback_without_tokens_warns_once(server, secured):
    assert server.log().count("with no AUTH_TOKENS_FILE") == 1
    assert "with no AUTH_TOKENS_FILE" not in secured.log()


def test_the_pages_ask_for_the_token_and_keep_it_in_the_tab_only(browser, secured):  # noqa: F811
    browser.get(f"{secured.url}/model")
    form = browser.find_element(By.ID, "token-form")
    WebDriverWait(browser, 15).until(lambda d: form.is_displayed())
    browser.find_element(By.ID, "token").send_keys(PREDICT_TOKEN)
    form.find_element(By.CSS_SELECTOR, "button").click()
    WebDriverWait(browser, 30).until(
        lambda d: "mnist_cnn" in d.find_element(By.ID, "model-name").text and len(
            d.find_elements(By.CSS_SELECTOR, "#plots img[src^='data:image/png']")) > 0)
    assert browser.execute_script(
        "return [sessionStorage.getItem('mnist-digits-token'), localStorage.length, "
        "document.cookie]") == [PREDICT_TOKEN, 0, ""]
    assert PREDICT_TOKEN not in browser.current_url
    assert PREDICT_TOKEN not in secured.log()


CALL_PREDICT = """
const done = arguments[arguments.length - 1];
fetch(arguments[0], {method: "POST", body: arguments[2],
                     headers: {"Content-Type": "application/json",
                               "Authorization": "Bearer " + arguments[1]}})
  .then((r) => r.json().then((body) => done({status: r.status, body: body})))
  .catch((err) => done({failed: String(err)}));
"""


def test_a_page_on_an_allowed_origin_may_call_predict_and_another_may_not(
        browser, secured, origin_site):  # noqa: F811
    import json

    body = json.dumps(ZEROS)
    browser.set_script_timeout(30)
    browser.get(f"http://127.0.0.1:{origin_site}/")
    allowed = browser.execute_async_script(CALL_PREDICT, f"{secured.url}/predict",
                                           PREDICT_TOKEN, body)
    assert allowed.get("status") == 200, allowed
    assert len(allowed["body"]["predictions"]) == 1
    browser.get(f"http://localhost:{origin_site}/")
    blocked = browser.execute_async_script(CALL_PREDICT, f"{secured.url}/predict",
                                           PREDICT_TOKEN, body)
    assert blocked == {"failed": "TypeError: Failed to fetch"}
