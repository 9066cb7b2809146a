"""Where each output stream goes, per `PIPELINE_SINKS`."""

from __future__ import annotations

import atexit
from collections import Counter
from dataclasses import dataclass, fields

import bytewax.operators as op
import polars as pl
from bytewax.dataflow import Stream

from connectors.files import DirectorySink
from dataflows.config import Settings


@dataclass(frozen=True)
class Outputs:
    enriched: Stream[pl.DataFrame]
    aggregates: Stream[tuple[str, list[dict]]]  # keyed by shard
    sessions: Stream[tuple[str, list[dict]]]  # keyed by shard
    late: Stream[pl.DataFrame]
    dlq: Stream[list[dict]]


def _keyed(step_id: str, stream: Stream, keyed: bool) -> Stream:
    return stream if keyed else op.key_on(step_id, stream, lambda _: "all")


def attach_sinks(outputs: Outputs, settings: Settings) -> None:
    if "local" in settings.sinks:
        counts: Counter = Counter()
        for spec in fields(outputs):
            stream = getattr(outputs, spec.name)
            keyed = spec.name in ("aggregates", "sessions")
            op.output(
                f"local_{spec.name}",
                _keyed(f"local_key_{spec.name}", stream, keyed),
                DirectorySink(settings.pipeline_output_dir, spec.name, counts),
            )
        atexit.register(_print_summary, counts, settings, [f.name for f in fields(outputs)])


def _print_summary(counts: Counter, settings: Settings, streams: list[str]) -> None:
    root = settings.pipeline_output_dir
    lines = [f"  {name:<11} {counts[name]:>9,}  → {root / name}/" for name in streams]
    print("records written per stream:\n" + "\n".join(lines))
