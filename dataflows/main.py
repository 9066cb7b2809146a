"""The event pipeline, as a wiring diagram.

    read+validate ─ enrich ───┬─ events ─────────────────────────────────→ enriched (+ routes)
                              ├─ dlq ────────────────────────────────────→ dlq
                              └─ event_time ─┬─ late ────────────────────→ late
                                             ├─ windows (per shard) ─────→ aggregates
                                             └─ sessions (per shard) ────→ sessions

Run with `python -m bytewax.run dataflows.main`; every setting comes from the environment
(`dataflows.config.Settings`, documented in docs/configuration.md).
"""

from __future__ import annotations

from functools import partial

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from dataflows.config import Settings
from dataflows.outputs import Outputs, attach_sinks
from dataflows.steps import Enrich, input_source, start_operations
from operators.sessions import SessionState
from operators.stateful import GateConfig, event_time_gate, sharded_state
from operators.windows import WindowState


def build(settings: Settings) -> Dataflow:
    flow = Dataflow("event_pipeline")
    checked = op.input("read", flow, input_source(settings))  # validated as it is read
    enriched = op.map("enrich", checked, Enrich(settings))

    # Output streams are keyed by source partition (or shard): sinks partition by that key.
    dlq = op.filter_map("dlq", enriched, lambda b: (b.partition, b.dlq) if b.dlq else None)
    events = op.filter_map(
        "events", enriched, lambda b: (b.partition, b.events) if b.events.height else None
    )

    retention_ms = int(settings.pipeline_late_retention_s * 1000)
    if settings.pipeline_late_policy == "drop":
        retention_ms = 0
    gate = event_time_gate(
        "event_time",
        enriched,
        GateConfig(
            allowed_lateness_s=settings.pipeline_allowed_lateness_s,
            idle_close_s=settings.pipeline_idle_close_s,
            max_future_s=settings.pipeline_max_future_s,
            count_late=settings.pipeline_late_policy == "reaggregate",
            session_gap_s=settings.pipeline_session_gap_s,
            shards=settings.pipeline_state_shards,
        ),
    )
    aggregates = sharded_state(
        "windows", gate.windows, partial(WindowState, retention_ms=retention_ms)
    )
    sessions = sharded_state(
        "sessions",
        gate.sessions,
        partial(
            SessionState,
            gap_ms=int(settings.pipeline_session_gap_s * 1000),
            retention_ms=retention_ms,
        ),
    )

    attach_sinks(
        Outputs(enriched=events, aggregates=aggregates, sessions=sessions, late=gate.late, dlq=dlq),
        settings,
    )
    return flow


settings = Settings()
start_operations(settings)  # JSON logs on stderr, /metrics on METRICS_PORT (once per process)
flow = build(settings)
