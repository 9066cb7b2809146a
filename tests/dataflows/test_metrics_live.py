"""Metrics of a running pipeline: exact counts of an embedded run, and a live `/metrics` scrape of
`python -m bytewax.run dataflows.main` reading Kafka."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from bytewax.testing import run_main
from prometheus_client.parser import text_string_to_metric_families

from bench.workload import generate_items
from connectors.files import read_json_lines
from dataflows import metrics
from dataflows.config import Settings
from dataflows.main import build
from operators.model import DlqReason
from tests.dataflows import truth
from tests.k8s.promql import PROMETHEUS_SERIES, exported_names, metric_names

ROOT = Path(__file__).resolve().parents[2]
STREAMS = ("enriched", "aggregates", "sessions", "late", "dlq")
LATENESS_MS = 60_000  # PIPELINE_ALLOWED_LATENESS_S default


class Recorder(metrics.InMemoryMetrics):
    """An `InMemoryMetrics` that also keeps the highest value each `state_size` gauge reached."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_state: dict[str, float] = defaultdict(float)

    def state_size(self, kind: str, size: int) -> None:
        super().state_size(kind, size)
        self.peak_state[kind] = max(self.peak_state[kind], size)


@pytest.fixture
def recorder():
    recorder = Recorder()
    previous = metrics.install(recorder)
    yield recorder
    metrics.install(previous)


# --- embedded run -------------------------------------------------------------------------------


def test_embedded_run_counts_exactly(tmp_path, recorder):
    items = list(
        generate_items(
            3000,
            seed=23,
            start="2024-06-01T00:00:00Z",
            span_s=2 * 3600,
            late_fraction=0.03,
            bad_fraction=0.03,
            include_too_large=True,
        )
    )
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(item.line + b"\n" for item in items))
    out = tmp_path / "out"

    started = time.time()
    run_main(
        build(
            Settings(
                pipeline_input=f"file:{path}",
                pipeline_output_dir=out,
                pipeline_sinks="local",
                pipeline_batch_size=500,
            )
        )
    )
    ended = time.time()
    m = recorder

    # In: every line, in batches of 500.
    assert m.value("pipeline_events_in_total", stream="raw") == len(items)
    assert m.observations("pipeline_batch_size", step="validate") == [500] * 6

    # DLQ: exactly the generator's bad kinds, and zero for every other reason.
    expected_dlq = truth.dlq_reasons(items)
    assert set(expected_dlq) >= {"malformed_json", "bad_timestamp", "too_large"}
    for reason in DlqReason:
        assert m.value("pipeline_dlq_records_total", reason=reason.value) == expected_dlq.get(
            reason.value, 0
        ), reason

    # Out: what each local file holds.
    written = {name: len(list(read_json_lines(out / name))) for name in STREAMS}
    for name in STREAMS:
        assert m.value("pipeline_events_out_total", stream=name, sink="local") == written[name]
    assert written["enriched"] == len(items) - sum(expected_dlq.values())
    assert sum(m.observations("pipeline_batch_size", step="enrich")) == written["enriched"]

    # Late: every row of the late stream, and the truth's late events.
    events = truth.valid_events(items)
    assert m.value("pipeline_late_events_total") == written["late"]
    assert written["late"] == len(truth.late_event_ids(events, LATENESS_MS)) > 0

    # Event-time lag of the one partition: wall clock minus (max event time − lateness).
    watermark_s = (events["ts"].max() - LATENESS_MS) / 1000
    lag = m.value("pipeline_event_time_lag_seconds", partition="events.jsonl")
    assert started - watermark_s <= lag <= ended - watermark_s

    # Latency of the local sink: once per batch carrying ingested_at, small for a file read now.
    latencies = m.observations("pipeline_end_to_sink_latency_seconds", sink="local")
    assert latencies
    assert all(0 <= s <= ended - started for s in latencies)

    # State: grew while windows and sessions were open, all freed at the end of input.
    assert m.peak_state["window_cells"] > 0
    assert m.peak_state["open_sessions"] > 0
    assert m.value("pipeline_state_size", kind="window_cells") == 0
    assert m.value("pipeline_state_size", kind="open_sessions") == 0

    # No Kafka here.
    assert "pipeline_consumer_lag" not in m.names()


# --- live scrape ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """Sample name → {sorted labels: value} of one GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    series: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return series


def total(series, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for key, v in series.get(name, {}).items() if wanted <= set(key))


