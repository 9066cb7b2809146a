"""Crash harness: a fixed input in Kafka, a clean run, and a run killed with SIGKILL again and again.

Used by `tests/dataflows/test_exactly_once.py` (a short version in CI) and by `make chaos`
(`python -m tests.chaos --kills 50`). Both runs use the documented commands: `python -m recovery
init` for the store, then `python -m bytewax.run dataflows.main -r <store> -s <interval>`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.workload import generate_items
from connectors import kafka
from dataflows.config import Settings
from tests.dataflows import truth

ROOT = Path(__file__).resolve().parent.parent
STREAMS = ("enriched", "aggregates", "sessions", "late", "dlq")
RAW_PARTITIONS = 3


@dataclass
class Run:
    """One pipeline deployment: its own consumer group, output topics and directories."""

    name: str
    raw_topic: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {
            "PIPELINE_INPUT": "kafka",
            "PIPELINE_SINKS": "local,kafka",
            "PIPELINE_OUTPUT_DIR": str(self.workdir / "out"),
            "PIPELINE_BATCH_SIZE": "500",
            "KAFKA_STOP_AT_END": "true",
            "KAFKA_CONSUMER_GROUP": f"{self.name}.group",
            "KAFKA_TOPIC_RAW": self.raw_topic,
            **{f"KAFKA_TOPIC_{s.upper()}": f"{self.name}.{s}" for s in STREAMS},
            "METRICS_ENABLED": "false",
        }

    @property
    def settings(self) -> Settings:
        return Settings(**{k.lower(): v for k, v in self.env.items()})

    @property
    def store(self) -> Path:
        return self.workdir / "recovery"

    def command(self, snapshot_interval_s: int, processes: int = 1, process_id: int = 0):
        cmd = [sys.executable, "-m", "bytewax.run", "dataflows.main"]
        # Process 0 holds the recovery partitions; the others get an empty store directory and
        # send their snapshots to it over the cluster (see docs/runbook.md, "Rescale").
        store = self.store if process_id == 0 else self.workdir / f"recovery-{process_id}"
        store.mkdir(parents=True, exist_ok=True)
        cmd += ["-r", str(store), "-s", str(snapshot_interval_s), "-b", "0"]
        if processes > 1:
            cmd += ["-i", str(process_id), "-a", ";".join(_addresses(processes))]
        return cmd

    def start(self, snapshot_interval_s: int, processes: int = 1) -> list[subprocess.Popen]:
        logs = (self.workdir / "logs").open("ab")
        return [
            subprocess.Popen(
                self.command(snapshot_interval_s, processes, i),
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=logs,
                stderr=logs,
            )
            for i in range(processes)
        ]


_PORT_BASE = 2100 + os.getpid() % 500 * 4


def _addresses(processes: int) -> list[str]:
    return [f"127.0.0.1:{_PORT_BASE + i}" for i in range(processes)]


def init_store(run: Run) -> None:
    if run.store.exists():
        return
    run.store.mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "bytewax.recovery", str(run.store), "1"],
        cwd=ROOT,
        env={**os.environ, **run.env},
        check=True,
        capture_output=True,
    )


def produce_input(settings: Settings, topic: str, n: int, seed: int) -> list:
    kafka.ensure_topics(settings, [topic], partitions=RAW_PARTITIONS)
    items = list(
        generate_items(n, seed=seed, span_s=6 * 3600, late_fraction=0.02, bad_fraction=0.02)
    )
    producer = kafka.producer(settings, **{"linger.ms": 50})
    for i, item in enumerate(items):
        producer.produce(topic, item.line, partition=i % RAW_PARTITIONS)
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    return items


def create_outputs(run: Run) -> None:
    kafka.ensure_topics(run.settings, [f"{run.name}.{s}" for s in STREAMS], partitions=2)


def wait_all(processes: list[subprocess.Popen], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(max(deadline - time.monotonic(), 0.1)))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return codes


def run_clean(run: Run, timeout_s: float = 300, processes: int = 1) -> None:
    create_outputs(run)
    init_store(run)
    codes = wait_all(run.start(1, processes), timeout_s)
    if codes != [0] * processes:
        raise RuntimeError(f"clean run exited {codes}; see {run.workdir / 'logs'}")


def run_with_kills(
    run: Run,
    kills: int,
    *,
    rng: random.Random,
    min_s: float = 0.5,
    max_s: float = 4.0,
    processes_per_attempt=lambda attempt: 1,
    timeout_s: float = 300,
    log=print,
) -> int:
    """Start, SIGKILL at a random moment, restart, `kills` times; then run to the end.

    Returns how many kills landed while the run was still going."""
    create_outputs(run)
    init_store(run)
    landed = 0
    for attempt in range(kills):
        processes = run.start(1, processes_per_attempt(attempt))
        delay = rng.uniform(min_s, max_s)
        try:
            processes[0].wait(delay)
            done = True
        except subprocess.TimeoutExpired:
            done = False
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        codes = [process.wait() for process in processes]
        if not done:
            landed += 1
        elif any(code != 0 for code in codes):
            raise RuntimeError(f"attempt {attempt} failed with {codes}; see {run.workdir}/logs")
        log(
            f"attempt {attempt + 1}/{kills}: killed after {delay:.2f}s ({'mid-run' if not done else 'already finished'})"
        )
    processes = run.start(1, processes_per_attempt(kills))
    codes = wait_all(processes, timeout_s)
    if codes != [0] * len(processes):
        raise RuntimeError(f"final run exited {codes}; see {run.workdir / 'logs'}")
    return landed


def read_topic(settings: Settings, topic: str) -> list[tuple[int, int, dict]]:
    """(partition, offset, value) of every committed record, read_committed."""
    reader = kafka.consumer(
        settings, group_id=f"{topic}.check.{uuid.uuid4().hex[:6]}", **{"enable.partition.eof": True}
    )
    partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
    records = [
        (message.partition(), message.offset(), orjson.loads(message.value()))
        for message in kafka.read_to_end(reader, topic, dict.fromkeys(partitions, 0), timeout_s=1.0)
    ]
    reader.close()
    return records


def _strip(row: dict) -> bytes:
    volatile = ("processed_at", "failed_at")
    return orjson.dumps(
        {k: v for k, v in row.items() if k not in volatile}, option=orjson.OPT_SORT_KEYS
    )


def compare(clean: Run, crashed: Run) -> list[str]:
    """Differences between the clean run's committed output and the crashed run's (empty: equal)."""
    problems = []
    for stream in STREAMS:
        want = read_topic(clean.settings, f"{clean.name}.{stream}")
        got = read_topic(crashed.settings, f"{crashed.name}.{stream}")
        if stream in ("aggregates", "sessions"):
            problems += _compare_revisioned(stream, want, got)
        else:
            identity = (
                (lambda r: f"{r['stage']}|{r['source']}")
                if stream == "dlq"
                else (lambda r: r["source"])
            )
            ids = [identity(row) for _, _, row in got]
            duplicated = len(ids) - len(set(ids))
            want_rows = {identity(row): _strip(row) for _, _, row in want}
            got_rows = {identity(row): _strip(row) for _, _, row in got}
            missing = want_rows.keys() - got_rows.keys()
            extra = got_rows.keys() - want_rows.keys()
            changed = [k for k in want_rows.keys() & got_rows.keys() if want_rows[k] != got_rows[k]]
            for label, count in (
                ("duplicated", duplicated),
                ("missing", len(missing)),
                ("unexpected", len(extra)),
                ("different", len(changed)),
            ):
                if count:
                    problems.append(f"{stream}: {count} {label}")
    return problems


def _compare_revisioned(stream: str, want, got) -> list[str]:
    key = (
        (lambda r: (r["tenant"], r["event_type"], r["window"], r["window_start"]))
        if stream == "aggregates"
        else (lambda r: (r["session_id"], r["start"]))
    )
    problems = []
    seen: dict[tuple, int] = {}
    for _, _, row in sorted(got, key=lambda rec: (rec[0], rec[1])):
        k = key(row)
        if k in seen and row["revision"] <= seen[k]:
            problems.append(f"{stream}: {k} revision {row['revision']} after {seen[k]}")
        seen[k] = max(seen.get(k, -1), row["revision"])

    def final(records):
        best: dict[tuple, dict] = {}
        for _, _, row in records:
            k = key(row)
            if k not in best or row["revision"] > best[k]["revision"]:
                best[k] = row
        return {k: _strip({**v, "revision": 0}) for k, v in best.items()}

    if stream == "sessions":  # a late event can move a session's start: resolve superseded rows
        want_final = truth.final_sessions([row for _, _, row in want])
        got_final = truth.final_sessions([row for _, _, row in got])
    else:
        want_final, got_final = final(want), final(got)
    if want_final != got_final:
        missing = want_final.keys() - got_final.keys()
        extra = got_final.keys() - want_final.keys()
        changed = [k for k in want_final.keys() & got_final.keys() if want_final[k] != got_final[k]]
        problems.append(
            f"{stream}: final rows differ: {len(missing)} missing, {len(extra)} unexpected, "
            f"{len(changed)} different"
        )
        problems += [f"  want {want_final[k]!r}\n  got  {got_final[k]!r}" for k in changed[:3]]
        problems += [f"  missing {want_final[k]!r}" for k in list(missing)[:3]]
        problems += [f"  unexpected {got_final[k]!r}" for k in list(extra)[:3]]
    return problems[:20]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "chaos")
    args = parser.parse_args(argv)
    unique = f"chaos{uuid.uuid4().hex[:8]}"
    raw = f"{unique}.raw"
    settings = Settings()
    items = produce_input(settings, raw, args.events, args.seed)
    print(f"produced {len(items)} records into {raw}")
    clean = Run(f"{unique}.clean", raw, args.workdir / unique / "clean")
    crashed = Run(f"{unique}.crashed", raw, args.workdir / unique / "crashed")
    run_clean(clean)
    print("clean run done")
    landed = run_with_kills(crashed, args.kills, rng=random.Random(args.seed))
    problems = compare(clean, crashed)
    print(f"{landed} of {args.kills} SIGKILLs landed mid-run")
    for problem in problems:
        print("  " + problem)
    print("equal to the clean run" if not problems else "DIFFERENT from the clean run")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())


def run_with_outage(run: Run, server: str, *, outage_s: float, timeout_s: float = 600) -> None:
    """Run to the end while `server` (a stack/<server>.sh) is stopped for `outage_s` mid-run."""
    create_outputs(run)
    init_store(run)
    (process,) = run.start(1)
    enriched = run.workdir / "out" / "enriched" / "part-0.jsonl"
    deadline = time.monotonic() + 120
    while not (enriched.exists() and enriched.stat().st_size > 0):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"run ended or stalled before the outage; see {run.workdir}/logs")
        time.sleep(0.05)
    script = ROOT / "stack" / f"{server}.sh"
    env = {**os.environ, "STACK_KEEP_DATA": "1"}
    subprocess.run(["bash", str(script), "stop"], check=True, env=env, capture_output=True)
    try:
        time.sleep(outage_s)
        if process.poll() is not None:
            raise RuntimeError(f"run exited {process.returncode} during the {server} outage")
    finally:
        subprocess.run(["bash", str(script), "start"], check=True, env=env, capture_output=True)
    (code,) = wait_all([process], timeout_s)
    if code != 0:
        raise RuntimeError(f"run exited {code} after the {server} outage; see {run.workdir}/logs")


def postgres_state(settings: Settings) -> tuple[set[str], dict[tuple, tuple[int, int]]]:
    """PostgreSQL's event ids and window totals (count, unique users) of a run's schema."""
    from connectors import postgres

    iso = '\'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"\''
    schema = settings.postgres_schema
    with postgres.sink_connection(settings) as conn:
        events = {r[0] for r in conn.execute(f'SELECT event_id FROM "{schema}".events')}
        windows = {
            tuple(r[:4]): (r[4], r[5])
            for r in conn.execute(
                f'SELECT tenant, event_type, "window", to_char(window_start, {iso}), count, '
                f'unique_users FROM "{schema}".aggregates'
            )
        }
    return events, windows


def expected_postgres_state(clean: Run) -> tuple[set[str], dict[tuple, tuple[int, int]]]:
    """What PostgreSQL must hold, from the clean run's committed Kafka output."""
    enriched = read_topic(clean.settings, f"{clean.name}.enriched")
    events = {row["event_id"] for _, _, row in enriched if row["type"] in ("pageview", "click")}
    windows = truth.final_windows(
        [row for _, _, row in read_topic(clean.settings, f"{clean.name}.aggregates")]
    )
    return events, windows
