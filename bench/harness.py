"""`python -m bench run`: throughput, latency and memory of the pipeline against two baselines.

Phases (each on fresh topics and consumer groups named `bench.<run id>.*`):

1. **Data**: `N` events from `bench.workload` (cached as `.cache/bench/events-<n>-s<seed>.jsonl`),
   produced once to `bench.<run>.raw` (`P` partitions, round robin) with a batching lz4 producer.
2. **Warm-up**: `--warmup` untimed catch-ups of `ours` on that topic. A broker started just before
   (as `make bench` does) spends its first minutes compiling its hot paths (the JVM's JIT), on
   the cores the job runs on; measured, the first catch-ups after a restart ran 20-30% slower.
3. **Catch-up**, on that topic, best of `--repeat` runs each:
   * `ours`: `python -m bytewax.run dataflows.main` (through `bench.launch`, which notes the
     first and last read) with PIPELINE_INPUT=kafka, KAFKA_STOP_AT_END=true, PIPELINE_SINKS=kafka;
   * `naive`: `bench/naive_flow.py` on Bytewax's built-ins;
   * `quix`: `bench/quix_app.py` on Quix Streams, in `.cache/bench/quix-venv`.
   events/s = records read ÷ (end − first record read): start-up (imports, topic metadata,
   producer `init_transactions`, consumer assignment) is excluded; the end is when the dataflow
   returned after its last flush and transaction commit (quix: its last processed message, so
   its idle-stop wait is excluded). CPU and RSS are sampled from /proc for the process tree
   every 0.5 s; RSS "start" is the first sample after the first read, "end" the last sample.
4. **Fan-out**: `ours` with every store as well (`PIPELINE_SINKS=kafka,postgres,opensearch,redis,
   s3`), each store in a namespace of the run (PostgreSQL schema, index/key/object prefixes),
   removed afterwards; the end is when the dataflow returned after the stores' last flush.
5. **Scaling**: `ours` as 2 processes (`-i 0|1 -a host:port;host:port`), same topic.
6. **Latency**: `ours` live as `--latency-processes` processes (no stop at end, epoch interval
   `-s --latency-epoch-s`) on a fresh topic. A warm-up of 40 minutes of past event time first
   gets every output stream's sink built; then the harness produces at a steady `--rate` for
   `--latency-s` seconds events generated for it whose event time starts when they are sent;
   end-to-sink latency = the Kafka timestamp of every 2nd `enriched` output record of the
   topic's first two partitions (one in 8 with 8 partitions) − its `ingested_at` (= the input
   record's Kafka timestamp); also the time it became visible to a read_committed consumer.
   The job is stopped with SIGINT afterwards.

The last line printed is
`BENCH events_per_s=<n> p95_ms=<n> rss_mb=<n> naive_ratio=<x> quix_ratio=<x>`.
"""

from __future__ import annotations

import argparse
import ctypes.util
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from bench import workload

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
VENV_PY = ROOT / ".venv" / "bin" / "python"
QUIX_VENV = CACHE / "quix-venv"
QUIX_REQUIREMENTS = ("quixstreams==3.28.1", "orjson", "geoip2", "ua-parser[regex]")
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
STREAMS = ("enriched", "aggregates", "sessions", "late", "dlq")


def log(message: str) -> None:
    print(message, flush=True)


# --- data -------------------------------------------------------------------------------------


def data_file(n: int, seed: int, span_s: float) -> Path:
    """The generated events, cached (the generator makes ~35-45K lines/s)."""
    path = CACHE / f"events-{n}-s{seed}-span{int(span_s)}.jsonl"
    if not path.exists():
        log(f"generating {n:,} events into {path.relative_to(ROOT)} (cached for later runs)")
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        workload.write(tmp, n, seed=seed, span_s=span_s)
        tmp.rename(path)
    return path


def load_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


# --- Kafka helpers ----------------------------------------------------------------------------


