"""Per-stage breakdown of a py-spy profile: `python -m bench.profile_stages STACKS.txt`.

STACKS.txt is py-spy's collapsed output (`py-spy record --format raw`, written by
`python -m bench run --profile`). Each sample is charged to the first stage whose marker appears
in its stack; start-up (imports, building the dataflow, building the sink partitions) and idle
threads (the metrics server, store write-ahead threads waiting for work) are left out of the
percentages. Samples are per thread: the Kafka source's read-ahead thread (reading and validating
the next polls) and a store's write-ahead thread run beside the worker.
"""

from __future__ import annotations

import sys
from collections import Counter

# (stage, markers), first match wins
STAGES = (
    ("idle thread", ("serve_forever", "Queue.get (")),  # Queue.get: a write-ahead thread waiting
    ("store writes (write-ahead threads)", ("_WriteAhead._run",)),
    ("start-up", ("_locate_dataflow", "build_part", "_find_and_load")),
    ("kafka sink: encode", ("_json_values", "StreamFormat.keys", "as_dicts")),
    ("kafka sink: encode and produce", ("_TransactionalPartition._write_frame",)),
    ("kafka sink: produce", ("_TransactionalPartition._produce",)),
    ("kafka sink: commit", ("_TransactionalPartition._commit", "_TransactionalPartition.close")),
    ("kafka sink: other", ("_TransactionalPartition.write_batch",)),
    ("read ahead (its own thread)", ("_WorkItem.run",)),
    ("read (kafka source)", ("_KafkaPartition.next_batch",)),
    ("validate", ("decode_batch",)),
    ("enrich", ("Enrich.__call__",)),
    ("event time gate", ("_EventTimeLogic",)),
    ("windows", ("WindowState",)),
    ("sessions", ("SessionState",)),
    ("state snapshots", ("_ShardLogic.snapshot", "snapshot")),
    ("store sinks (in the worker)", ("_StorePartition",)),
)


def breakdown(path: str) -> tuple[Counter, int]:
    counts: Counter = Counter()
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for line in lines:
        stack, _, n = line.rstrip().rpartition(" ")
        for stage, markers in STAGES:
            if any(m in stack for m in markers):
                counts[stage] += int(n)
                break
        else:
            counts["other (bytewax, polars glue)"] += int(n)
    work = sum(v for k, v in counts.items() if k not in ("idle thread", "start-up"))
    return counts, work


def main() -> int:
    counts, work = breakdown(sys.argv[1])
    print(f"{'stage':32} {'samples':>8} {'share of processing':>20}")
    for stage, n in counts.most_common():
        share = "" if stage in ("idle thread", "start-up") else f"{100 * n / work:.1f}%"
        print(f"{stage:32} {n:>8} {share:>20}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
