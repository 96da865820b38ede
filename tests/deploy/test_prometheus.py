"""deploy/prometheus/: promtool's checks and unit tests of the alert rules, and a real
Prometheus scraping a real gunicorn whose PromQL answers count the requests sent."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import datetime

import pytest
import requests
import yaml

from tests.conftest import ROOT, wait_until
from tests.deploy.prometheus import ALERTS, CONFIG, exported_names, send_digits
from tests.deploy.test_kubernetes import BASE, container, documents

RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
SERVICE_MONITOR = ROOT / "deploy" / "prometheus" / "servicemonitor.yaml"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool (Debian's prometheus) is not installed")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=CONFIG.parent, capture_output=True,
                          text=True, timeout=60)


def alert_names() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules():
    for args in (("check", "config", CONFIG.name), ("check", "rules", ALERTS.name)):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_each_alert_rule_fires_and_stays_silent_in_promtools_unit_tests():
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test["alert_rule_test"]]
    for name in alert_names():
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, f"{name} needs a firing and a silent case"


def total(url: str, name: str) -> float:
    """The sum of a counter's samples on the server's own /metrics page."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def test_prometheus_counts_exactly_the_requests_sent(prometheus, url, digit_pngs):
    counters = ("model_version_requests_total", "images_predicted_total")
    queries = {name: f'sum({name}{{job="mnist-api"}})' for name in counters}
    before = {name: total(url, name) for name in counters}
    # Prometheus has caught up with what earlier tests sent before we count ours.
    wait_until(lambda: all((prometheus.value(queries[n]) or 0) == before[n] for n in counters),
               "Prometheus's scrape matching /metrics", timeout=30)
    send_digits(url, digit_pngs[:20])
    wait_until(lambda: all(prometheus.value(queries[n]) == before[n] + 20 for n in counters),
               "Prometheus counting the 20 requests", timeout=30)
    assert {name: total(url, name) for name in counters} == \
        {name: before[name] + 20 for name in counters}


def unix_time(rfc3339: str) -> float:
    """Prometheus's timestamps (nanoseconds, Z) as Unix time."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", rfc3339)).timestamp()


def test_prometheus_evaluates_every_alert_rule_and_the_server_is_up_and_ready(prometheus):
    def rules() -> list[dict]:
        answer = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
        return [rule for group in answer["data"]["groups"] for rule in group["rules"]]

    # An evaluation that started after the first scrape had landed sees its samples.
    wait_until(lambda: all(unix_time(r["lastEvaluation"]) > prometheus.scraped
                           for r in rules()), "every rule evaluated on scraped data", timeout=30)
    assert sorted(rule["name"] for rule in rules()) == sorted(alert_names())
    assert {rule["name"]: rule["health"] for rule in rules()} == \
        dict.fromkeys(alert_names(), "ok")
    # The server is up and serves its models. (Other rules depend on what earlier tests
    # sent the session's server: bad input, shifted digits.)
    states = {rule["name"]: rule["state"] for rule in rules()}
    assert (states["ApiDown"], states["ModelNotReady"]) == ("inactive", "inactive")


def test_the_api_pods_and_the_service_monitor_point_at_gunicorns_metrics():
    deployment = documents(BASE / "api-deployment.yaml")[0]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    ports = {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    assert annotations["prometheus.io/path"] == "/metrics"

    service = documents(BASE / "api-service.yaml")[0]
    (monitor,) = documents(SERVICE_MONITOR)
    assert monitor["kind"] == "ServiceMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The Operator names the job after the Service: the alert rules' job="mnist-api".
    (job,) = yaml.safe_load(CONFIG.read_text())["scrape_configs"]
    assert service["metadata"]["name"] == job["job_name"] == "mnist-api"
    assert 'job="mnist-api"' in ALERTS.read_text()


def test_metric_names_are_read_from_a_metrics_page():
    page = ("# TYPE t_seconds histogram\nt_seconds_bucket{le=\"+Inf\"} 1\nt_seconds_sum 2\n"
            "t_seconds_count 1\n# TYPE r_total counter\nr_total{model=\"m\"} 3\n")
    assert {"t_seconds", "r_total"} <= exported_names(page)