def create_topics(brokers: str, names: list[str], partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": brokers})
    futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    for future in futures.values():
        future.result(30)


def delete_topics(brokers: str, prefix: str) -> None:
    admin = AdminClient({"bootstrap.servers": brokers})
    names = [t for t in admin.list_topics(timeout=30).topics if t.startswith(prefix)]
    if names:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            try:
                future.result(30)
            except Exception as exc:  # noqa: BLE001 - best effort clean-up
                log(f"could not delete a bench topic: {exc}")


def fast_producer(brokers: str, **overrides) -> Producer:
    return Producer(
        {
            "bootstrap.servers": brokers,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "acks": 1,
            "enable.idempotence": False,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            **overrides,
        }
    )


def produce_all(brokers: str, topic: str, lines: list[bytes], partitions: int) -> float:
    """Every line to `topic`, round robin over its partitions; returns records/s."""
    producer = fast_producer(brokers)
    started = time.monotonic()
    produce = producer.produce
    for i, line in enumerate(lines):
        while True:
            try:
                produce(topic, line, partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.05)
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"{remaining} records not delivered to {topic}")
    return len(lines) / (time.monotonic() - started)


def high_watermarks(consumer: Consumer, topic: str) -> int:
    total = 0
    try:
        partitions = consumer.list_topics(topic, timeout=5).topics[topic].partitions
        for p in partitions:
            total += consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
    except Exception:  # noqa: BLE001 - progress display only
        return -1
    return total


# --- process sampling -------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return pids


