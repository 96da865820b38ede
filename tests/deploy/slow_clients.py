"""The slow-client attack, and the two topologies it is measured against.

``python -m tests.deploy.slow_clients MODELS_DIR`` runs the same attack against gunicorn
alone and against nginx in front of it (``make serve-proxy``'s script) and prints how the
normal requests sent meanwhile fared (RELIABILITY.md, "Slow clients and the proxy").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from tests.conftest import ROOT, free_port, start_server, stop_server
from tests.restyle import encode, ink_on_paper
from training.data import load_mnist

SERVE_PROXY = ROOT / "deploy" / "nginx" / "serve-proxy.sh"
# A header that never ends within the attack, and the head of a body that never arrives.
SLOW_HEADER = b"POST /predict HTTP/1.1\r\nHost: victim\r\n" + b"X-Pad: " + b"a" * 4096
SLOW_BODY_HEAD = (b"POST /predict HTTP/1.1\r\nHost: victim\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 100000\r\n\r\n")


@dataclass
class Proxy:
    """``deploy/nginx/serve-proxy.sh`` running: nginx on ``url``, gunicorn behind it."""

    url: str
    process: subprocess.Popen
    log_path: Path
    log_handle: object

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_proxy(models_dir: Path, log_path: Path, ca: Path | None = None, **env: str) -> Proxy:
    """Start the script as `make serve-proxy` does, in its own process group (as a
    terminal would), and wait until /ready answers 200 through nginx (over HTTPS, checked
    against ``ca``, when ``env`` has TLS_CERT_FILE) on ``env``'s PORT, else a free one."""
    port = int(env.get("PORT") or free_port())
    environment = {**os.environ, "MODELS_DIR": str(models_dir), "PORT": str(port),
                   "WORKERS": "2", "GUNICORN": str(Path(sys.executable).parent / "gunicorn"),
                   **env}
    environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # Append mode: nginx opens /dev/stdout (this file) again with O_APPEND; gunicorn writes
    # through the inherited descriptor, which must append too or it overwrites nginx's lines.
    handle = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    # Ctrl-C's SIGINT as a terminal delivers it: a shell whose parent ignored SIGINT (a
    # background job, nohup) would inherit that and could not trap it.
    process = subprocess.Popen([str(SERVE_PROXY)], cwd=ROOT, env=environment, stdout=handle,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=_default_sigint)
    scheme = "https" if ca else "http"
    proxy = Proxy(f"{scheme}://127.0.0.1:{port}", process, log_path, handle)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            handle.close()
            raise RuntimeError(f"serve-proxy exited with {process.returncode}:\n{proxy.log()}")
        try:
            if requests.get(f"{proxy.url}/ready", timeout=2,
                            verify=str(ca) if ca else True).status_code == 200:
                return proxy
        except requests.RequestException:  # nginx not listening yet
            pass
        time.sleep(0.3)
    stop_proxy(proxy)
    raise RuntimeError(f"not ready through nginx within 120 s:\n{proxy.log()}")


def interrupt(proxy: Proxy) -> int:
    """Ctrl-C: SIGINT to the whole process group, as a terminal sends it; the exit code."""
    os.killpg(proxy.process.pid, signal.SIGINT)
    try:
        return proxy.process.wait(timeout=60)
    finally:
        proxy.log_handle.close()


def stop_proxy(proxy: Proxy) -> None:
    try:
        interrupt(proxy)
    except subprocess.TimeoutExpired:
        os.killpg(proxy.process.pid, signal.SIGKILL)
        proxy.process.wait()


