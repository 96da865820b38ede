"""deploy/grafana/dashboard.json drawn with matplotlib from a real Prometheus: each panel's
queries run as Grafana would run them (range queries for graphs, instant ones for stats
and bars) and laid out on the dashboard's grid. Our rendering of its queries, not Grafana:
there is no Grafana here, and the README says so under the picture."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from matplotlib.figure import Figure

from tests.conftest import ROOT
from tests.deploy.prometheus import SCRAPE_SECONDS, Prometheus

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
ROW_INCHES, COLUMN_INCHES = 0.36, 0.75  # one grid unit; Grafana's are 30 px and 1/24 wide
TITLE_INCHES = 0.5
# Room inside a panel's cell for the axis labels (left, bottom) and its title (top).
LEFT, BOTTOM, TOP, RIGHT = 0.6, 0.55, 0.3, 0.15
BACKGROUND, PANEL, TEXT = "#111217", "#181b1f", "#ccccdc"
# Units as Grafana shows them: a factor and the axis label.
UNITS = {"s": (1000, "ms"), "percentunit": (100, "%"), "reqps": (1, "req/s")}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions(dashboard: dict) -> list[str]:
    """Every query of every panel, and of the template variables."""
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    # Grafana's label_values(metric, label): the metric is PromQL, the label is not.
    return queries + [re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", variable["definition"])
                      for variable in dashboard["templating"]["list"]
                      if variable["type"] == "query"]


def substitute(expr: str, seconds: float) -> str:
    """Grafana's variables as it would fill them in: every model, a rate window of four
    scrapes, the whole time range."""
    return (expr.replace("$__rate_interval", f"{4 * SCRAPE_SECONDS}s")
            .replace("$__range", f"{math.ceil(seconds)}s").replace("$model", ".+"))


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def render(dashboard: dict, prometheus: Prometheus, start: float, end: float,
           path: Path) -> dict[str, int]:
    """Draw every panel over [start, end] into ``path``; the series each panel showed."""
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    inches = (24 * COLUMN_INCHES, height * ROW_INCHES + TITLE_INCHES)
    figure = Figure(figsize=inches, facecolor=BACKGROUND)
    figure.suptitle(f"{dashboard['title']}: the dashboard's queries on a real Prometheus, "
                    "drawn by tests/deploy/dashboard.py (not Grafana)", color=TEXT)
    shown = {}
    for panel in dashboard["panels"]:
        axes = figure.add_axes(place(panel["gridPos"], inches))
        axes.set_facecolor(PANEL)
        axes.set_title(panel["title"], color=TEXT, fontsize=10, loc="left")
        axes.tick_params(colors=TEXT, labelsize=7)
        draw = graph if panel["type"] == "timeseries" else values
        shown[panel["title"]] = draw(axes, panel, prometheus, start, end)
        if not shown[panel["title"]]:
            axes.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center",
                      transform=axes.transAxes)
    figure.savefig(path, dpi=80, facecolor=BACKGROUND)
    return shown


def place(pos: dict, inches: tuple[float, float]) -> tuple[float, float, float, float]:
    """A panel's grid position as the figure fractions of its plotting area."""
    width, height = inches
    left = pos["x"] * COLUMN_INCHES + LEFT
    bottom = height - TITLE_INCHES - (pos["y"] + pos["h"]) * ROW_INCHES + BOTTOM
    return (left / width, bottom / height, (pos["w"] * COLUMN_INCHES - LEFT - RIGHT) / width,
            (pos["h"] * ROW_INCHES - BOTTOM - TOP) / height)


def graph(axes, panel: dict, prometheus: Prometheus, start: float, end: float) -> int:
    """A time series panel: each target's range query, one line per series."""
    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    factor, label = UNITS.get(unit, (1, ""))
    count = 0
    for target in panel["targets"]:
        for series in prometheus.query(substitute(target["expr"], end - start), start=str(start),
                                       end=str(end), step=str(SCRAPE_SECONDS)):
            times = [float(t) - end for t, _ in series["values"]]
            axes.plot(times, [float(v) * factor for _, v in series["values"]],
                      label=legend(target["legendFormat"], series["metric"]))
            count += 1
    defaults = panel["fieldConfig"]["defaults"]
    if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode") == "line":
        for step in defaults["thresholds"]["steps"][1:]:
            axes.axhline(step["value"] * factor, color=step["color"], linestyle="--")
    axes.set_xlim(start - end, 0)
    axes.set_xlabel("seconds ago", color=TEXT, fontsize=7)
    axes.set_ylabel(label, color=TEXT, fontsize=7)
    if count:
        axes.legend(fontsize=6, loc="upper left", facecolor=PANEL, labelcolor=TEXT)
    return count


def values(axes, panel: dict, prometheus: Prometheus, start: float, end: float) -> int:
    """A stat or bar gauge panel: each target's instant query at ``end`` as bars (a
    histogram's buckets de-cumulated, as Grafana's heatmap format does)."""
    factor, label = UNITS.get(panel["fieldConfig"]["defaults"].get("unit", ""), (1, ""))
    names, numbers = [], []
    for target in panel["targets"]:
        result = prometheus.query(substitute(target["expr"], end - start), time=str(end))
        if target.get("format") == "heatmap":
            result = sorted(result, key=lambda s: float(s["metric"]["le"]))
            cumulative = [float(s["value"][1]) for s in result]
            numbers += [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]
        else:
            numbers += [float(s["value"][1]) * factor for s in result]
        names += [legend(target["legendFormat"], s["metric"]) for s in result]
    axes.bar(range(len(numbers)), numbers, color="#73bf69")
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=6)
    axes.set_ylabel(label, color=TEXT, fontsize=7)
    for place, number in enumerate(numbers):
        axes.text(place, number, f"{number:.4g}", color=TEXT, ha="center", va="bottom",
                  fontsize=8)
    return len(numbers)
