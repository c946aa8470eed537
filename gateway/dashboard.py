"""The Grafana dashboard (deploy/grafana/dashboards/quarantine.json) as data.

Tests and the docs' plot read the panels' PromQL from the dashboard file itself, so that
what is checked against a real Prometheus is exactly what Grafana would run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARD = (
    Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "quarantine.json"
)


@dataclass(frozen=True)
class Query:
    name: str  # "panel title [refId]", or the annotation's name
    expr: str  # PromQL, with Grafana's variables ($__rate_interval, ...) left in
    legend: str = ""


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def dashboard_queries(path: Path = DASHBOARD) -> list[Query]:
    """Every panel target and every Prometheus annotation of the dashboard."""
    dash = load_dashboard(path)
    queries = [
        Query(f"{panel['title']} [{t['refId']}]", t["expr"], t.get("legendFormat", ""))
        for panel in dash["panels"]
        for t in panel.get("targets", [])
    ]
    queries += [
        Query(a["name"], a["expr"])
        for a in dash.get("annotations", {}).get("list", [])
        if a.get("expr")
    ]
    return queries


def for_prometheus(expr: str, *, rate_interval: str, interval: str = "5s") -> str:
    """``expr`` with Grafana's variables replaced, ready for Prometheus' HTTP API."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__interval", interval)
        .replace("$__range", rate_interval)
    )