@dataclass
class AttackResult:
    """What the normal requests sent during the attack got, and what became of it."""

    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    statuses: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # timeouts and connection errors
    open_at_end: dict[str, int] = field(default_factory=dict)  # attack sockets still open
    opened: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        answered = sorted(self.latencies)
        if not answered:
            return f"0 answered, {len(self.failures)} failed ({set(self.failures)})"
        return (f"{len(answered)} answered ({self.statuses.count(200)} × 200), "
                f"{len(self.failures)} failed; latency median "
                f"{statistics.median(answered) * 1000:.0f} ms, max {answered[-1] * 1000:.0f} ms"
                f"; attack sockets open at the end: {self.open_at_end} of {self.opened}")


def open_sockets(host: str, port: int, count: int, first: bytes = b"") -> list[socket.socket]:
    """``count`` connections, each having sent ``first``; ones refused are left out."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        try:
            sock.connect((host, port))
            if first:
                sock.sendall(first)
        except OSError:
            sock.close()
            continue
        sockets.append(sock)
    return sockets


def trickle(groups: dict[str, list[socket.socket]], stop: threading.Event,
            alive: dict[str, set[socket.socket]]) -> None:
    """One byte per second on every trickling connection until ``stop``; a connection the
    server closed drops out of ``alive``."""
    offset = 0
    while not stop.wait(1.0):
        for name, sockets in groups.items():
            for sock in sockets:
                if sock not in alive[name]:
                    continue
                byte = SLOW_HEADER[offset % len(SLOW_HEADER):][:1] if name == "headers" \
                    else b"\x00"
                try:
                    sock.send(byte)
                except OSError:
                    alive[name].discard(sock)
        offset += 1


def still_open(sock: socket.socket) -> bool:
    """True unless the server closed the connection (read gives EOF or an error)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def attack(url: str, body: bytes, seconds: float, timeout: float, slow_headers: int = 40,
           slow_bodies: int = 80, idle: int = 300) -> AttackResult:
    """Open the slow connections, then send one normal /predict at a time for ``seconds``
    (each given ``timeout``); close everything and report."""
    host, port = url.removeprefix("http://").split(":")
    port_number = int(port)
    groups = {"headers": open_sockets(host, port_number, slow_headers, SLOW_HEADER[:1]),
              "bodies": open_sockets(host, port_number, slow_bodies, SLOW_BODY_HEAD),
              "idle": open_sockets(host, port_number, idle)}
    result = AttackResult(opened={name: len(s) for name, s in groups.items()})
    alive = {name: set(sockets) for name, sockets in groups.items()}
    stop = threading.Event()
    trickler = threading.Thread(target=trickle, args=(
        {"headers": groups["headers"], "bodies": groups["bodies"]}, stop, alive), daemon=True)
    trickler.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                response = requests.post(f"{url}/predict", data=body, timeout=timeout,
                                         headers={"Content-Type": "image/png"})
            except requests.RequestException as err:
                result.failures.append(type(err).__name__)
            else:
                result.latencies.append(time.monotonic() - started)
                result.statuses.append(response.status_code)
            time.sleep(0.2)
    finally:
        stop.set()
        trickler.join()
        result.open_at_end = {name: sum(still_open(s) for s in sockets if s in alive[name])
                              for name, sockets in groups.items()}
        for sockets in groups.values():
            for sock in sockets:
                sock.close()
    return result


def digit_png() -> bytes:
    """A real test digit (a 7) as black ink on white paper."""
    mnist = load_mnist(download=None)
    return encode(ink_on_paper(mnist.x_test[0], np.random.default_rng(0)), "PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--timeout", type=float, default=10)
    args = parser.parse_args()
    body = digit_png()
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    server = start_server(args.models_dir, logs / "slow-clients-gunicorn.log")
    try:
        print("gunicorn alone:  ", attack(server.url, body, args.seconds, args.timeout).summary())
    finally:
        stop_server(server)
    proxy = start_proxy(args.models_dir, logs / "slow-clients-proxy.log")
    try:
        print("nginx + gunicorn:", attack(proxy.url, body, args.seconds, args.timeout).summary())
    finally:
        stop_proxy(proxy)


if __name__ == "__main__":
    main()
