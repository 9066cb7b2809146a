"""Pipeline metrics: one small interface, Prometheus is one implementation of it.

Code that counts something calls a method of the process's `Metrics` object and never touches
prometheus_client itself:

    from dataflows import metrics

    m = metrics.get()                      # built on first use from Settings (env)
    m.events_in("raw", len(batch))
    m.dlq_records("bad_timestamp")
    m.consumer_lag("events.raw", 3, high_watermark - position)
    m.end_to_sink_latency("postgres", time.time() - oldest_ingested_at)

`get()` builds a `PrometheusMetrics` on prometheus_client's process-wide registry and serves it
with `prometheus_client.start_http_server` on `METRICS_HOST:METRICS_PORT` (default
127.0.0.1:9464); with `METRICS_ENABLED=false` it returns a `NoopMetrics`. A port that is already
taken is logged and the pipeline carries on without an endpoint (the `PipelineDown` alert then
fires). Because the registry is the process-wide one, Bytewax's own API server
(`BYTEWAX_DATAFLOW_API_ENABLED`, port 3030, `/metrics`) shows these series as well.

Tests install their own object instead of starting a server:

    recorder = metrics.InMemoryMetrics()
    metrics.install(recorder)              # every later get() returns it
    ...
    assert recorder.value("pipeline_dlq_records_total", reason="bad_timestamp") == 1
    metrics.install(None)                  # back to lazy construction

Exported series (keep the names; alerts and the dashboard in k8s/monitoring use them):

| method | series | type |
| --- | --- | --- |
| `events_in(stream, n)` | `pipeline_events_in_total{stream}` | counter, records read |
| `events_out(stream, sink, n)` | `pipeline_events_out_total{stream,sink}` | counter |
| `dlq_records(reason, n)` | `pipeline_dlq_records_total{reason}` | counter |
| `late_events(n)` | `pipeline_late_events_total` | counter |
| `events_ahead(n)` | `pipeline_events_ahead_total` | counter |
| `consumer_lag(topic, partition, lag)` | `pipeline_consumer_lag{topic,partition}` | gauge, high watermark − position |
| `event_time_lag(partition, s)` | `pipeline_event_time_lag_seconds{partition}` | gauge, now − watermark |
| `end_to_sink_latency(sink, s)` | `pipeline_end_to_sink_latency_seconds{sink}` | histogram, now − ingested_at |
| `sink_retries(sink, n)` | `pipeline_sink_retries_total{sink}` | counter |
| `sink_failures(sink, n)` | `pipeline_sink_failures_total{sink}` | counter |
| `batch_size(step, n)` | `pipeline_batch_size{step}` | histogram |
| `state_size(kind, n)` | `pipeline_state_size{kind}` | gauge (`window_cells`, `open_sessions`) |
| `state_snapshot_bytes(kind, n)` | `pipeline_state_snapshot_bytes{kind}` | gauge, bytes of the last snapshot |
| (set by the constructor) | `pipeline_up` | gauge, 1 |

`end_to_sink_latency` is meant to be called once per batch a sink has written, with the age of
the batch's *oldest* record (`now − min(ingested_at)`), so the histogram's quantiles are an upper
bound of what a record waits. Methods are cheap and thread-safe; call them once per batch, not
once per record.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from dataflows.config import Settings

log = logging.getLogger(__name__)

#: 5 ms to 10 min.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000)

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """The interface. Every method does nothing here; this class is the no-op implementation."""

    def events_in(self, stream: str, count: int = 1) -> None:
        """Records read from the input (`stream` is the source stream, e.g. `raw`)."""

    def events_out(self, stream: str, sink: str, count: int = 1) -> None:
        """Records of an output stream written by a sink."""

    def dlq_records(self, reason: str, count: int = 1) -> None:
        """Records sent to the dead-letter stream, by reason."""

    def late_events(self, count: int = 1) -> None:
        """Events older than their partition's watermark."""

    def events_ahead(self, count: int = 1) -> None:
        """Events whose time is more than PIPELINE_MAX_FUTURE_S past their ingestion."""

    def consumer_lag(self, topic: str, partition: int | str, lag: float) -> None:
        """Kafka high watermark minus the position the source has reached."""

    def event_time_lag(self, partition: int | str, seconds: float) -> None:
        """Wall-clock now minus the partition's event-time watermark."""

    def end_to_sink_latency(self, sink: str, seconds: float) -> None:
        """Now minus `ingested_at` of a batch a sink has just written."""

    def sink_retries(self, sink: str, count: int = 1) -> None:
        """Retried write attempts of a sink."""

    def sink_failures(self, sink: str, count: int = 1) -> None:
        """Writes a sink gave up on (the records go to the DLQ as `sink_failed`)."""

    def batch_size(self, step: str, size: int) -> None:
        """Size of one batch seen by a step."""

    def state_size(self, kind: str, size: int) -> None:
        """Open state: `window_cells`, `open_sessions`."""

    def state_snapshot_bytes(self, kind: str, size: int) -> None:
        """Bytes of the last snapshot of this process's shards of one kind of state."""


