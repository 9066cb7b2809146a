"""The Grafana dashboard: valid JSON, every query names only exported series."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from promql import metric_names, unknown_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "monitoring" / "dashboard.json"


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (f"panel {panel['title']!r}", target["expr"])
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        # Grafana's `label_values(<series selector>, <label>)` wraps a selector, not PromQL.
        match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
        found.append((f"variable {variable['name']!r}", match.group(1) if match else query))
    return found


def test_dashboard_is_valid_json_with_an_identity() -> None:
    dashboard = load()
    assert dashboard["uid"] == "event-pipeline"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in all_panels(dashboard):
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_every_query_names_only_exported_metrics() -> None:
    found = queries(load())
    assert len(found) > 10
    for where, expr in found:
        assert metric_names(expr), where
        assert unknown_names(expr) == set(), where


def test_golden_signals_are_covered() -> None:
    dashboard = load()
    rows = {panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"}
    assert {"Latency", "Traffic", "Errors", "Saturation"} <= rows
    exprs = " ".join(expr for _, expr in queries(dashboard))
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (sink, le)" in exprs
    for name in (
        "pipeline_events_in_total",
        "pipeline_events_out_total",
        "pipeline_dlq_records_total",
        "pipeline_sink_failures_total",
        "pipeline_consumer_lag",
        "pipeline_event_time_lag_seconds",
        "pipeline_state_size",
        "pipeline_state_snapshot_bytes",
    ):
        assert name in exprs, name
    assert "sum by (reason)" in exprs
    assert "sum by (stream)" in exprs


def test_dashboard_is_provisioned_as_a_configmap_by_kustomize() -> None:
    kustomization = yaml.safe_load((ROOT / "k8s" / "monitoring" / "kustomization.yaml").read_text())
    generators = {g["name"]: g for g in kustomization["configMapGenerator"]}
    dashboard = generators["event-pipeline-dashboard"]
    assert dashboard["files"] == ["dashboard.json"]
    assert dashboard["options"]["labels"]["grafana_dashboard"] == "1"
