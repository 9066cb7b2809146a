"""`python -m bytewax.run` with a read probe: `python -m bench.launch STATS.json ARGS...`.

ARGS are `bytewax.run`'s. Before the dataflow starts, the `next_batch` of the Kafka source
partitions (ours, `connectors.kafka._KafkaPartition`, and Bytewax's own, for the naive baseline)
is wrapped to note the wall time of the first and the last non-empty read and the number of
records read; at exit the figures go to STATS.json (`first_read`, `last_read`, `end`, `records`),
`end` being when the dataflow returned, i.e. after its final flush and commit. It also times the
Kafka sink's `build_part` (`sink_setup_s`: one transactional producer per sink partition, built
lazily by Bytewax once the first items reach it). The wrapper costs a
`time.time()` per batch (thousands of records), nothing per record.
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import time
from pathlib import Path

stats = {
    "first_read": None,
    "last_read": None,
    "end": None,
    "records": 0,
    "batches": 0,  # non-empty reads
    "sink_setup_s": 0.0,  # time in sink `build_part` calls after the first read
    "sink_parts": 0,
}


def _count(batch: list) -> int:
    """Records in what a source partition handed over: our validated batches (`EventBatch`), raw
    batches, or the naive baseline's one message per item."""
    return sum(
        item.events.height + len(item.dlq)
        if hasattr(item, "events")
        else len(item.records)
        if hasattr(item, "records")
        else 1
        for item in batch
    )


def _wrap(cls) -> None:
    original = cls.next_batch

    def next_batch(self):
        batch = original(self)
        if batch:
            now = time.time()
            if stats["first_read"] is None:
                stats["first_read"] = now
            stats["last_read"] = now
            stats["records"] += _count(batch)
            stats["batches"] += 1
        return batch

    cls.next_batch = next_batch


def _time_build_part(cls) -> None:
    """Sink partitions (our transactional producers: `init_transactions`, end offsets) are built
    by Bytewax once items reach them, i.e. after the first read; that is set-up, not throughput."""
    original = cls.build_part

    def build_part(self, *args, **kwargs):
        started = time.time()
        try:
            return original(self, *args, **kwargs)
        finally:
            stats["sink_parts"] += 1
            if stats["first_read"] is not None:
                stats["sink_setup_s"] += time.time() - max(started, stats["first_read"])

    cls.build_part = build_part


def main() -> None:
    out = Path(sys.argv[1])
    sys.argv = ["bytewax.run", *sys.argv[2:]]

    def write() -> None:
        stats["end"] = time.time()
        out.write_text(json.dumps(stats))

    # The process's defaults (`dataflows/__init__.py`: one polars thread) are set before
    # `connectors` imports polars, as when `bytewax.run` imports `dataflows.main` first.
    import dataflows  # noqa: F401

    atexit.register(write)
    import bytewax.connectors.kafka as bytewax_kafka

    import connectors.kafka as our_kafka

    _wrap(our_kafka._KafkaPartition)
    _wrap(bytewax_kafka._KafkaSourcePartition)
    for name in ("KafkaStreamSink",):
        if hasattr(our_kafka, name):
            _time_build_part(getattr(our_kafka, name))
    runpy.run_module("bytewax.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
