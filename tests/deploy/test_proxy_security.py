"""nginx's controls (deploy/nginx/start.sh): HTTPS with a certificate made here and checked
by the clients, and the per-client rate limit, through `make serve-proxy`'s script."""

from __future__ import annotations

import socket
import ssl
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import end_process, free_port, wait_until
from tests.deploy.slow_clients import digit_png, start_proxy, stop_proxy
from tests.deploy.test_proxy import start_nginx

RPS, BURST = 20, 5  # RATE_LIMIT_RPS and RATE_LIMIT_BURST in these tests
NOISY_RATE = 10 * RPS  # the noisy client sends 10× what it may
QUIET_REQUESTS = 20  # per phase: its p99 is then its slowest
QUIET_RATE = RPS / 2  # the quiet client stays within its limit


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with openssl."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def redirect_port() -> int:
    """The secure proxy's HTTP_REDIRECT_PORT."""
    return free_port()


@pytest.fixture(scope="module")
def secure_proxy(fit_run, certificate, redirect_port, tmp_path_factory):
    cert, key = certificate
    port = free_port()
    running = start_proxy(fit_run.models_dir, tmp_path_factory.mktemp("tls") / "proxy.log",
                          ca=cert, TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key),
                          RATE_LIMIT_RPS=str(RPS), RATE_LIMIT_BURST=str(BURST), PORT=str(port),
                          HTTP_REDIRECT_PORT=str(redirect_port),
                          PUBLIC_URL=f"https://localhost:{port}")
    yield running
    stop_proxy(running)


def test_https_is_verified_by_the_client_and_negotiates_http2(secure_proxy, certificate):
    cert, _ = certificate
    assert requests.get(f"{secure_proxy.url}/ready", verify=str(cert), timeout=30).ok
    with pytest.raises(requests.exceptions.SSLError):  # a client that trusts nothing else
        requests.get(f"{secure_proxy.url}/ready", timeout=30)
    address = urlsplit(secure_proxy.url)
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((address.hostname, address.port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.selected_alpn_protocol() == "h2"
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    old = ssl.create_default_context(cafile=str(cert))  # a CBC cipher (no AEAD) is refused
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.set_ciphers("ECDHE-ECDSA-AES128-SHA")
    with socket.create_connection((address.hostname, address.port), timeout=30) as raw, \
            pytest.raises(ssl.SSLError), old.wrap_socket(raw, server_hostname="localhost"):
        pass


def test_plain_http_is_redirected_to_public_url_whatever_host_the_client_names(
        secure_proxy, certificate, redirect_port):
    cert, _ = certificate
    plain = f"http://127.0.0.1:{redirect_port}"
    https = f"https://localhost:{urlsplit(secure_proxy.url).port}"
    for method, headers in (("GET", {}), ("POST", {"Host": "attacker.example"})):
        answer = requests.request(method, f"{plain}/predict?preprocess=none", data=b"x",
                                  headers=headers, allow_redirects=False, timeout=30)
        assert answer.status_code == 308  # the method and body are kept: POST stays POST
        assert answer.headers["Location"] == f"{https}/predict?preprocess=none"
    followed = requests.get(f"{plain}/ready", verify=str(cert), timeout=30)
    assert followed.status_code == 200
    assert [r.status_code for r in followed.history] == [308]
    assert followed.url == f"{https}/ready"


@pytest.mark.parametrize(("settings", "message"), [
    ({"PUBLIC_URL": "https://localhost"}, "it needs TLS_CERT_FILE and TLS_KEY_FILE"),
    ({"PUBLIC_URL": "http://localhost", "TLS": "on"}, "PUBLIC_URL must be https://host"),
    ({"PUBLIC_URL": "https://localhost/x;", "TLS": "on"}, "PUBLIC_URL must be https://host"),
    ({"TLS": "on"}, "PUBLIC_URL must be https://host"),
    *(({"PUBLIC_URL": url, "TLS": "on"}, "PUBLIC_URL must be https://host")
      for url in ("https://:", "https://:443", "https://localhost:", "https://localhost:0",
                  "https://localhost:70000", "https://a:1:2", "https://-x", "https://[::1",
                  "https://[1.2.3.4]", "https://[::1::2]", "https://[12345::1]", "https://[:]",
                  "https://1.2.3.999", "https://host.123", "https://a..b", "https://x-.y",
                  "https://[:192.0.2.1]", "https://a.0x1f")),
], ids=["without-tls", "http", "with-path", "no-public-url", "no-host", "port-only",
        "empty-port", "port-0", "port-too-big", "two-ports", "leading-dash", "open-bracket",
        "ipv4-in-brackets", "two-double-colons", "long-group", "colon-only", "octet-999",
        "numeric-last-label", "empty-label", "label-ending-in-dash", "one-colon-ipv4",
        "hex-last-label"])
def test_a_redirect_without_tls_or_a_public_https_url_stops_nginx_from_starting(
        settings, message, certificate, tmp_path):
    cert, key = certificate
    env = {"HTTP_REDIRECT_PORT": str(free_port()),
           **{k: v for k, v in settings.items() if k != "TLS"}}
    if "TLS" in settings:
        env.update(TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key))
    nginx = start_nginx(tmp_path, **env)
    try:
        assert nginx.wait(timeout=30) == 1
    finally:  # an nginx that did start must not outlive the test
        end_process(nginx)
    assert message in (tmp_path / "nginx.log").read_text()


@pytest.mark.parametrize("url", [
    "https://example.com.", "https://xn--bcher-kva.example:8443", "https://192.0.2.1",
    "https://[2001:db8::1]:8443", "https://[::ffff:192.0.2.1]", "https://[1:2:3:4:5:6:7:8]",
    "https://[64:ff9b::a:192.0.2.1]", "https://[fe80::1:2:3:4:192.0.2.1]", "https://9gag.example",
    "https://a.9gag"])
def test_a_public_url_of_any_host_form_is_the_redirects_target(url, certificate, tmp_path):
    cert, key = certificate
    nginx = start_nginx(tmp_path, HTTP_REDIRECT_PORT=str(free_port()), PUBLIC_URL=url,
                        TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key))
    try:
        wait_until(lambda: (tmp_path / "nginx.pid").exists() or nginx.poll() is not None,
                   "nginx to start or stop")
        assert nginx.poll() is None, (tmp_path / "nginx.log").read_text()
        assert f"return 308 {url}$request_uri;" in (tmp_path / "nginx.conf").read_text()
    finally:
        end_process(nginx)