class NoopMetrics(Metrics):
    """Counts nothing (`METRICS_ENABLED=false`)."""


def _labels(**labels: object) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


class InMemoryMetrics(Metrics):
    """Keeps every value in memory under the exported series name; for tests.

    `value(name, **labels)` is a counter's total or a gauge's last value;
    `observations(name, **labels)` lists what a histogram was given.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, Labels], float] = defaultdict(float)
        self._observed: dict[tuple[str, Labels], list[float]] = defaultdict(list)
        self._set("pipeline_up", 1)

    def _add(self, name: str, count: float, **labels: object) -> None:
        with self._lock:
            self._values[(name, _labels(**labels))] += count

    def _set(self, name: str, value: float, **labels: object) -> None:
        with self._lock:
            self._values[(name, _labels(**labels))] = float(value)

    def _observe(self, name: str, value: float, **labels: object) -> None:
        with self._lock:
            self._observed[(name, _labels(**labels))].append(float(value))

    def value(self, name: str, **labels: object) -> float:
        with self._lock:
            return self._values.get((name, _labels(**labels)), 0.0)

    def observations(self, name: str, **labels: object) -> list[float]:
        with self._lock:
            return list(self._observed.get((name, _labels(**labels)), ()))

    def names(self) -> set[str]:
        with self._lock:
            return {name for name, _ in self._values} | {name for name, _ in self._observed}

    def events_in(self, stream: str, count: int = 1) -> None:
        self._add("pipeline_events_in_total", count, stream=stream)

    def events_out(self, stream: str, sink: str, count: int = 1) -> None:
        self._add("pipeline_events_out_total", count, stream=stream, sink=sink)

    def dlq_records(self, reason: str, count: int = 1) -> None:
        self._add("pipeline_dlq_records_total", count, reason=reason)

    def late_events(self, count: int = 1) -> None:
        self._add("pipeline_late_events_total", count)

    def events_ahead(self, count: int = 1) -> None:
        self._add("pipeline_events_ahead_total", count)

    def consumer_lag(self, topic: str, partition: int | str, lag: float) -> None:
        self._set("pipeline_consumer_lag", lag, topic=topic, partition=partition)

    def event_time_lag(self, partition: int | str, seconds: float) -> None:
        self._set("pipeline_event_time_lag_seconds", seconds, partition=partition)

    def end_to_sink_latency(self, sink: str, seconds: float) -> None:
        self._observe("pipeline_end_to_sink_latency_seconds", seconds, sink=sink)

    def sink_retries(self, sink: str, count: int = 1) -> None:
        self._add("pipeline_sink_retries_total", count, sink=sink)

    def sink_failures(self, sink: str, count: int = 1) -> None:
        self._add("pipeline_sink_failures_total", count, sink=sink)

    def batch_size(self, step: str, size: int) -> None:
        self._observe("pipeline_batch_size", size, step=step)

    def state_size(self, kind: str, size: int) -> None:
        self._set("pipeline_state_size", size, kind=kind)

    def state_snapshot_bytes(self, kind: str, size: int) -> None:
        self._set("pipeline_state_snapshot_bytes", size, kind=kind)


class PrometheusMetrics(Metrics):
    """prometheus_client counters, gauges and histograms in one registry.

    `registry=None` means prometheus_client's process-wide `REGISTRY`; a registry accepts each
    name once, so build one `PrometheusMetrics` per registry (`get()` does that for the process).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        self.registry = REGISTRY if registry is None else registry
        reg = self.registry
        # Counter names are given without `_total`; prometheus_client adds it to the series.
        self._events_in = Counter(
            "pipeline_events_in", "Records read from the input.", ["stream"], registry=reg
        )
        self._events_out = Counter(
            "pipeline_events_out",
            "Records of an output stream written by a sink.",
            ["stream", "sink"],
            registry=reg,
        )
        self._dlq = Counter(
            "pipeline_dlq_records", "Records sent to the dead-letter stream.", ["reason"],
            registry=reg,
        )  # fmt: skip
        self._late = Counter(
            "pipeline_late_events", "Events older than their partition's watermark.", registry=reg
        )
        self._ahead = Counter(
            "pipeline_events_ahead",
            "Events whose time is more than PIPELINE_MAX_FUTURE_S past their ingestion.",
            registry=reg,
        )
        self._consumer_lag = Gauge(
            "pipeline_consumer_lag",
            "Kafka high watermark minus the source's position, in messages.",
            ["topic", "partition"],
            registry=reg,
        )
        self._event_time_lag = Gauge(
            "pipeline_event_time_lag_seconds",
            "Wall clock minus the partition's event-time watermark.",
            ["partition"],
            registry=reg,
        )
        self._latency = Histogram(
            "pipeline_end_to_sink_latency_seconds",
            "Now minus ingested_at of the oldest record of a batch a sink has written.",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._retries = Counter(
            "pipeline_sink_retries", "Retried sink write attempts.", ["sink"], registry=reg
        )
        self._failures = Counter(
            "pipeline_sink_failures", "Sink writes given up on.", ["sink"], registry=reg
        )
        self._batch_size = Histogram(
            "pipeline_batch_size",
            "Records per batch, by step.",
            ["step"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=reg,
        )
        self._state_size = Gauge(
            "pipeline_state_size",
            "Open state: window cells, open sessions.",
            ["kind"],
            registry=reg,
        )
        self._state_snapshot_bytes = Gauge(
            "pipeline_state_snapshot_bytes",
            "Bytes of the last snapshot of the window and session state, by kind.",
            ["kind"],
            registry=reg,
        )
        self._up = Gauge("pipeline_up", "1 while the pipeline process runs.", registry=reg)
        self._up.set(1)

    def events_in(self, stream: str, count: int = 1) -> None:
        self._events_in.labels(stream).inc(count)

    def events_out(self, stream: str, sink: str, count: int = 1) -> None:
        self._events_out.labels(stream, sink).inc(count)

    def dlq_records(self, reason: str, count: int = 1) -> None:
        self._dlq.labels(reason).inc(count)

    def late_events(self, count: int = 1) -> None:
        self._late.inc(count)

    def events_ahead(self, count: int = 1) -> None:
        self._ahead.inc(count)

    def consumer_lag(self, topic: str, partition: int | str, lag: float) -> None:
        self._consumer_lag.labels(topic, str(partition)).set(lag)

    def event_time_lag(self, partition: int | str, seconds: float) -> None:
        self._event_time_lag.labels(str(partition)).set(seconds)

    def end_to_sink_latency(self, sink: str, seconds: float) -> None:
        self._latency.labels(sink).observe(seconds)

    def sink_retries(self, sink: str, count: int = 1) -> None:
        self._retries.labels(sink).inc(count)

    def sink_failures(self, sink: str, count: int = 1) -> None:
        self._failures.labels(sink).inc(count)

    def batch_size(self, step: str, size: int) -> None:
        self._batch_size.labels(step).observe(size)

    def state_size(self, kind: str, size: int) -> None:
        self._state_size.labels(kind).set(size)

    def state_snapshot_bytes(self, kind: str, size: int) -> None:
        self._state_snapshot_bytes.labels(kind).set(size)


def serve(settings: Settings, registry: CollectorRegistry | None = None) -> bool:
    """Serve `registry` on METRICS_HOST:METRICS_PORT; False (and a warning) if it cannot bind."""
    from prometheus_client import REGISTRY, start_http_server

    try:
        start_http_server(
            settings.metrics_port,
            addr=settings.metrics_host,
            registry=REGISTRY if registry is None else registry,
        )
    except OSError as exc:
        log.warning(
            "metrics endpoint not started on %s:%d: %s",
            settings.metrics_host,
            settings.metrics_port,
            exc,
        )
        return False
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return True


_lock = threading.RLock()
_current: Metrics | None = None
_process_prometheus: PrometheusMetrics | None = None


def build(settings: Settings) -> Metrics:
    """The process's metrics object for these settings; starts the HTTP endpoint when enabled.

    The Prometheus implementation lives on the process-wide registry, so it is built (and its
    endpoint started) once per process; later calls return the same object.
    """
    global _process_prometheus
    if not settings.metrics_enabled:
        return NoopMetrics()
    with _lock:
        if _process_prometheus is None:
            _process_prometheus = PrometheusMetrics()
            serve(settings)
        return _process_prometheus


def get() -> Metrics:
    """The process's metrics object, built on first use from `Settings()`."""
    global _current
    current = _current
    if current is not None:
        return current
    with _lock:
        if _current is None:
            from dataflows.config import Settings

            _current = build(Settings())
        return _current


def install(metrics: Metrics | None) -> Metrics | None:
    """Make `metrics` what `get()` returns (None: build lazily again); returns the previous one."""
    global _current
    with _lock:
        previous, _current = _current, metrics
    return previous
