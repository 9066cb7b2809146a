"""Window and session state under live load, in-process: what a snapshot every epoch costs.

`python -m bench.state_snapshots [--rate 5000] [--seconds 300] [--shards 8] [--seed 7]
[--gap-s 1800] [--retention-s 86400] [--python-windows]`

Generates `rate × seconds` live events (`bench.workload`, event time moving with the clock),
validates them and cuts them into one batch per second, as a 1 s epoch would. Each batch goes
through the event-time clock into the windows and sessions of every shard, then every shard is
snapshotted the way the dataflow does it (`_ShardLogic.snapshot`). Reports per minute: the state
held (window cells and the user ids they hold, session ids), the process's RSS, time spent folding
batches in and pickling snapshots, and the snapshot bytes; at the end, the snapshot logs' chunks.
`--gap-s` and `--retention-s` stand for `PIPELINE_SESSION_GAP_S` and `PIPELINE_LATE_RETENTION_S`.
No servers needed.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import time

from bench import workload
from dataflows.config import Settings
from dataflows.steps import GC_GENERATION0_THRESHOLD
from operators import windows as windows_module
from operators.event_time import PartitionClock
from operators.model import RawBatch, RawRecord
from operators.sessions import SessionState, session_partials
from operators.validate import decode_batch
from operators.windows import WindowState, window_partials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.state_snapshots")
    parser.add_argument("--rate", type=int, default=5000, help="events per second (per epoch)")
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    defaults = Settings.model_fields
    parser.add_argument("--gap-s", type=float, default=defaults["pipeline_session_gap_s"].default)
    parser.add_argument(
        "--retention-s", type=float, default=defaults["pipeline_late_retention_s"].default
    )
    parser.add_argument(
        "--python-windows",
        action="store_true",
        help="the Python window table (the specification) instead of the compiled one",
    )
    args = parser.parse_args(argv)
    if args.python_windows:
        windows_module.compiled = None
    gap_ms, retention_ms = int(args.gap_s * 1000), int(args.retention_s * 1000)
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
    windows = [WindowState(retention_ms=retention_ms) for _ in range(args.shards)]
    sessions = [SessionState(gap_ms=gap_ms, retention_ms=retention_ms) for _ in range(args.shards)]
    spent = {"apply": 0.0, "windows": 0.0, "sessions": 0.0}
    for second in range(1, args.seconds + 1):
        records = [RawRecord(next(lines), "bench", time.time()) for _ in range(args.rate)]
        events = decode_batch(RawBatch("p0", records)).events
        clock.observe(events)
        started = time.perf_counter()
        window_parts = window_partials(events, args.shards)
        session_parts = session_partials(events, gap_ms, args.shards)
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
                f"session_ids={sum(s.state_size() for s in sessions):,} "
                f"users_in_cells={sum(s.users_held() for s in windows):,} rss={_rss_mb():.0f}MB  "
                f"apply={spent['apply']:.1f}s  snapshots: windows={spent['windows']:.1f}s "
                f"({window_bytes / 1e6:.1f} MB) sessions={spent['sessions']:.1f}s "
                f"({session_bytes / 1e6:.1f} MB)",
                flush=True,
            )
    for name, states in (("windows", windows), ("sessions", sessions)):
        totals: dict[str, int] = {}
        for state in states:
            for key, value in state.snapshot_stats().items():
                totals[key] = totals.get(key, 0) + value
        print(f"{name} snapshot logs: {totals}")
    return 0


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


if __name__ == "__main__":
    raise SystemExit(main())
