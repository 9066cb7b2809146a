"""Redis: the client and the real-time aggregates sink.

Each window row becomes a hash

    <REDIS_KEY_PREFIX><tenant>:<event_type>:<window>:<window_start>
        count, unique_users, revision, window_end

written with absolute values (never INCR), only when it is at least as far along as the stored one
in the monotone order `(count, unique_users, revision)` (lexicographic; counts only grow, so a
replay after a crash, whose revisions and intermediate totals may differ from the first
attempt's, can never lower a window), and given a TTL of `REDIS_TTL_S` (under 24 h) from the
write. Beside it, a sorted set per series

    <REDIS_KEY_PREFIX><tenant>:<event_type>:<window>
        member = window_start (ISO-8601), score = window_start in epoch milliseconds

answers "the last N windows" (`ZREVRANGE key 0 N-1`, then `HGETALL <key>:<member>`). The set is
trimmed to the TTL horizon measured from its newest window (event time, so a replay trims the same
way) and shares the TTL.

Both writes happen in one Lua script per row (atomic, no WATCH), all rows of a batch in one
pipeline. Writing the same batch again leaves the same state (same values, TTL renewed). A row the
server refuses (a non-numeric field, a key that holds another type) is rejected with Redis's error
message; connection failures and a loading or read-only server are transient.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import polars as pl
import redis

from connectors.base import Batch, Rejected, SinkWriter, TransientSinkError
from dataflows.config import Settings
from operators.model import as_dicts


def client(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client for `settings.redis_url` (bytes replies unless `decode_responses=True`).

    Keyword arguments go to redis.Redis.from_url; connecting and each reply time out after
    10 s unless overridden.
    """
    kwargs.setdefault("socket_connect_timeout", 10)
    kwargs.setdefault("socket_timeout", 10)
    return redis.Redis.from_url(settings.redis_url, **kwargs)


# KEYS: hash, sorted set. ARGV: count, unique_users, revision, window_end, ttl_s, score (epoch
# ms of window_start), member (window_start), horizon_ms.
# The row is written when it is at least as far along as the stored one in the monotone order
# (count, unique_users, revision), compared lexicographically; a stored hash without numeric
# fields is overwritten. Returns 1 when written, 0 when the stored row is further along.
UPSERT_WINDOW = """
local count = tonumber(ARGV[1])
local users = tonumber(ARGV[2])
local revision = tonumber(ARGV[3])
if not count or not users or not revision then
  return redis.error_reply('ERR count, unique_users and revision must be numbers, got ' ..
    ARGV[1] .. ', ' .. ARGV[2] .. ', ' .. ARGV[3])
end
local stored = redis.call('HMGET', KEYS[1], 'count', 'unique_users', 'revision')
local s_count, s_users, s_revision = tonumber(stored[1]), tonumber(stored[2]), tonumber(stored[3])
if s_count and s_users and s_revision then
  if count ~= s_count then
    if count < s_count then return 0 end
  elseif users ~= s_users then
    if users < s_users then return 0 end
  elseif revision < s_revision then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'count', ARGV[1], 'unique_users', ARGV[2], 'revision', ARGV[3],
  'window_end', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[7])
local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (tonumber(newest[2]) - tonumber(ARGV[8])))
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""

_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
)


def series_key(prefix: str, row: dict) -> str:
    return f"{prefix}{row['tenant']}:{row['event_type']}:{row['window']}"


def window_key(prefix: str, row: dict) -> str:
    return f"{series_key(prefix, row)}:{row['window_start']}"


def epoch_ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC).timestamp() * 1000)


class RedisAggregatesSink(SinkWriter):
    """Window rows → hashes + per-series sorted sets (see the module docstring)."""

    name = "redis"

    def __init__(self, settings: Settings):
        self._settings = settings
        self._prefix = settings.redis_key_prefix
        self._ttl = settings.redis_ttl_s
        self._client: redis.Redis | None = None
        self._script = None

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = client(self._settings)
            self._script = self._client.register_script(UPSERT_WINDOW)
        return self._client

    def setup(self) -> None:
        try:
            self._redis().ping()
        except _TRANSIENT as exc:
            raise TransientSinkError(f"ping: {exc}") from exc

    def write(self, batch: Batch) -> list[Rejected]:
        rows = as_dicts(batch) if isinstance(batch, pl.DataFrame) else batch
        rejected: list[Rejected] = []
        sent: list[dict] = []
        try:
            r = self._redis()
            pipe = r.pipeline(transaction=False)
            for row in rows:
                try:
                    score = epoch_ms(row["window_start"])
                    keys = [window_key(self._prefix, row), series_key(self._prefix, row)]
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    rejected.append(Rejected(row, f"cannot key the row: {type(exc).__name__}: {exc}"))
                    continue
                args = [
                    _arg(row.get("count")),
                    _arg(row.get("unique_users")),
                    _arg(row.get("revision")),
                    _arg(row.get("window_end")),
                    self._ttl,
                    score,
                    row["window_start"],
                    self._ttl * 1000,
                ]
                self._script(keys=keys, args=args, client=pipe)
                sent.append(row)
            results = pipe.execute(raise_on_error=False) if sent else []
        except _TRANSIENT as exc:
            self._drop_client()
            raise TransientSinkError(f"pipeline: {type(exc).__name__}: {exc}") from exc
        for row, result in zip(sent, results, strict=True):
            if isinstance(result, _TRANSIENT):
                self._drop_client()
                raise TransientSinkError(f"script: {result}", rejected=rejected)
            if isinstance(result, Exception):
                rejected.append(Rejected(row, str(result)))
        return rejected

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def close(self) -> None:
        self._drop_client()


def _arg(value: Any) -> str:
    return "" if value is None else str(value)