def _usage(pids: list[int]) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) summed over `pids`."""
    cpu = rss = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / TICK
            rss += int(fields[21]) * PAGE / 2**20
        except (OSError, IndexError, ValueError):
            pass
    return cpu, rss


class Sampler(threading.Thread):
    """CPU and RSS of process trees every `interval` s: samples (wall time, cpu s, rss MiB)."""

    def __init__(self, pids: list[int], interval: float = 0.5):
        super().__init__(daemon=True)
        self.roots = pids
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = [p for root in self.roots for p in _tree(root)]
            cpu, rss = _usage(pids)
            if rss > 0:
                self.samples.append((time.time(), cpu, rss))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def window(self, start: float, end: float) -> dict:
        inside = [s for s in self.samples if start <= s[0] <= end] or self.samples[-1:]
        if not inside:
            return {"cpu_pct": None, "rss_start_mb": None, "rss_end_mb": None, "rss_peak_mb": None}
        first, last = inside[0], inside[-1]
        span = last[0] - first[0]
        return {
            "cpu_pct": round(100 * (last[1] - first[1]) / span) if span > 0 else None,
            "rss_start_mb": round(first[2]),
            "rss_end_mb": round(last[2]),
            "rss_peak_mb": round(max(s[2] for s in self.samples)),
        }


# --- running a job ----------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    commands: list[list[str]]  # one per process
    env: dict[str, str]
    stats: list[Path]
    progress_topic: str
    end_key: str = "end"  # which stats field ends the measured interval
    timeout_s: float = 900
    process_env: list[dict[str, str]] = field(default_factory=list)  # overrides per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Processes = list[tuple[subprocess.Popen, IO[bytes]]]


@functools.cache
def allocator_env() -> dict[str, str]:
    """Every job runs on jemalloc when it is installed (Debian's libjemalloc2), as the image
    runs ours: glibc's malloc took about a tenth of our job's CPU in a catch-up. (Looked up once:
    `find_library` runs `ldconfig`.)"""
    library = ctypes.util.find_library("jemalloc")
    return {"LD_PRELOAD": library} if library else {}


def start_processes(job: Job, logs: Path) -> Processes:
    """Start the job's processes, each writing its output to `<logs>/<job name>-<i>.log`."""
    for path in job.stats:
        path.unlink(missing_ok=True)
    env = {**os.environ, **allocator_env(), **job.env}
    procs = []
    for i, command in enumerate(job.commands):
        out = open(logs / f"{job.name}-{i}.log", "wb")  # noqa: SIM115 - closed by stop_processes
        env_i = {**env, **(job.process_env[i] if job.process_env else {})}
        procs.append(
            (
                subprocess.Popen(
                    command, cwd=ROOT, env=env_i, stdout=out, stderr=subprocess.STDOUT
                ),
                out,
            )
        )
    return procs


def stop_processes(procs: Processes, wait_s: float = 60) -> None:
    """SIGINT to those still running, then wait for each (killed after `wait_s`)."""
    for p, _ in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p, out in procs:
        try:
            p.wait(wait_s)
        except subprocess.TimeoutExpired:
            p.kill()
        out.close()


def run_job(job: Job, brokers: str, expected: int, logs: Path) -> dict:
    """Run the job's processes to completion; events/s from the stats the processes wrote."""
    procs = start_processes(job, logs)
    sampler = Sampler([p.pid for p, _ in procs])
    sampler.start()
    watcher = Consumer({"bootstrap.servers": brokers, "group.id": f"{job.name}.watch"})
    started = time.time()
    next_report = started + 2
    try:
        while any(p.poll() is None for p, _ in procs):
            time.sleep(0.2)
            now = time.time()
            if now > started + job.timeout_s:
                raise TimeoutError(f"{job.name}: still running after {job.timeout_s} s")
            if now >= next_report:
                next_report = now + 2
                last = sampler.samples[-1] if sampler.samples else (now, 0, 0)
                out_records = high_watermarks(watcher, job.progress_topic)
                log(
                    f"  [{job.name}] {now - started:5.1f}s  {job.progress_topic.rsplit('.', 1)[-1]}"
                    f" out={out_records:>10,} / {expected:,} in   rss={last[2]:.0f}MB"
                )
    finally:
        stop_processes(procs)
        sampler.stop()
        watcher.close()
    codes = [p.returncode for p, _ in procs]
    if any(codes):
        tail = (logs / f"{job.name}-0.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{job.name} exited with {codes}; log tail:\n{tail}")
    stats = [json.loads(path.read_text()) for path in job.stats]
    first = min(s["first_read"] for s in stats if s["first_read"])
    end = max(s[job.end_key] for s in stats if s[job.end_key])
    records = sum(s["records"] for s in stats)
    # Sink partitions built after the first read are start-up too (per process, in parallel).
    setup = max(s.get("sink_setup_s", 0.0) for s in stats)
    seconds = end - first - setup
    result = {
        "records": records,
        "seconds": round(seconds, 2),
        "startup_s": round(first - started + setup, 2),
        "sink_setup_s": round(setup, 2),
        "records_per_read": round(records / max(1, sum(s.get("batches", 0) for s in stats))),
        "events_per_s": round(records / seconds),
        **sampler.window(first, end),
    }
    if records != expected:
        result["warning"] = f"read {records} records, expected {expected}"
    return result


def best_of(runs: list[dict]) -> dict:
    best = max(runs, key=lambda r: r["events_per_s"])
    return {**best, "runs": [r["events_per_s"] for r in runs]}


# --- the three jobs ---------------------------------------------------------------------------


def ours_env(brokers: str, topic_in: str, prefix: str, *, stop_at_end: bool) -> dict[str, str]:
    env = {
        "PIPELINE_INPUT": "kafka",
        "PIPELINE_SINKS": "kafka",
        "KAFKA_BOOTSTRAP_SERVERS": brokers,
        "KAFKA_STOP_AT_END": "true" if stop_at_end else "false",
        "KAFKA_TOPIC_RAW": topic_in,
        "KAFKA_CONSUMER_GROUP": f"{prefix}.group",
        # the baselines' producers do not compress either, and the broker shares the cores
        "KAFKA_COMPRESSION": "none",
        "METRICS_PORT": str(free_port()),
        "LOG_LEVEL": "WARNING",
    }
    for stream in STREAMS:
        env[f"KAFKA_TOPIC_{stream.upper()}"] = f"{prefix}.{stream}"
    return env


def ours_job(
    name: str,
    brokers: str,
    topic_in: str,
    prefix: str,
    processes: int,
    *,
    extra: list[str] = (),
    profile: Path | None = None,
    settings: dict[str, str] | None = None,
    stop_at_end: bool = True,
) -> Job:
    env = {**ours_env(brokers, topic_in, prefix, stop_at_end=stop_at_end), **(settings or {})}
    stats = [CACHE / f"{name}-{i}.stats.json" for i in range(processes)]
    base = [str(VENV_PY), "-m", "bench.launch"]
    if profile is not None:  # py-spy's collapsed stacks ("raw"), 100 samples/s
        spy = ROOT / ".venv" / "bin" / "py-spy"
        base = [
            str(spy),
            "record",
            "-o",
            str(profile),
            "--format",
            "raw",
            "-r",
            "100",
            "--nonblocking",
            "--",
            *base,
        ]
    if processes == 1:
        commands = [[*base, str(stats[0]), "dataflows.main", *extra]]
    else:
        addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
        commands = [
            [*base, str(stats[i]), "dataflows.main", "-i", str(i), "-a", addresses, *extra]
            for i in range(processes)
        ]
    job = Job(name, commands, env, stats, f"{prefix}.enriched")
    # each process serves its own metrics port
    job.process_env = [{"METRICS_PORT": str(free_port())} for _ in range(processes)]
    return job


# The fan-out phase: every store besides Kafka, each in a namespace of its own run.
FANOUT_SINKS = "kafka,postgres,opensearch,redis,s3"


def fanout_settings(run_id: str) -> dict[str, str]:
    return {
        "PIPELINE_SINKS": FANOUT_SINKS,
        "POSTGRES_SCHEMA": f"bench_{run_id}",
        "OPENSEARCH_INDEX_PREFIX": f"bench-{run_id}-",
        "REDIS_KEY_PREFIX": f"bench:{run_id}:",
        "S3_PREFIX": f"bench/{run_id}/",
    }


def drop_fanout_data(run_id: str) -> None:
    """Remove what the fan-out phase wrote to the stores (best effort, logged)."""
    sys.path.insert(0, str(ROOT))
    from dataflows.config import Settings

    settings = Settings(**{k.lower(): v for k, v in fanout_settings(run_id).items()})
    steps = {
        "postgres": lambda: _drop_postgres_schema(settings),
        "opensearch": lambda: _delete_opensearch_indices(settings),
        "redis": lambda: _delete_redis_keys(settings),
        "s3": lambda: _delete_s3_objects(settings),
    }
    for store, step in steps.items():
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - leftovers are reported, not fatal
            log(f"could not remove the fan-out data in {store}: {exc}")


def _drop_postgres_schema(settings) -> None:
    import psycopg

    with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{settings.postgres_schema}" CASCADE')


def _delete_opensearch_indices(settings) -> None:
    from opensearchpy import OpenSearch

    client = OpenSearch(settings.opensearch_url)
    client.indices.delete(
        index=f"{settings.opensearch_index_prefix}*", params={"expand_wildcards": "all"}
    )
    for name in client.indices.get_index_template(name="*").get("index_templates", []):
        if name["name"].startswith(settings.opensearch_index_prefix):
            client.indices.delete_index_template(name=name["name"])


def _delete_redis_keys(settings) -> None:
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    keys = list(client.scan_iter(match=f"{settings.redis_key_prefix}*", count=10_000))
    for start in range(0, len(keys), 10_000):
        client.delete(*keys[start : start + 10_000])


def _delete_s3_objects(settings) -> None:
    from connectors.s3 import client

    s3 = client(settings)
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=settings.s3_bucket, Prefix=settings.s3_prefix
    )
    for page in pages:
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=settings.s3_bucket, Delete={"Objects": keys})