def monitored_names() -> set[str]:
    """Every metric name the alert rules and the dashboard query (Prometheus's own excepted)."""
    exprs = []
    alerts = yaml.safe_load((ROOT / "k8s" / "monitoring" / "alerts.yaml").read_text())
    exprs += [rule["expr"] for group in alerts["spec"]["groups"] for rule in group["rules"]]
    dashboard = json.loads((ROOT / "k8s" / "monitoring" / "dashboard.json").read_text())
    exprs += [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    return set().union(*map(metric_names, exprs)) - PROMETHEUS_SERIES


@pytest.mark.servers
def test_live_scrape_of_a_kafka_run(tmp_path):
    from connectors import kafka

    unique = f"live{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = {
        **os.environ,
        "PIPELINE_INPUT": "kafka",
        "PIPELINE_SINKS": "local,redis",
        "PIPELINE_OUTPUT_DIR": str(tmp_path / "out"),
        "PIPELINE_BATCH_SIZE": "500",
        "KAFKA_TOPIC_RAW": f"{unique}.raw",
        "KAFKA_CONSUMER_GROUP": f"{unique}.group",
        "REDIS_KEY_PREFIX": f"{unique}:",
        "METRICS_ENABLED": "true",
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(port),
        "PIPELINE_IDLE_CLOSE_S": "3600",  # watermarks follow event time only during the test
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),
    }
    settings = Settings(
        kafka_topic_raw=env["KAFKA_TOPIC_RAW"], kafka_consumer_group=env["KAFKA_CONSUMER_GROUP"]
    )
    partitions = 3
    kafka.ensure_topics(settings, [settings.kafka_topic_raw], partitions=partitions)
    # Events of the last hour or so (the generator runs past `span_s` a little).
    items = list(
        generate_items(
            3000,
            seed=31,
            start=int((time.time() - 3600) * 1000),
            span_s=1800,
            late_fraction=0.03,
            bad_fraction=0.03,
        )
    )
    producer = kafka.producer(settings)
    watermarks_s: dict[str, float] = {}
    for i, item in enumerate(items):
        producer.produce(settings.kafka_topic_raw, item.line, partition=i % partitions)
        if item.bad is None:
            label = f"{settings.kafka_topic_raw}/{i % partitions}"
            watermark = (item.event_ms - LATENESS_MS) / 1000
            watermarks_s[label] = max(watermarks_s.get(label, watermark), watermark)
    assert producer.flush(30) == 0
    bad = sum(truth.dlq_reasons(items).values())

    stderr_path = tmp_path / "stderr.log"
    started = time.time()
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "dataflows.main"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            series = wait_until_caught_up(process, port, len(items), stderr_path)
            scraped = time.time()
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                pytest.fail("the pipeline did not stop within 60 s of SIGINT")
    try:
        check_scrape(series, items, bad, settings.kafka_topic_raw, partitions)
        # Event-time lag of each partition: the wall clock at its last batch minus its watermark.
        event_lags = {
            dict(key)["partition"]: v
            for key, v in series["pipeline_event_time_lag_seconds"].items()
        }
        assert set(event_lags) == set(watermarks_s)
        for label, lag in event_lags.items():
            assert started - watermarks_s[label] <= lag <= scraped - watermarks_s[label], label
            assert 0 < lag < 2 * 3600, label
        check_logs(stderr_path)
    finally:
        delete_redis_keys(env["REDIS_KEY_PREFIX"])


def wait_until_caught_up(process, port: int, n: int, stderr_path: Path, timeout_s: float = 120):
    """Scrape until every record is read, the lag is back to 0 and the sinks have written."""
    deadline = time.monotonic() + timeout_s
    series: dict = {}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pipeline exited with {process.returncode}:\n{stderr_path.read_text()}")
        try:
            series = scrape(port)
        except OSError:
            time.sleep(0.5)
            continue
        done = (
            total(series, "pipeline_events_in_total", stream="raw") == n
            and "pipeline_consumer_lag" in series
            and total(series, "pipeline_consumer_lag") == 0
            and total(series, "pipeline_end_to_sink_latency_seconds_count", sink="local") > 0
            and total(series, "pipeline_events_out_total", sink="redis") > 0
        )
        if done:
            return series
        time.sleep(0.5)
    pytest.fail(f"not caught up after {timeout_s} s; last scrape: {series}")


def check_scrape(series, items, bad: int, topic: str, partitions: int) -> None:
    # Every name the alerts and the dashboard use, and every exported series, has samples.
    exported, histograms = exported_names()
    for name in monitored_names():
        assert name in series, name
    for name in exported:
        sample = f"{name}_count" if name in histograms else name
        assert sample in series, name

    assert series["pipeline_up"] == {(): 1.0}
    n = len(items)
    assert total(series, "pipeline_events_in_total", stream="raw") == n > 0
    assert total(series, "pipeline_dlq_records_total") == bad
    assert total(series, "pipeline_events_out_total", stream="enriched", sink="local") == n - bad
    assert total(series, "pipeline_batch_size_sum", step="validate") == n

    # Consumer lag: one gauge per topic partition, never negative, 0 once everything is read.
    lags = {dict(key)["partition"]: v for key, v in series["pipeline_consumer_lag"].items()}
    assert set(lags) == {str(p) for p in range(partitions)}
    assert all(v == 0 for v in lags.values())
    assert {dict(key)["topic"] for key in series["pipeline_consumer_lag"]} == {topic}

    # Latency: observed per batch written, and below the 5-minute objective in this small run.
    count = total(series, "pipeline_end_to_sink_latency_seconds_count", sink="local")
    assert count > 0
    assert 0 <= total(series, "pipeline_end_to_sink_latency_seconds_sum", sink="local") / count
    assert total(series, "pipeline_end_to_sink_latency_seconds_sum", sink="local") / count < 300

    # Store sink series exist from the start, at zero while nothing fails.
    assert total(series, "pipeline_sink_failures_total", sink="redis") == 0
    assert total(series, "pipeline_dlq_records_total", reason="sink_failed") == 0

    # State: windows and sessions are held per shard, summed per process.
    kinds = {dict(key)["kind"]: v for key, v in series["pipeline_state_size"].items()}
    assert set(kinds) == {"window_cells", "open_sessions"}
    assert all(v > 0 for v in kinds.values()), kinds
    assert total(series, "pipeline_late_events_total") >= 0


def check_logs(stderr_path: Path) -> None:
    """Python log lines are JSON; DLQ rejections are logged per batch with correlation ids."""
    entries = []
    for line in stderr_path.read_text().splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    assert any(e["message"].startswith("metrics on http://127.0.0.1:") for e in entries)
    rejections = [e for e in entries if e["logger"] == "dataflows.steps"]
    assert rejections
    for entry in rejections:
        assert entry["level"] == "INFO"
        assert entry["step"] == "validate"
        assert sum(entry["reasons"].values()) == int(entry["message"].split()[1])
        assert entry["correlation_ids"]


def delete_redis_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(Settings().redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
