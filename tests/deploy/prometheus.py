"""A real Prometheus (Debian's /usr/bin/prometheus) on deploy/prometheus/'s config, its
HTTP API, and the metric names a PromQL expression or a /metrics page holds."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, end_process, free_port, wait_until

PROMETHEUS = Path("/usr/bin/prometheus")
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_SECONDS = 1
# Names Prometheus makes itself for every target, not the service's.
PROMETHEUS_OWN = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


@dataclass
class Prometheus:
    """A running Prometheus scraping one target, first at ``scraped`` (Unix time)."""

    url: str
    process: subprocess.Popen
    log_path: Path
    scraped: float = 0.0

    def query(self, promql: str, **params: str) -> list[dict]:
        """The result of an instant query (or a range query with start/end/step)."""
        path = "query_range" if "step" in params else "query"
        answer = requests.get(f"{self.url}/api/v1/{path}",
                              params={"query": promql, **params}, timeout=10).json()
        assert answer["status"] == "success", (promql, answer)
        return answer["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The one value an instant query returns, None when it returns no series."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


def scrape_config(target: str) -> dict:
    """deploy/prometheus/prometheus.yml, its job pointed at ``target`` (host:port), every
    second, with the alert rules by absolute path."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_SECONDS}s",
                        "evaluation_interval": f"{SCRAPE_SECONDS}s"}
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    return config


def start_prometheus(target: str, folder: Path) -> Prometheus:
    """Prometheus on a free loopback port, its database in ``folder``, ready and with
    ``target`` scraped at least once (Prometheus 2.42 applies its targets after 5 s)."""
    (folder / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(target)))
    port = free_port()
    log_path = folder / "prometheus.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    running = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_until(lambda: ready(running), "Prometheus ready", timeout=30)
        wait_until(lambda: running.value('up{job="mnist-api"}') == 1,
                   "the first scrape of the service", timeout=30)
        running.scraped = time.time()
    except AssertionError:
        stop_prometheus(running)
        raise AssertionError(f"Prometheus did not scrape {target}:\n"
                             f"{log_path.read_text()[-3000:]}") from None
    return running


def ready(prometheus: Prometheus) -> bool:
    assert prometheus.process.poll() is None, prometheus.log_path.read_text()[-3000:]
    try:
        return requests.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:  # not listening yet
        return False


def stop_prometheus(prometheus: Prometheus) -> None:
    end_process(prometheus.process, timeout=20)


# What a PromQL expression holds besides metric names: strings, label matchers, ranges
# and offsets, grouping label lists, numbers, Grafana's $variables.
NOT_NAMES = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]|\$\{?\w+\}?'
                       r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
                       r"|\b\d+(?:ms|[smhdwy])+\b|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b")
IDENTIFIER = re.compile(r"[a-zA-Z_:][\w:]*")
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                      "and", "or", "unless", "offset", "inf", "nan", "atan2"})


def metric_names(expr: str) -> set[str]:
    """The metrics an expression reads: identifiers that are no function call (followed by
    '('), keyword or label, a histogram's _bucket/_sum/_count removed."""
    bare = NOT_NAMES.sub(" ", expr)
    names = set()
    for match in IDENTIFIER.finditer(bare):
        if bare[match.end():].lstrip().startswith("(") or match.group().lower() in KEYWORDS:
            continue
        name = match.group()
        for part in HISTOGRAM_PARTS:
            name = name.removesuffix(part)
        names.add(name)
    return names


def exported_names(exposition: str) -> set[str]:
    """The metric names a /metrics page holds: each sample's name, a histogram's also
    without its _bucket/_sum/_count."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            names.add(sample.name)
            names.update(sample.name.removesuffix(part) for part in HISTOGRAM_PARTS)
    return names


def rule_expressions() -> list[str]:
    """Every alert rule's expression in deploy/prometheus/alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def send_digits(url: str, pngs: list[bytes]) -> None:
    """One /predict request per image, each answered 200."""
    with requests.Session() as session:
        for png in pngs:
            answer = session.post(f"{url}/predict", files={"image": ("d.png", png)},
                                  timeout=30)
            assert answer.status_code == 200, answer.text


def send_bad_image(url: str) -> None:
    """One /predict request the server refuses: a file that is no image."""
    answer = requests.post(f"{url}/predict", files={"image": ("x.png", b"not an image")},
                           timeout=30)
    assert answer.status_code in (400, 422), answer.text