def naive_job(name: str, brokers: str, topic_in: str, prefix: str) -> Job:
    stats = CACHE / f"{name}.stats.json"
    env = {"BENCH_BROKERS": brokers, "BENCH_TOPIC_IN": topic_in, "BENCH_TOPIC_PREFIX": prefix}
    command = [str(VENV_PY), "-m", "bench.launch", str(stats), "bench.naive_flow"]
    return Job(name, [command], env, [stats], f"{prefix}.enriched")


def ensure_quix_venv() -> Path | None:
    """The Quix Streams virtualenv (created on first use); None if it cannot be built."""
    python = QUIX_VENV / "bin" / "python"
    marker = QUIX_VENV / ".installed"
    if marker.exists() and marker.read_text() == "\n".join(QUIX_REQUIREMENTS):
        return python
    log(f"creating {QUIX_VENV.relative_to(ROOT)} ({', '.join(QUIX_REQUIREMENTS)})")
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(QUIX_VENV)], check=True)
        uv = ROOT / ".venv" / "bin" / "uv"
        subprocess.run(
            [str(uv), "pip", "install", "-q", "--python", str(python), *QUIX_REQUIREMENTS],
            check=True,
        )
    except (subprocess.CalledProcessError, OSError) as exc:
        log(f"cannot build the Quix Streams virtualenv: {exc}")
        return None
    marker.write_text("\n".join(QUIX_REQUIREMENTS))
    return python