def flood(url: str, token: str, cert: Path, body: Path, count: int, rate: int, folder: Path
          ) -> subprocess.Popen:
    """curl, another process, sending ``count`` predictions at ``rate`` a second, one after
    the other (curl's --rate paces only sequential transfers); each line of its output
    (line-buffered, so a stopped curl has written what it got) is a status and the
    Retry-After it got. Each its own config file: rewriting one that a curl started just
    before is still reading made that curl exit 2 (two of the four, now and then)."""
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix="urls-", delete=False) as config:
        config.write(f'url = "{url}/predict"\noutput = "/dev/null"\n' * count)
    return subprocess.Popen(
        ["stdbuf", "-oL", "curl", "--silent", "--no-progress-meter", "--rate", f"{rate}/s",
         "--cacert", str(cert),
         "--header", f"Authorization: Bearer {token}",
         "--header", "Content-Type: image/png", "--data-binary", f"@{body}",
         "--write-out", "%{http_code} %header{retry-after}\\n",
         "--config", config.name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)


def quiet_p99(session: requests.Session, url: str, digit: bytes,
              count: int = QUIET_REQUESTS) -> float:
    """The 99th percentile of ``count`` predictions sent at QUIET_RATE (paced, a client's
    own rhythm: each leaves at its time, whenever the one before was answered)."""
    seconds = []
    first = time.perf_counter()
    for i in range(count):
        time.sleep(max(0.0, first + i / QUIET_RATE - time.perf_counter()))
        started = time.perf_counter()
        response = session.post(f"{url}/predict", data=digit, timeout=30)
        seconds.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return statistics.quantiles(seconds, n=100)[98]


def test_a_noisy_client_gets_429s_and_a_quiet_one_keeps_its_latency(
        secure_proxy, certificate, tmp_path):
    cert, _ = certificate
    digit = digit_png()
    body = tmp_path / "digit.png"
    body.write_bytes(digit)
    quiet = requests.Session()
    quiet.trust_env = False  # else REQUESTS_CA_BUNDLE would replace the verify below
    quiet.verify = str(cert)
    quiet.headers.update({"Authorization": "Bearer quiet-client", "Content-Type": "image/png"})
    quiet_p99(quiet, secure_proxy.url, digit, 5)  # warm: connection, TLS session, model
    alone = quiet_p99(quiet, secure_proxy.url, digit)
    started = time.perf_counter()
    # Four curls (each pays a connection per refused request), enough for 60 s: stopped
    # once the quiet client is done.
    noisy = [flood(secure_proxy.url, "noisy-client", cert, body, NOISY_RATE // 4 * 60,
                   NOISY_RATE // 4, tmp_path) for _ in range(4)]
    try:
        wait_until(lambda: '"status": 429' in secure_proxy.log(), "the first 429")
        loaded = quiet_p99(quiet, secure_proxy.url, digit)
        assert all(one.poll() is None for one in noisy), "the flood ended first"
    finally:
        for one in noisy:
            one.terminate()
        # what each curl wrote, less its last line, which the stop may have cut
        out = "\n".join(one.communicate(timeout=60)[0].rpartition("\n")[0] for one in noisy)
    rate = len(out.splitlines()) / (time.perf_counter() - started)
    answers = [line.split() for line in out.splitlines() if line]
    refused = [answer for answer in answers if answer[0] == "429"]
    print(f"quiet p99: {1000 * alone:.1f} ms alone, {1000 * loaded:.1f} ms beside a client "
          f"at {rate:.0f}/s ({len(refused)} of {len(answers)} refused)")
    assert refused and all(answer[1:] == ["1"] for answer in refused), answers[:5]
    assert {answer[0] for answer in answers} <= {"200", "429"}
    assert len(refused) > len(answers) / 2, "the noisy client got most of what it asked"
    # It asked for 10×; a loaded machine may let curl reach a little less.
    assert rate > 0.7 * NOISY_RATE, "the noisy client was not as noisy as meant"
    assert loaded <= 2 * alone, (alone, loaded)


def test_the_429_is_in_each_protocols_error_shape(secure_proxy, certificate):
    cert, _ = certificate
    session = requests.Session()
    session.trust_env = False
    session.verify = str(cert)
    session.headers["Authorization"] = "Bearer shape-client"
    for path, shape in (("/models", dict), ("/v1/models/mnist_cnn", str)):
        answers = [session.get(secure_proxy.url + path, timeout=30)
                   for _ in range(RPS + BURST + 5)]
        refused = [a for a in answers if a.status_code == 429]
        assert refused, [a.status_code for a in answers]
        assert refused[0].headers["Retry-After"] == "1"
        assert refused[0].headers["Content-Type"] == "application/json"
        error = refused[0].json()["error"]
        assert isinstance(error, shape)
        message = error["message"] if shape is dict else error
        assert "RATE_LIMIT_RPS" in message
        wait_until(lambda p=path: session.get(secure_proxy.url + p, timeout=30).ok,
                   "the client's budget coming back")
