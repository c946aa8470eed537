"""The Grafana dashboard is well-formed, and every metric it (or an alert rule) names is one
the gateway or the watcher exports: renaming a metric breaks this test, not the dashboard."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from core.metrics import EXPORTED, LATENCY, REPAIR_SECONDS, WATCHER_EXPORTED
from gateway.dashboard import DASHBOARD, dashboard_queries, load_dashboard

ROOT = Path(__file__).resolve().parents[2]
PANEL_TYPES = {"timeseries", "stat", "bargauge", "gauge", "table", "text"}
METRIC = re.compile(r"\b(?:ray_)?bqg_[a-z_]+\b")


def known_series() -> set[str]:
    """Series names Prometheus sees: the exported names, histograms with their suffixes."""
    names = set(EXPORTED.values()) | set(WATCHER_EXPORTED.values())
    for histogram in (EXPORTED[LATENCY], WATCHER_EXPORTED[REPAIR_SECONDS]):
        names |= {f"{histogram}_{suffix}" for suffix in ("bucket", "sum", "count")}
    return names


def test_dashboard_is_structurally_valid_grafana_json() -> None:
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    assert dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    for panel in dash["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert {"x", "y", "w", "h"} <= set(grid) and grid["x"] + grid["w"] <= 24
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert panel["datasource"]["type"] == datasource["type"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"])
    for annotation in dash["annotations"]["list"]:
        assert annotation["name"] and annotation["datasource"]["uid"]


def test_dashboard_has_every_panel_the_operators_need() -> None:
    titles = " | ".join(p["title"].lower() for p in load_dashboard()["panels"])
    for needed in (
        "quarantine rate",
        "predictions / s",
        "p50",
        "p99",
        "active round",
        "pending",
        "outcome",
        "duration",
        "spool",
        "swap failures",
    ):
        assert needed in titles, f"no panel for {needed!r}"
    names = [q.name for q in dashboard_queries()]
    assert any("activation" in n.lower() for n in names), "round activations are not marked"


def test_every_metric_the_dashboard_and_alerts_name_is_exported() -> None:
    known = known_series()
    exprs = [q.expr for q in dashboard_queries()]
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    exprs += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    used: set[str] = set()
    for expr in exprs:
        names = set(METRIC.findall(expr))
        assert names or "bqg:" in expr, f"no metric in {expr!r}"
        unknown = names - known
        assert not unknown, f"{expr!r} names {unknown}, which nothing exports ({sorted(known)})"
        used |= names
    # and the dashboard or the alerts show every metric of DESIGN.md's list
    base = lambda n: re.sub(r"_(bucket|sum|count)$", "", n)  # noqa: E731
    missing = {base(n) for n in known} - {base(n) for n in used}
    assert not missing, f"{missing} are on no panel and in no alert"


def test_a_renamed_metric_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: rename one exported metric and it does."""
    import core.metrics as metrics

    monkeypatch.setitem(metrics.EXPORTED, metrics.QUARANTINED, "ray_bqg_suspects_total")
    monkeypatch.setattr("tests.deploy.test_dashboard.EXPORTED", metrics.EXPORTED, raising=True)
    with pytest.raises(AssertionError, match="ray_bqg_quarantined_total"):
        test_every_metric_the_dashboard_and_alerts_name_is_exported()


def test_dashboard_file_is_the_provisioned_one() -> None:
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/bqg.yml").read_text()
    )["providers"][0]
    assert provider["type"] == "file" and DASHBOARD.parent.name == "dashboards"
