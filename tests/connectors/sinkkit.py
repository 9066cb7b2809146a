"""Helpers for the store sink tests: event rows, driving a StoreSink like Bytewax does, and
stopping a server of the local stack for a few seconds with its own script."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from connectors import opensearch, postgres
from connectors.base import SinkPolicy, SinkWriter, StoreSink
from dataflows.config import Settings
from dataflows.metrics import NoopMetrics
from operators.model import ENRICHED_SCHEMA

ROOT = Path(__file__).resolve().parents[2]
BASE_TIME = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
PORTS = {"postgres": 5432, "redis": 6379, "opensearch": 9200, "s3": 5000, "kafka": 9092}

# Quick retries, short backpressure steps: an outage of a few seconds costs a few seconds.
TEST_POLICY = SinkPolicy(max_batch_rows=500, linger_s=60, retries=3, backoff_s=0.05, backoff_max_s=1.0)


def event(i: int, *, type: str = "pageview", tenant: str = "acme", at: datetime | None = None, **extra) -> dict:
    """One enriched event row with every column of ENRICHED_SCHEMA set (or None)."""
    at = at or BASE_TIME + timedelta(seconds=i)
    row = {
        "event_id": f"ev-{i:06d}",
        "schema_urn": "urn:nc:events:web",
        "version": 1,
        "type": type,
        "tenant": tenant,
        "timestamp": at,
        "user_id": f"u-{i % 7}",
        "session_id": f"s-{i % 5}",
        "ip": "81.2.69.142",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0",
        "url": f"https://{tenant}.example.com/p/{i}",
        "properties": f'{{"n":{i},"tag":"t{i % 3}"}}',
        "error_message": "TypeError: x is undefined" if type in ("error", "exception") else None,
        "error_stack": "at f (app.js:1:2)\nat g (app.js:3:4)" if type in ("error", "exception") else None,
        "correlation_id": f"corr-{i}",
        "ingested_at": BASE_TIME + timedelta(seconds=i, milliseconds=250),
        "source": f"events.raw/2/{1000 + i}",
        "geo_country": "GB",
        "geo_region": "ENG",
        "geo_city": "London",
        "geo_lat": 51.5142,
        "geo_lon": -0.0931,
        "ua_browser": "Firefox",
        "ua_browser_major": "120",
        "ua_os": "Linux",
        "ua_os_major": None,
        "ua_device_family": "Other",
        "ua_device_type": "desktop",
        "processed_at": BASE_TIME + timedelta(seconds=i, milliseconds=300),
    }
    row.update(extra)
    return row


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=ENRICHED_SCHEMA)


def events(start: int, n: int, **kwargs) -> pl.DataFrame:
    return frame([event(i, **kwargs) for i in range(start, start + n)])


def aggregate(tenant: str, event_type: str, window: str, start: str, end: str, count: int, users: int, revision: int) -> dict:
    return {
        "tenant": tenant,
        "event_type": event_type,
        "window": window,
        "window_start": start,
        "window_end": end,
        "count": count,
        "unique_users": users,
        "revision": revision,
    }


class Driver:
    """Drives a StoreSink the way Bytewax does: build a partition, `write_batch`, `snapshot` at
    each epoch, `close` at the end. DLQ records are collected in `dead`."""

    def __init__(self, new_writer: Callable[[], SinkWriter], policy: SinkPolicy = TEST_POLICY, stream: str = "test"):
        self.dead: list[dict] = []
        self.sink = StoreSink(
            new_writer,
            stream=stream,
            parts=1,
            policy=policy,
            dead_letters=self.dead.extend,
            metrics=NoopMetrics(),
        )
        self.part = self.sink.build_part("test_sink", "part-000", None)

    def epoch(self, *batches) -> None:
        """Hand over batches, then the epoch's checkpoint (which flushes)."""
        self.part.write_batch(list(batches))
        assert self.part.snapshot() is None

    def close(self) -> None:
        self.part.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def stack(server: str, action: str) -> None:
    """`bash stack/<server>.sh <action>`, keeping server data across the restart."""
    env = {**os.environ, "STACK_KEEP_DATA": "1"}
    result = subprocess.run(
        ["bash", str(ROOT / "stack" / f"{server}.sh"), action],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"stack/{server}.sh {action} failed:\n{result.stdout}\n{result.stderr}")


def identity(server: str) -> str | None:
    """What changes when a server's data directory is created anew (None: not tracked)."""
    settings = Settings()
    deadline = time.monotonic() + 120
    while True:
        try:
            if server == "postgres":
                with postgres.connect(settings, connect_timeout=5) as conn:
                    row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
                    return str(row[0])
            if server == "opensearch":
                return opensearch.client(settings, timeout=5).info()["cluster_uuid"]
            return None
        except Exception:  # noqa: BLE001 - still starting; give it time
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextmanager
def outage(server: str, down_s: float = 3.0, before_stop: Callable[[], None] | None = None) -> Iterator[threading.Event]:
    """Stop `server` in a background thread, keep it down `down_s` seconds, start it again.

    Yields once the server is down (its port closed); the body then writes while it is down.
    Leaving the block waits for the restart; the server is started again in any case. The test is
    skipped when the server came back with a new data directory (see the end).
    """
    down = threading.Event()
    errors: list[BaseException] = []
    before = identity(server)

    def cycle() -> None:
        try:
            if before_stop is not None:
                before_stop()
            stack(server, "stop")
            down.set()
            time.sleep(down_s)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            down.set()
        finally:
            try:
                stack(server, "start")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    thread = threading.Thread(target=cycle, name=f"outage-{server}", daemon=True)
    thread.start()
    try:
        assert down.wait(120), f"{server} did not stop"
        deadline = time.monotonic() + 60
        while port_open(PORTS[server]) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield down
    finally:
        thread.join(600)
        if thread.is_alive() or not port_open(PORTS[server]):
            stack(server, "start")
        # Another session's `stack.sh up` may have started the server while it was down, from
        # an empty data directory (the stack's default): then there is nothing to check.
        if before is not None and identity(server) != before:
            pytest.skip(
                f"{server} was re-initialised with empty data by a concurrent stack start "
                "during the outage; no-loss cannot be checked"
            )
    if errors:
        raise errors[0]
