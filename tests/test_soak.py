"""The short soak and chaos runs of tests/soak.py, against a real two-worker gunicorn
(``make soak`` runs the 100,000-request version)."""

from __future__ import annotations

import pytest

from tests.conftest import start_server, stop_server
from tests.soak import (
    RSS_GROWTH_MB,
    kill_a_worker,
    request_kinds,
    soak,
    soak_through_proxy,
    terminate_master,
)

CONCURRENCY = 32


@pytest.fixture(scope="module")
def kinds(mnist):
    return request_kinds(mnist)


@pytest.fixture
def server(fit_run, tmp_path):
    running = start_server(fit_run.models_dir, tmp_path / "gunicorn.log")
    yield running
    if running.process.poll() is None:
        stop_server(running)
    running.log_handle.close()  # stop_server's job, when a test stopped it itself


def test_a_mixed_soak_gets_only_expected_statuses_and_holds_memory_and_latency(server, kinds):
    report = soak(server.url, server.worker_rss_mb, kinds, 3000, CONCURRENCY)
    assert report["requests"] == 3000
    assert report["unexpected"] == {}, report
    assert report["rss_growth_mb"] <= RSS_GROWTH_MB, report
    # Latency drift (last 10% against the first 10%) is judged by `make soak`, over
    # 100,000 requests: 300 samples a side on a shared 2-core machine measure the
    # neighbours' load, not the service.


def test_the_same_soak_through_nginx_gets_the_same_statuses_and_holds_memory(
        fit_run, kinds, tmp_path):
    """nginx in front (``make serve-proxy``): each kind still gets its one status, no
    502/504 from the proxy, and the workers behind it hold their memory."""
    report = soak_through_proxy(fit_run.models_dir, tmp_path / "proxy.log", kinds, 1500,
                                CONCURRENCY)
    assert report["requests"] == 1500
    assert report["unexpected"] == {}, report
    assert len(report["rss_mb_before"]) == 2  # both workers behind nginx were measured
    assert report["rss_growth_mb"] <= RSS_GROWTH_MB, report


def test_a_killed_worker_fails_only_its_own_requests_and_is_replaced(server, kinds):
    report = kill_a_worker(server, kinds, 2000, CONCURRENCY)
    assert report["requests"] == 2000
    # The kill came under load: requests were in flight, and most were yet to be sent.
    assert report["in_flight_at_kill"] > 0 and report["finished_before_kill"] < 1000, report
    # At most the requests the dead worker held: one per client connection it had.
    assert report["failed_total"] <= CONCURRENCY, report
    # Each failure is a broken connection, never an HTTP error from a living worker.
    assert not any(status.rsplit(" ", 1)[1].isdigit() for status in report["failed"]), report
    assert report["killed"] not in report["workers_after"]
    assert len(report["workers_after"]) == 2


def test_sigterm_under_load_stops_cleanly_and_drops_no_request_it_was_sent(server, kinds):
    """Every request the server was sent before it closed its listener is answered,
    rightly; the rest are refused connections, which a client knows it may retry.
    (gunicorn's own gthread worker resets its listen backlog: ~30 of ~2,200 here.)"""
    report = terminate_master(server, kinds, CONCURRENCY)
    assert report["exit_code"] == 0
    # Under load: the signal came after 10 answers per client, with requests in flight.
    assert report["finished_before_signal"] >= 10 * CONCURRENCY, report
    assert report["in_flight_at_signal"] > 0, report
    assert not any(status.rsplit(" ", 1)[1].isdigit() for status in report["failed"]), report
    assert report["dropped"] == 0, report
