"""Alert rules: every expression names only exported series; every runbook link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from promql import PromQLError, exported_names, metric_names, unknown_names

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "k8s" / "monitoring" / "alerts.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def load_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_code or not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


# --- the tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up == 0", {"up"}),
        ("absent(pipeline_up)", {"pipeline_up"}),
        (
            'sum by (sink, le) (rate(pipeline_end_to_sink_latency_seconds_bucket{sink=~"s3|pg"}[5m]))',
            {"pipeline_end_to_sink_latency_seconds_bucket"},
        ),
        (
            "sum(rate(a_total[5m])) by (reason) / ignoring(reason) group_left sum(b)",
            {"a_total", "b"},
        ),
        ("deriv(sum by (topic) (lag)[15m:1m]) > 0 and on (topic) lag > 1000", {"lag"}),
        ("rate(x[5m] offset 1h) > bool 2", {"x"}),
        ('count_values without (instance) ("version", build_info)', {"build_info"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
        ('{__name__="named_by_matcher", job="x"}', {"named_by_matcher"}),
        ("m @ start() + n @ 1700000000", {"m", "n"}),
        ("1e3 * foo - 0x1f + Inf - NaN", {"foo"}),
        ('rate(m{a="sum(not_a_metric)"}[$__rate_interval])', {"m"}),
        ("topk(5, sum without (pod) (rate(m[${__range}])))", {"m"}),
        ("vector(1)", set()),
        ("time() - m_seconds  # trailing comment naming fake_metric", {"m_seconds"}),
        ("sum by (le) (h_bucket) AND BY (x) y", {"h_bucket", "y"}),
        ("rate(m:recorded:rate5m[1m])", {"m:recorded:rate5m"}),
    ],
)
def test_tokenizer_finds_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", ["", "sum(rate(m[5m])", "m{a='b'", "rate(m[5m)"])
def test_tokenizer_rejects_malformed_expressions(expr: str) -> None:
    with pytest.raises(PromQLError):
        metric_names(expr)


def test_exported_names_come_from_the_prometheus_implementation() -> None:
    names, histograms = exported_names()
    assert "pipeline_events_in_total" in names
    assert "pipeline_up" in names
    assert histograms == {"pipeline_end_to_sink_latency_seconds", "pipeline_batch_size"}


def test_a_rule_naming_a_missing_metric_is_detected() -> None:
    assert unknown_names("increase(pipeline_missing_metric[5m]) > 0") == {"pipeline_missing_metric"}
    assert (
        unknown_names("histogram_quantile(0.9, sum by (le) (rate(pipeline_batch_size_bucket[5m])))")
        == set()
    )
    # A suffix is only stripped from a histogram's own series.
    assert unknown_names("pipeline_consumer_lag_count") == {"pipeline_consumer_lag_count"}
    assert unknown_names("pipeline_events_in") == {"pipeline_events_in"}  # counters end in _total


# --- the rules --------------------------------------------------------------------------------


def test_alerts_file_is_a_prometheus_rule() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"]
    groups = doc["spec"]["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    alerts = [rule["alert"] for rule in load_rules()]
    assert len(set(alerts)) == len(alerts)


def test_every_rule_names_only_exported_metrics() -> None:
    rules = load_rules()
    assert rules
    for rule in rules:
        assert unknown_names(rule["expr"]) == set(), rule["alert"]
        assert metric_names(rule["expr"]), rule["alert"]


def test_the_required_alerts_exist() -> None:
    by_name = {rule["alert"]: rule for rule in load_rules()}
    needed = {
        "PipelineConsumerLagHigh": ("pipeline_consumer_lag", "5m"),
        "PipelineConsumerLagGrowing": ("deriv(", "15m"),
        "PipelineDLQNotEmpty": ("increase(pipeline_dlq_records_total[5m])", None),
        "PipelineErrorRateHigh": ("pipeline_events_in_total", None),
        "PipelineEndToSinkLatencyHigh": ("histogram_quantile(0.95", None),
        "PipelineWorkerDown": ("up{", None),
        "PipelineAbsent": ("absent(pipeline_up)", None),
    }
    for name, (fragment, duration) in needed.items():
        assert name in by_name, name
        assert fragment in by_name[name]["expr"], name
        if duration:
            assert by_name[name]["for"] == duration, name
    assert "> 300" in by_name["PipelineEndToSinkLatencyHigh"]["expr"]
    assert "> 0.01" in by_name["PipelineErrorRateHigh"]["expr"]


def test_every_alert_is_annotated_and_links_into_the_runbook() -> None:
    anchors = github_anchors(RUNBOOK.read_text())
    for rule in load_rules():
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/runbook.md", rule["alert"]
        assert anchor in anchors, (rule["alert"], anchor)


def test_runbook_links_to_its_own_sections_resolve() -> None:
    text = RUNBOOK.read_text()
    anchors = github_anchors(text)
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, anchor
