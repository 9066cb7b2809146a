"""The per-batch steps of the dataflow, bound to their settings."""

from __future__ import annotations

from bytewax.inputs import Source

from connectors.files import JsonLinesSource
from dataflows.config import Settings
from operators.contracts import default_registry
from operators.enrich import Enricher
from operators.model import EventBatch, RawBatch
from operators.validate import decode_batch


def input_source(settings: Settings) -> Source[RawBatch]:
    if settings.input_path is not None:
        return JsonLinesSource(settings.input_path, settings.pipeline_batch_size)
    from connectors.kafka import KafkaBatchSource

    return KafkaBatchSource(settings)


class Validate:
    """Decode and validate a raw batch against the contract registry."""

    def __init__(self):
        self._registry = default_registry()

    def __call__(self, batch: RawBatch) -> EventBatch:
        return decode_batch(batch, self._registry)


class Enrich:
    """Geo and user-agent enrichment; the enricher (and its caches) is built once per worker."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._enricher = None

    def __call__(self, batch: EventBatch) -> EventBatch:
        if self._enricher is None:
            self._enricher = Enricher(self._settings)
        events, failed = self._enricher.enrich(batch.events)
        return EventBatch(batch.partition, events, batch.dlq + failed)