def quix_job(name: str, python: Path, brokers: str, topic_in: str, prefix: str) -> Job:
    stats = CACHE / f"{name}.stats.json"
    state = CACHE / "quix-state" / name
    shutil.rmtree(state, ignore_errors=True)
    env = {
        "BENCH_BROKERS": brokers,
        "BENCH_TOPIC_IN": topic_in,
        "BENCH_TOPIC_PREFIX": prefix,
        "BENCH_GROUP": f"{prefix}.group",
        "BENCH_STATE_DIR": str(state),
        "BENCH_QUIX_IDLE_S": "5",
    }
    command = [str(python), "-m", "bench.quix_app", str(stats)]
    return Job(name, [command], env, [stats], f"{prefix}.enriched", end_key="last_read")


# --- latency ----------------------------------------------------------------------------------


class OutputWatcher(threading.Thread):
    """Reads the first `WATCHED` partitions of an output topic read_committed; per sampled record:
    (Kafka timestamp ms, seen at ms, ingested_at ms). Records are spread over the partitions by
    key, so those carry their share of the stream; reading every partition took a tenth of the
    machine's CPU at 50K/s, from the job being measured."""

    WATCHED = 2
    SAMPLE_EVERY = 2  # of the records read: one in 8 of the stream with 8 partitions

    def __init__(self, brokers: str, topic: str, partitions: int):
        super().__init__(daemon=True)
        self.consumer = Consumer(
            {
                "bootstrap.servers": brokers,
                "group.id": f"{topic}.latency",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
            }
        )
        watched = min(self.WATCHED, partitions)
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(watched)])
        self._share = watched / partitions
        self.rows: list[tuple[int, int, int]] = []  # of every SAMPLE_EVERY-th record read
        self.read = 0  # records read
        self._halt = threading.Event()

    @property
    def count(self) -> int:
        """Records in the whole topic, estimated from those read."""
        return round(self.read / self._share)

    def run(self) -> None:
        from datetime import datetime

        parse = datetime.fromisoformat
        marker = b'"ingested_at":"'
        while not self._halt.is_set():
            messages = self.consumer.consume(5000, 0.2)
            seen = int(time.time() * 1000)
            self.read += len(messages)
            # A sample: parsing every record would take CPU from the job being measured.
            for m in messages[:: self.SAMPLE_EVERY]:
                if m.error() is not None:
                    continue
                value = m.value()
                i = value.find(marker) + len(marker)
                ingested = int(parse(value[i : i + 24].decode()).timestamp() * 1000)
                self.rows.append((m.timestamp()[1], seen, ingested))

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.consumer.close()


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    values = sorted(values)

    def at(q: float) -> int:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": values[-1]}


