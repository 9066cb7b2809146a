"""The metrics interface and the JSON log format; no server is started."""

from __future__ import annotations

import inspect
import io
import json
import logging
import signal
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dataflows import metrics
from dataflows.config import Settings
from dataflows.logging import JsonFormatter, configure

# The series the rest of the pipeline, the alerts and the dashboard rely on.
EXPORTED = {
    "pipeline_events_in_total": "counter",
    "pipeline_events_out_total": "counter",
    "pipeline_dlq_records_total": "counter",
    "pipeline_late_events_total": "counter",
    "pipeline_events_ahead_total": "counter",
    "pipeline_consumer_lag": "gauge",
    "pipeline_event_time_lag_seconds": "gauge",
    "pipeline_end_to_sink_latency_seconds": "histogram",
    "pipeline_sink_retries_total": "counter",
    "pipeline_sink_failures_total": "counter",
    "pipeline_batch_size": "histogram",
    "pipeline_state_size": "gauge",
    "pipeline_state_snapshot_bytes": "gauge",
    "pipeline_up": "gauge",
}


def observe_each_once(m: metrics.Metrics) -> None:
    m.events_in("raw", 5)
    m.events_out("enriched", "postgres", 4)
    m.dlq_records("bad_timestamp")
    m.late_events(2)
    m.events_ahead(3)
    m.consumer_lag("events.raw", 3, 120)
    m.event_time_lag("events.raw/3", 61.5)
    m.end_to_sink_latency("postgres", 0.42)
    m.sink_retries("redis")
    m.sink_failures("opensearch")
    m.batch_size("validate", 5000)
    m.state_size("open_sessions", 17)
    m.state_snapshot_bytes("open_sessions", 4096)


def exposition(registry: CollectorRegistry) -> dict[str, dict[tuple, float]]:
    """Series name → {sorted labels: value}, parsed back from the text format."""
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_prometheus_exposes_every_name_after_one_observation_each() -> None:
    registry = CollectorRegistry()
    observe_each_once(metrics.PrometheusMetrics(registry))
    series = exposition(registry)

    for name, kind in EXPORTED.items():
        if kind == "histogram":
            assert f"{name}_bucket" in series, name
            assert f"{name}_count" in series, name
            assert f"{name}_sum" in series, name
        else:
            assert name in series, name

    assert series["pipeline_events_in_total"] == {(("stream", "raw"),): 5}
    assert series["pipeline_events_out_total"] == {
        (("sink", "postgres"), ("stream", "enriched")): 4
    }
    assert series["pipeline_dlq_records_total"] == {(("reason", "bad_timestamp"),): 1}
    assert series["pipeline_late_events_total"] == {(): 2}
    assert series["pipeline_events_ahead_total"] == {(): 3}
    assert series["pipeline_consumer_lag"] == {(("partition", "3"), ("topic", "events.raw")): 120}
    assert series["pipeline_event_time_lag_seconds"] == {(("partition", "events.raw/3"),): 61.5}
    assert series["pipeline_sink_retries_total"] == {(("sink", "redis"),): 1}
    assert series["pipeline_sink_failures_total"] == {(("sink", "opensearch"),): 1}
    assert series["pipeline_state_size"] == {(("kind", "open_sessions"),): 17}
    assert series["pipeline_state_snapshot_bytes"] == {(("kind", "open_sessions"),): 4096}
    assert series["pipeline_up"] == {(): 1}
    assert series["pipeline_end_to_sink_latency_seconds_count"] == {(("sink", "postgres"),): 1}
    assert series["pipeline_batch_size_sum"] == {(("step", "validate"),): 5000}


def test_latency_buckets_run_from_5ms_to_10min() -> None:
    registry = CollectorRegistry()
    metrics.PrometheusMetrics(registry).end_to_sink_latency("s3", 0.001)
    bounds = sorted(
        float(dict(labels)["le"])
        for labels in exposition(registry)["pipeline_end_to_sink_latency_seconds_bucket"]
    )
    assert bounds[0] == 0.005
    assert bounds[-2] == 600.0  # then +Inf
    assert bounds[-1] == float("inf")
    assert 300.0 in bounds  # the p95 > 5 min alert threshold is a bucket boundary


def test_two_registries_do_not_collide() -> None:
    observe_each_once(metrics.PrometheusMetrics(CollectorRegistry()))
    observe_each_once(metrics.PrometheusMetrics(CollectorRegistry()))


