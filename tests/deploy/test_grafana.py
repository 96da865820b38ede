"""deploy/grafana/dashboard.json: its shape, thresholds that match the alert rules, every
metric its queries and the alert rules name exported by a live server, and its picture
drawn from a real Prometheus after real traffic."""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest
import requests
import yaml

from app.metrics import Metrics
from tests.conftest import ROOT, wait_until
from tests.deploy.dashboard import expressions, load, render
from tests.deploy.prometheus import (
    ALERTS,
    PROMETHEUS_OWN,
    exported_names,
    metric_names,
    rule_expressions,
    send_bad_image,
    send_digits,
)

SCREENSHOTS = ROOT / "tests" / "screenshots"
# Exported only under a setting or after enough traffic, so absent from the session
# server's /metrics: these are checked against the names the service declares instead.
CONDITIONAL = {"payload_log_records_total": "only while PAYLOAD_LOG_URL logs payloads",
               "input_drift_psi": "only once a window of requests has been seen"}
# The dashboard panel that shows each alert's threshold, as a line or a colour.
THRESHOLD_PANELS = {"InferenceErrorRatioHigh": "Error ratio by reason",
                    "InferenceLatencyP99High": "End-to-end inference time",
                    "InputDrift": "Input drift (PSI per statistic)"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load()


def test_the_dashboard_reads_prometheus_through_a_datasource_variable(dashboard):
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    sources = [panel["datasource"] for panel in dashboard["panels"]] + [
        target["datasource"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_fill_the_grid_without_overlapping(dashboard):
    taken = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells


def test_the_dashboard_draws_the_alert_rules_thresholds(dashboard):
    panels = {panel["title"]: panel for panel in dashboard["panels"]}
    rules = {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]}
    for alert, title in THRESHOLD_PANELS.items():
        threshold = float(re.search(r">\s*([\d.]+)\s*$", rules[alert]["expr"]).group(1))
        steps = panels[title]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert threshold in [step["value"] for step in steps], (alert, title)


def test_metric_names_are_found_in_promql():
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(a_seconds_bucket{model=~"$m",'
            'le!="1"}[$__rate_interval]))) / ignoring (reason) group_left () (b_total offset 5m '
            '+ on(x) c) > 1e3 and max_over_time(d:rule[1m]) > bool 0.25')
    assert metric_names(expr) == {"a_seconds", "b_total", "c", "d:rule"}


def live_names(url: str, pngs: list[bytes]) -> set[str]:
    """What the server's /metrics names once it answered digits and refused bad input,
    with the conditional names its Metrics declares."""
    send_digits(url, pngs)
    send_bad_image(url)
    names = exported_names(requests.get(f"{url}/metrics", timeout=10).text)
    for family in Metrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        if name in CONDITIONAL:
            names.add(name)
    return names | PROMETHEUS_OWN


def test_every_metric_the_dashboard_queries_is_exported_by_the_live_server(
        dashboard, url, digit_pngs):
    wanted = set().union(*(metric_names(expr) for expr in expressions(dashboard)))
    missing = sorted(wanted - live_names(url, digit_pngs[:4]))
    assert not missing, f"not on the live /metrics: {missing}"


def test_every_metric_the_alert_rules_name_is_exported_by_the_live_server(url, digit_pngs):
    wanted = set().union(*(metric_names(expr) for expr in rule_expressions()))
    missing = sorted(wanted - live_names(url, digit_pngs[:4]))
    assert not missing, f"not on the live /metrics: {missing}"


def test_the_dashboard_drawn_from_a_real_prometheus_shows_the_traffic(
        dashboard, prometheus, url, digit_pngs, tmp_path):
    answered = 'sum(model_version_requests_total{job="mnist-api"})'
    before = prometheus.value(answered) or 0
    for burst in range(1, 5):  # bursts a scrape apart: lines rather than dots
        send_digits(url, digit_pngs[:8 * burst])
        send_bad_image(url)
        wait_until(lambda b=burst: (prometheus.value(answered) or 0) >= before + 4 * b * (b + 1),
                   "Prometheus scraping the burst", timeout=30)
    path = tmp_path / "dashboard.png"
    shown = render(dashboard, prometheus, prometheus.scraped, time.time(), path)
    assert shown["Inference requests/s"] and shown["Requests by version (canary split)"]
    assert path.stat().st_size > 50_000
    if os.environ.get("SAVE_SCREENSHOTS") == "1":
        shutil.copy(path, SCREENSHOTS / "dashboard.png")
