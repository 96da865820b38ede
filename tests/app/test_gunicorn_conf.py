"""app/gunicorn.conf.py, run by a real gunicorn: metrics survive a reload (SIGHUP), the
temporary folder they live in is removed when the server stops, and servers on one host
share no control socket."""

from __future__ import annotations

import signal
import threading

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_server, stop_server, wait_until

BLANK = {"instances": [[[0.0] * 28] * 28]}


def monotonic_samples(url: str) -> dict[tuple, float]:
    """Every counter and histogram sample /metrics shows (they may only grow), by name and
    labels."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            if family.type in ("counter", "histogram")
            for sample in family.samples if not sample.name.endswith("_created")}


def keep_sending(url: str, stop: threading.Event) -> None:
    """Predictions and health checks one after another until ``stop``; the reload may
    refuse or reset a few, which only means fewer counted."""
    with requests.Session() as session:
        while not stop.is_set():
            try:
                session.post(f"{url}/predict", json=BLANK, timeout=30)
                session.get(f"{url}/health", timeout=30)
            except requests.RequestException:
                pass


def test_a_reload_under_load_keeps_every_counter_and_the_exit_removes_the_folder(
        fit_run, tmp_path):
    server = start_server(fit_run.models_dir, tmp_path / "gunicorn.log",
                          TMPDIR=str(tmp_path))  # where the temporary folder goes
    (folder,) = tmp_path.glob("mnist-serving-metrics-*")
    stop = threading.Event()
    sender = threading.Thread(target=keep_sending, args=(server.url, stop))
    sender.start()
    try:
        wait_until(lambda: any(name == "images_predicted_total"
                               for name, _ in monotonic_samples(server.url)),
                   "a prediction counted")
        old_workers = set(server.worker_pids())
        before = monotonic_samples(server.url)
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: server.log().count("Booting worker") == 4
                   and not old_workers & set(server.worker_pids()), "the reload", 120)
        wait_until(lambda: requests.get(f"{server.url}/ready", timeout=30).ok,
                   "the new workers to be ready")
        after = monotonic_samples(server.url)
    finally:
        stop.set()
        sender.join()
        stop_server(server)
    fell = {key: (value, after.get(key)) for key, value in before.items()
            if after.get(key, 0.0) < value}
    assert not fell, f"counters fell at the reload (before, after): {fell}"
    assert not folder.exists(), "the temporary metrics folder was left behind"


def test_a_server_opens_no_control_socket_that_another_server_would_take(fit_run, tmp_path):
    """gunicorn's control socket defaults to one path per user (~/.gunicorn/gunicorn.ctl),
    so two servers on a host would take it from each other: none is opened."""
    home = tmp_path / "home"
    home.mkdir()
    server = start_server(fit_run.models_dir, tmp_path / "gunicorn.log", HOME=str(home),
                          XDG_RUNTIME_DIR="")
    stop_server(server)
    assert "Control socket" not in server.log()
    assert not (home / ".gunicorn").exists()