def test_in_memory_records_the_same_names() -> None:
    recorder = metrics.InMemoryMetrics()
    observe_each_once(recorder)
    recorder.events_in("raw", 2)

    assert recorder.names() == set(EXPORTED)
    assert recorder.value("pipeline_events_in_total", stream="raw") == 7
    assert recorder.value("pipeline_consumer_lag", topic="events.raw", partition=3) == 120
    assert recorder.value("pipeline_consumer_lag", topic="events.raw", partition="3") == 120
    assert recorder.value("pipeline_up") == 1
    assert recorder.value("pipeline_dlq_records_total", reason="unknown_schema") == 0
    assert recorder.observations("pipeline_end_to_sink_latency_seconds", sink="postgres") == [0.42]


def test_every_interface_method_is_implemented() -> None:
    interface = {
        name
        for name, member in inspect.getmembers(metrics.Metrics, inspect.isfunction)
        if not name.startswith("_")
    }
    assert len(interface) == 13
    for cls in (metrics.PrometheusMetrics, metrics.InMemoryMetrics):
        for name in interface:
            assert getattr(cls, name) is not getattr(metrics.Metrics, name), (cls, name)
            assert inspect.signature(getattr(cls, name)) == inspect.signature(
                getattr(metrics.Metrics, name)
            ), (cls, name)


def test_noop_accepts_everything() -> None:
    observe_each_once(metrics.NoopMetrics())


def test_disabled_settings_build_a_noop_without_a_server() -> None:
    built = metrics.build(Settings(metrics_enabled=False))
    assert type(built) is metrics.NoopMetrics


def test_get_returns_the_installed_object() -> None:
    recorder = metrics.InMemoryMetrics()
    previous = metrics.install(recorder)
    try:
        assert metrics.get() is recorder
        metrics.get().late_events()
        assert recorder.value("pipeline_late_events_total") == 1
    finally:
        metrics.install(previous)


def test_metrics_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert (defaults.metrics_host, defaults.metrics_port, defaults.metrics_enabled) == (
        "127.0.0.1",
        9464,
        True,
    )
    monkeypatch.setenv("METRICS_HOST", "0.0.0.0")
    monkeypatch.setenv("METRICS_PORT", "9000")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = Settings()
    assert (settings.metrics_host, settings.metrics_port, settings.log_level) == (
        "0.0.0.0",
        9000,
        "DEBUG",
    )
    monkeypatch.setenv("LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="log_level"):
        Settings()


# --- logging --------------------------------------------------------------------------------


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_log_line_parses_and_carries_correlation_id(root_logger: logging.Logger) -> None:
    buf = io.StringIO()
    configure("INFO", stream=buf)
    log = logging.getLogger("connectors.test")
    log.info("wrote %d rows", 3, extra={"correlation_id": "c0ffee", "sink": "postgres"})
    log.debug("not shown")

    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["level"] == "INFO"
    assert entry["logger"] == "connectors.test"
    assert entry["message"] == "wrote 3 rows"
    assert entry["correlation_id"] == "c0ffee"
    assert entry["sink"] == "postgres"
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert list(entry)[:4] == ["ts", "level", "logger", "message"]


def test_json_log_without_correlation_id_and_with_exception() -> None:
    formatter = JsonFormatter()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert "correlation_id" not in entry
    assert "ValueError: bad" in entry["exc_info"]
    assert set(entry) == {"ts", "level", "logger", "message", "exc_info"}


def test_configure_takes_the_level_from_settings_and_replaces_itself(
    root_logger: logging.Logger,
) -> None:
    first = configure(settings=Settings(log_level="warning"), stream=io.StringIO())
    assert root_logger.level == logging.WARNING
    buf = io.StringIO()
    second = configure("debug", stream=buf)
    assert first not in root_logger.handlers and second in root_logger.handlers
    assert root_logger.level == logging.DEBUG
    logging.getLogger("x").debug("shown")
    assert json.loads(buf.getvalue())["message"] == "shown"


@pytest.mark.parametrize("ending", ["KeyboardInterrupt", "ValueError('broken')"])
def test_an_interrupt_ends_the_run_with_a_log_line_instead_of_a_traceback(ending: str) -> None:
    script = (
        "from dataflows.logging import configure, quiet_interrupts\n"
        "configure('INFO')\nquiet_interrupts()\nquiet_interrupts()\n"
        f"raise {ending}\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    if ending == "KeyboardInterrupt":
        (line,) = done.stderr.splitlines()
        assert json.loads(line)["message"] == "stopped by an interrupt"
        assert done.returncode in (130, -signal.SIGINT)
    else:  # anything else still prints its traceback and fails
        assert done.stderr.startswith("Traceback") and "ValueError: broken" in done.stderr
        assert done.returncode == 1
