"""The per-batch steps of the dataflow, bound to their settings."""

from __future__ import annotations

import gc
import logging
from collections import Counter

from bytewax.inputs import Source

from connectors.files import JsonLinesSource
from dataflows import metrics, priorities
from dataflows.config import Settings
from dataflows.logging import configure, quiet_interrupts
from operators.contracts import default_registry
from operators.enrich import Enricher
from operators.model import DlqReason, EventBatch, RawBatch
from operators.validate import decode_batch

log = logging.getLogger(__name__)

#: The `stream` label of `pipeline_events_in_total`: what the input hands over.
INPUT_STREAM = "raw"


# The cyclic garbage collector's first-generation threshold. Every batch allocates tens of
# thousands of short-lived tuples and lists that reference counting frees at the end of the batch;
# with Python's default (700) the collector would scan and promote them several times per batch
# and then re-scan the long-lived window and session state as it fills the older generations.
GC_GENERATION0_THRESHOLD = 200_000


def start_operations(settings: Settings) -> None:
    """JSON logs on stderr (an interrupt ends the run with a log line, not a traceback), the
    metrics endpoint, garbage collector tuning and the helper threads' priority; once per
    process, before the flow is built.

    Counters are created at zero for every DLQ reason, so that `increase()` in the alerts sees
    the first rejection of a reason (a series that starts at 1 has no increase).
    """
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GENERATION0_THRESHOLD, older, oldest)
    gc.freeze()  # what was loaded at start-up (modules, contracts, parsers) is never collected
    configure(settings=settings)
    quiet_interrupts()
    priorities.start(settings.pipeline_helper_nice)
    m = metrics.get()
    m.events_in(INPUT_STREAM, 0)
    m.late_events(0)
    m.events_ahead(0)
    for reason in DlqReason:
        m.dlq_records(reason.value, 0)


def input_source(settings: Settings) -> Source[EventBatch]:
    """The input, validated as it is read: a Kafka partition that is a full poll or more behind
    has its next poll read and validated on the read-ahead thread while the flow runs on the one
    before."""
    validate = Validate()
    if settings.input_path is not None:
        return JsonLinesSource(settings.input_path, settings.pipeline_batch_size, validate)
    from connectors.kafka import KafkaBatchSource

    return KafkaBatchSource(settings, prepare=validate)


def count_dead_letters(step: str, partition: str, records: list[dict]) -> None:
    """Count one batch's DLQ records by reason; log the batch at INFO and each record at DEBUG."""
    reasons = Counter(record["reason"] for record in records)
    m = metrics.get()
    for reason, count in reasons.items():
        m.dlq_records(reason, count)
    log.info(
        "%s: %d records to the DLQ",
        step,
        len(records),
        extra={
            "step": step,
            "partition": partition,
            "reasons": dict(reasons),
            "correlation_ids": [record["correlation_id"] for record in records[:10]],
        },
    )
    if log.isEnabledFor(logging.DEBUG):
        for record in records:
            log.debug(
                "%s: %s rejected (%s): %s",
                step,
                record["source"],
                record["reason"],
                record["error"],
                extra={"correlation_id": record["correlation_id"], "reason": record["reason"]},
            )


class Validate:
    """Decode and validate a raw batch against the contract registry (thread-safe: the input
    runs it on its read-ahead thread)."""

    def __init__(self):
        self._registry = default_registry()

    def __call__(self, batch: RawBatch) -> EventBatch:
        checked = decode_batch(batch, self._registry)
        if batch.records:  # a Kafka partition announces itself with an empty first batch
            m = metrics.get()
            m.events_in(INPUT_STREAM, len(batch.records))
            m.batch_size("validate", len(batch.records))
        if checked.dlq:
            count_dead_letters("validate", batch.partition, checked.dlq)
        return checked


class Enrich:
    """Geo and user-agent enrichment; the enricher (and its caches) is built once per worker."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._enricher = None

    def __call__(self, batch: EventBatch) -> EventBatch:
        if self._enricher is None:
            self._enricher = Enricher(self._settings)
        events, failed = self._enricher.enrich(batch.events)
        if batch.events.height:
            metrics.get().batch_size("enrich", batch.events.height)
        if failed:
            count_dead_letters("enrich", batch.partition, failed)
        return EventBatch(batch.partition, events, batch.dlq + failed)
