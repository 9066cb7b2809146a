"""Window and session state under live load, in-process: what a snapshot every epoch costs.

`python -m bench.state_snapshots [--rate 5000] [--seconds 300] [--shards 8] [--seed 7]`

Generates `rate × seconds` live events (`bench.workload`, event time moving with the clock),
validates them and cuts them into one batch per second, as a 1 s epoch would. Each batch goes
through the event-time clock into the windows and sessions of every shard, then every shard is
snapshotted the way the dataflow does it (`_ShardLogic.snapshot`). Reports per minute: the state
held, time spent folding batches in and pickling snapshots, and the snapshot bytes; at the end, the
snapshot logs' chunks. No servers needed.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import time

from bench import workload
from dataflows.steps import GC_GENERATION0_THRESHOLD
from operators.event_time import PartitionClock
from operators.model import RawBatch, RawRecord
from operators.sessions import SessionState, session_partials
from operators.validate import decode_batch
from operators.windows import WindowState, window_partials

GAP_MS = 1_800_000  # the defaults of PIPELINE_SESSION_GAP_S and PIPELINE_LATE_RETENTION_S
RETENTION_MS = 86_400_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.state_snapshots")
    parser.add_argument("--rate", type=int, default=5000, help="events per second (per epoch)")
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    _, older, oldest = gc.get_threshold()  # as the dataflow runs (`dataflows.steps`)
    gc.set_threshold(GC_GENERATION0_THRESHOLD, older, oldest)

    print(f"generating {args.rate * args.seconds:,} live events", flush=True)
    lines = workload.generate(
        args.rate * args.seconds,
        seed=args.seed,
        start=int(time.time() * 1000),
        span_s=args.seconds,
    )
    clock = PartitionClock(allowed_lateness_s=60, idle_close_s=30)
    windows = [WindowState(retention_ms=RETENTION_MS) for _ in range(args.shards)]
    sessions = [SessionState(gap_ms=GAP_MS, retention_ms=RETENTION_MS) for _ in range(args.shards)]
    spent = {"apply": 0.0, "windows": 0.0, "sessions": 0.0}
    for second in range(1, args.seconds + 1):
        records = [RawRecord(next(lines), "bench", time.time()) for _ in range(args.rate)]
        events = decode_batch(RawBatch("p0", records)).events
        clock.observe(events)
        started = time.perf_counter()
        window_parts = window_partials(events, args.shards)
        session_parts = session_partials(events, GAP_MS, args.shards)
        for shard in range(args.shards):
            windows[shard].apply("p0", clock.watermark_ms, window_parts.get(shard))
            sessions[shard].apply("p0", clock.watermark_ms, session_parts.get(shard))
        applied = time.perf_counter()
        window_bytes = sum(len(pickle.dumps(s, pickle.HIGHEST_PROTOCOL)) for s in windows)
        pickled_windows = time.perf_counter()
        session_bytes = sum(len(pickle.dumps(s, pickle.HIGHEST_PROTOCOL)) for s in sessions)
        spent["apply"] += applied - started
        spent["windows"] += pickled_windows - applied
        spent["sessions"] += time.perf_counter() - pickled_windows
        if second % 60 == 0 or second == args.seconds:
            print(
                f"{second:5d}s  cells={sum(s.state_size() for s in windows):,} "
                f"session_ids={sum(s.state_size() for s in sessions):,}  "
                f"apply={spent['apply']:.1f}s  snapshots: windows={spent['windows']:.1f}s "
                f"({window_bytes / 1e6:.1f} MB) sessions={spent['sessions']:.1f}s "
                f"({session_bytes / 1e6:.1f} MB)",
                flush=True,
            )
    for name, states in (("windows", windows), ("sessions", sessions)):
        totals: dict[str, int] = {}
        for state in states:
            for key, value in state.log.stats().items():
                totals[key] = totals.get(key, 0) + value
        print(f"{name} snapshot logs: {totals}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