def live_lines(n: int, seed: int, seconds: float) -> list[bytes]:
    """`n` events whose event time spans `seconds` from when they are ready to send, as live input
    has it: the catch-up data spans hours of past event time, and events generated for an earlier
    start would arrive behind the watermark (late)."""
    log(f"  [latency] generating {n:,} live events")
    start = time.time() + n / 30_000  # generating takes about that long
    lines = list(workload.generate(n, seed=seed, start=int(start * 1000), span_s=seconds))
    time.sleep(max(0.0, start - time.time()))
    return lines


def latency_phase(
    brokers: str,
    run_id: str,
    seed: int,
    partitions: int,
    rate: int,
    seconds: float,
    processes: int,
    epoch_s: int,
    logs: Path,
) -> dict:
    # Warm-up: 40 minutes of past event time, so that windows and sessions close and late and bad
    # records come along: every output stream's sink is built (a transactional producer each, set
    # up when its first rows arrive) before the measured part.
    warm = list(
        workload.generate(
            2000, seed=seed + 1, start=int(time.time() * 1000) - 2_700_000, span_s=2400
        )
    )
    prefix = f"bench.{run_id}.lat"
    topic_in = f"{prefix}.raw"
    create_topics(brokers, [topic_in], partitions)
    create_topics(brokers, [f"{prefix}.{s}" for s in STREAMS], partitions)
    job = ours_job(
        "latency",
        brokers,
        topic_in,
        prefix,
        processes,
        extra=["-s", str(epoch_s)],
        stop_at_end=False,
    )
    procs = start_processes(job, logs)
    jobs = [p for p, _ in procs]
    job_logs = logs / "latency-*.log"
    sampler = Sampler([p.pid for p in jobs])
    sampler.start()
    watcher = OutputWatcher(brokers, f"{prefix}.enriched", partitions)
    watcher.start()
    producer = fast_producer(brokers, **{"linger.ms": 5, "batch.size": 262_144})
    try:
        warm_until = time.time() + 120
        for i, line in enumerate(warm):
            producer.produce(topic_in, line, partition=i % partitions)
        producer.flush(30)
        probe = Consumer({"bootstrap.servers": brokers, "group.id": f"{prefix}.probe"})
        while min(high_watermarks(probe, f"{prefix}.{s}") for s in STREAMS) <= 0:
            if any(p.poll() is not None for p in jobs) or time.time() > warm_until:
                raise RuntimeError(f"latency job did not start: see {job_logs}")
            time.sleep(0.5)
        probe.close()
        time.sleep(2)  # the warm-up's last outputs
        lines = live_lines(int(rate * seconds), seed, seconds)
        warm_out = watcher.count
        log(f"  [latency] job ready; producing {rate:,}/s for {seconds:.0f} s")
        started = time.time()
        measure_from = int((started + min(5.0, seconds / 4)) * 1000)  # skip the first seconds
        tick = 0.01
        per_tick = rate * tick
        sent = 0
        i = 0
        next_report = started + 5
        while True:
            now = time.time()
            if now - started >= seconds:
                break
            due = int((now - started) * rate)
            while sent < due:
                try:
                    producer.produce(topic_in, lines[i], partition=i % partitions)
                except BufferError:
                    producer.poll(0.01)
                    continue
                i += 1
                sent += 1
            producer.poll(0)
            if now >= next_report:
                next_report = now + 5
                rss = f" rss={sampler.samples[-1][2]:.0f}MB" if sampler.samples else ""
                log(
                    f"  [latency] {now - started:4.0f}s sent={sent:,} "
                    f"out={watcher.count - warm_out:,}{rss}"
                )
            time.sleep(max(0.0, tick - (time.time() - now)) if per_tick else tick)
        producer.flush(30)
        achieved = sent / (time.time() - started)
        drain_until = time.time() + 30
        while watcher.count - warm_out < sent * 0.98 and time.time() < drain_until:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop_processes(procs)
        watcher.stop()
        sampler.stop()
    rows = [r for r in watcher.rows if r[2] >= measure_from]
    return {
        "processes": processes,
        "rate_target": rate,
        "rate_achieved": round(achieved),
        "seconds": seconds,
        "epoch_interval_s": epoch_s,
        "records_sent": sent,
        "records_out": watcher.count - warm_out,  # estimated from the partitions watched
        "records_measured": len(rows),
        "sink_ms": percentiles([ts - ing for ts, _, ing in rows]),
        "visible_ms": percentiles([seen - ing for _, seen, ing in rows]),
        **sampler.window(started, started + seconds),
    }


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="throughput (ours, naive, quix), scaling, latency")
    run.add_argument(
        "--brokers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    run.add_argument("--events", type=int, default=500_000)
    run.add_argument("--partitions", type=int, default=8)
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--span-s", type=float, default=4 * 3600)
    run.add_argument("--repeat", type=int, default=1, help="runs per job; the best counts")
    run.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed catch-ups of ours before the measured phases (a fresh broker's JIT)",
    )
    run.add_argument("--rate", type=int, default=50_000, help="latency phase: events/s")
    run.add_argument("--latency-s", type=float, default=20)
    run.add_argument(
        "--latency-processes",
        type=int,
        default=2,
        help="latency phase: processes of the job (2: one per core of the bench machine)",
    )
    run.add_argument(
        "--latency-epoch-s",
        type=int,
        default=1,
        help="latency phase: epoch (snapshot and transaction) interval of the job, whole seconds",
    )
    run.add_argument(
        "--skip",
        default="",
        help="comma list of phases to skip: naive,quix,fanout,scaling,latency",
    )
    run.add_argument(
        "--profile",
        action="store_true",
        help="run ours under py-spy; collapsed stacks in the run's log directory",
    )
    run.add_argument("--keep-topics", action="store_true", help="do not delete bench topics")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    run_id = time.strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:4]
    logs = CACHE / "logs" / run_id
    logs.mkdir(parents=True, exist_ok=True)
    brokers = args.brokers
    log(
        f"bench run {run_id}: {args.events:,} events, {args.partitions} partitions; logs in "
        f"{logs.relative_to(ROOT)}"
    )
    lines = load_lines(data_file(args.events, args.seed, args.span_s))
    topic_in = f"bench.{run_id}.raw"
    create_topics(brokers, [topic_in], args.partitions)
    rate = produce_all(brokers, topic_in, lines, args.partitions)
    log(f"produced {len(lines):,} records to {topic_in} at {rate:,.0f}/s")
    results: dict = {"run_id": run_id, "events": len(lines), "partitions": args.partitions}
    allocator = allocator_env().get("LD_PRELOAD")
    results["allocator"] = allocator or "glibc malloc"
    if allocator is None:
        log("jemalloc is not installed (apt-get install libjemalloc2): jobs use glibc malloc")

    def measure(name: str, make_job) -> dict:
        try:
            return measure_runs(name, make_job)
        except Exception as exc:  # noqa: BLE001 - a failed job is reported, the run goes on
            log(f"{name} failed: {exc}")
            return {"error": str(exc)[:2000], "events_per_s": None}

    def run_fresh(name: str, make_job) -> dict:
        """One run of `make_job(name, prefix)` on output topics of its own."""
        prefix = f"bench.{run_id}.{name}"
        create_topics(brokers, [f"{prefix}.{s}" for s in STREAMS], args.partitions)
        return run_job(make_job(name, prefix), brokers, len(lines), logs)

    def measure_runs(name: str, make_job) -> dict:
        runs = []
        for r in range(args.repeat):
            log(f"{name} run {r + 1}/{args.repeat}")
            result = run_fresh(f"{name}{r}", make_job)
            log(f"  -> {json.dumps(result)}")
            runs.append(result)
        return best_of(runs)

    def warm_up(r: int) -> int | None:
        # A broker (a JVM) compiles its produce, fetch and transaction paths in its first
        # minutes, on the cores the job runs on: without this the first phase measured that.
        log(f"warm-up run {r + 1}/{args.warmup} (not counted)")
        try:
            result = run_fresh(f"warmup{r}", lambda n, p: ours_job(n, brokers, topic_in, p, 1))
        except Exception as exc:  # noqa: BLE001 - the measured runs report their own failure
            log(f"warm-up failed: {exc}")
            return None
        log(f"  -> {result['events_per_s']:,} events/s")
        return result["events_per_s"]

    def one_process(settings: dict[str, str] | None = None):
        """`ours` as one process (under py-spy with --profile), with extra settings."""
        return lambda n, p: ours_job(
            n,
            brokers,
            topic_in,
            p,
            1,
            profile=logs / f"{n}.pyspy.txt" if args.profile else None,
            settings=settings,
        )

    try:
        results["warmup"] = [warm_up(r) for r in range(args.warmup)]
        results["ours"] = measure("ours", one_process())
        if "naive" not in skip:
            results["naive"] = measure("naive", lambda n, p: naive_job(n, brokers, topic_in, p))
        if "quix" not in skip:
            python = ensure_quix_venv()
            if python is None:
                results["quix"] = {"error": "Quix Streams virtualenv could not be built"}
            else:
                results["quix"] = measure(
                    "quix", lambda n, p: quix_job(n, python, brokers, topic_in, p)
                )
        if "fanout" not in skip:
            try:
                results["fanout"] = measure("fanout", one_process(fanout_settings(run_id)))
            finally:
                drop_fanout_data(run_id)
        if "scaling" not in skip:
            results["ours_2p"] = measure(
                "ours2p", lambda n, p: ours_job(n, brokers, topic_in, p, 2)
            )
            if results["ours_2p"]["events_per_s"] and results["ours"]["events_per_s"]:
                results["scaling"] = round(
                    results["ours_2p"]["events_per_s"] / results["ours"]["events_per_s"], 2
                )
        if "latency" not in skip:
            log("latency phase")
            try:
                results["latency"] = latency_phase(
                    brokers,
                    run_id,
                    args.seed,
                    args.partitions,
                    args.rate,
                    args.latency_s,
                    args.latency_processes,
                    args.latency_epoch_s,
                    logs,
                )
            except Exception as exc:  # noqa: BLE001 - reported; the summary is still printed
                log(f"latency phase failed: {exc}")
                results["latency"] = {"error": str(exc)[:2000]}
            log(f"  -> {json.dumps(results['latency'])}")
    finally:
        if not args.keep_topics:
            delete_topics(brokers, f"bench.{run_id}.")
    (logs / "results.json").write_text(json.dumps(results, indent=2))
    log(f"results: {logs.relative_to(ROOT) / 'results.json'}")
    log(json.dumps(results, indent=2))

    ours = results["ours"].get("events_per_s")

    def ratio(name: str) -> str:
        other = results.get(name, {}).get("events_per_s")
        return f"{ours / other:.2f}" if other and ours else "nan"

    p95 = results.get("latency", {}).get("sink_ms", {}).get("p95")
    log(
        f"BENCH events_per_s={ours if ours else 'nan'} p95_ms={p95 if p95 is not None else 'nan'} "
        f"rss_mb={results['ours'].get('rss_end_mb')} naive_ratio={ratio('naive')} "
        f"quix_ratio={ratio('quix')}"
    )
    return 0
