"""Deterministic workload: realistic `urn:nc:events:web` v1 events, some late, some bad.

The bundled sample `dataflows/data/sample.jsonl` is produced by

    .venv/bin/python -m bench.workload --sample

which is short for

    .venv/bin/python -m bench.workload --n 6000 --seed 20240501 --start 2024-05-01T08:00:00Z \\
        --span-s 7200 --late-fraction 0.01 --bad-fraction 0.02 --out dataflows/data/sample.jsonl

(`tests/bench/test_workload.py` checks that the committed file is exactly that output). The word
lists in `bench/data/` come from the test corpora under `tests/data/` and are rebuilt with
`python -m bench.workload --refresh-data`.

The model, all of it driven by `random.Random` instances seeded from `seed` (same arguments, same
bytes, on any machine):

* 5 tenants with skewed traffic; per tenant, users drawn from a Zipf distribution (a few heavy users,
  a long tail). A user keeps an IP, a User-Agent and a timestamp style (ISO-8601 with `Z`, ISO-8601 with
  an offset such as `+02:00`, or epoch milliseconds) across sessions; a few are anonymous (no
  `user_id`) and a few have private or unresolvable IPs.
* Sessions arrive as a Poisson process sized so that `n` events span about `span_s` seconds. A
  session is a handful of events a few seconds to minutes apart, starting with a page view; about 10%
  of sessions have one pause longer than 30 minutes, so sessionization splits them.
* Event types: mostly `pageview`, then `click`, some `error`/`exception` (with `error.message` and
  `error.stack`), a few `signup` and `purchase`. `exception` events come from the backend and carry
  no `ip`/`user_agent`; about a quarter of all events carry their own `correlation_id`.
* Order: each event reaches the stream after a small delay (up to `max_disorder_s`, 20 s by default),
  so event time is "mostly increasing"; a `late_fraction` of events is delayed by 2 to 60 minutes.
  (Late events still buffered when `n` records have been written are not emitted.)
* Bad records: a `bad_fraction` of the lines replaces an event by a broken one; the kinds take turns
  so every kind shows up once within the first eight bad records: malformed JSON, not an object,
  missing/unknown schema urn, unsupported version, missing field, bad timestamp, bad type. With
  `include_too_large`, the 9th bad record and every 1000th after it is a record over 1 MiB.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import NamedTuple

import orjson

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(__file__).resolve().parent / "data"
IPS_FILE = DATA_DIR / "ips.txt"
USER_AGENTS_FILE = DATA_DIR / "user_agents.txt"
SAMPLE_PATH = ROOT / "dataflows" / "data" / "sample.jsonl"

SCHEMA_URN = "urn:nc:events:web"
VERSION = 1
ONE_MIB = 1 << 20

# The bundled sample. Changing these (or the generator) means regenerating the file.
SAMPLE_ARGS: dict = {
    "n": 6000,
    "seed": 20240501,
    "start": "2024-05-01T08:00:00Z",
    "span_s": 7200.0,
    "late_fraction": 0.01,
    "bad_fraction": 0.02,
    "include_too_large": False,
}

# Kinds of bad records; the names are the DLQ reasons the validator gives them.
BAD_KINDS = (
    "malformed_json",
    "not_an_object",
    "missing_schema_urn",
    "unknown_schema",
    "unsupported_version",
    "missing_field",
    "bad_timestamp",
    "bad_type",
)
TOO_LARGE = "too_large"
TOO_LARGE_EVERY = 1000  # with include_too_large: bad record no. 8, 1008, 2008, ... is too large

_UNRESOLVABLE_MARK = "# [unresolvable]"


class Item(NamedTuple):
    """One generated line and what it is."""

    line: bytes
    bad: str | None  # the kind of bad record (= expected DLQ reason), None for a valid event
    late: bool  # delayed by minutes (only meaningful for valid events)
    event_ms: int | None  # event time of a valid event, epoch milliseconds


# --- word lists -----------------------------------------------------------------------------------


def _read_list(path: Path) -> list[str]:
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln and ln[0] != "#"]


@lru_cache(maxsize=1)
def load_ips() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(addresses the bundled GeoIP test database resolves, addresses it does not)."""
    text = IPS_FILE.read_text(encoding="utf-8")
    resolvable, _, unresolvable = text.partition(_UNRESOLVABLE_MARK)
    unresolvable = unresolvable.partition("\n")[2]  # drop the rest of the marker line

    def lines(block: str) -> tuple[str, ...]:
        return tuple(ln for ln in block.splitlines() if ln and not ln.startswith("#"))

    return lines(resolvable), lines(unresolvable)


@lru_cache(maxsize=1)
def load_user_agents() -> tuple[str, ...]:
    """User-Agent strings, most common kinds first."""
    return tuple(_read_list(USER_AGENTS_FILE))


# --- content --------------------------------------------------------------------------------------

_TENANTS = (  # name, share of sessions and of users
    ("acme", 0.42),
    ("globex", 0.25),
    ("initech", 0.16),
    ("umbrella", 0.11),
    ("hooli", 0.06),
)
_ZIPF_S = 1.1
_MEAN_EVENTS_PER_SESSION = 7.0
_SPLIT_SESSION_P = 0.10
_ANONYMOUS_P = 0.04
_UNRESOLVABLE_IP_P = 0.04
_CORRELATION_P = 0.25
_IPV6_P = 0.30
_TYPES = ("pageview", "click", "error", "exception", "signup", "purchase")
_TYPE_WEIGHTS = (0.60, 0.27, 0.045, 0.025, 0.02, 0.04)
_TYPE_CUMULATIVE = tuple(itertools.accumulate(_TYPE_WEIGHTS))
_TS_STYLES = ("iso_z", "iso_offset", "epoch_ms")
_TS_STYLE_WEIGHTS = (0.6, 0.2, 0.2)
_OFFSETS = tuple(
    timezone(timedelta(minutes=m)) for m in (120, 60, -300, -420, 330, 540, 600, -180)
)
_PAGES = (
    "/", "/pricing", "/products", "/products/{n}", "/products/{n}", "/blog/{n}-release-notes",
    "/search?q=shoes+{n}", "/cart", "/checkout", "/account", "/docs/getting-started",
)  # fmt: skip
_REFERRERS = (
    None, None, None, "https://www.google.com/", "https://www.bing.com/", "https://t.co/x1",
    "https://news.ycombinator.com/", "https://duckduckgo.com/", "https://mail.example.org/",
)  # fmt: skip
_ELEMENTS = (
    "button#add-to-cart", "a.nav-link", "button.buy-now", "input#search", "a.product-card",
    "button#signup", "a.footer-link", "button.close",
)  # fmt: skip
_JS_ERRORS = (
    ("TypeError: Cannot read properties of undefined (reading 'price')", "renderCart"),
    ("ReferenceError: analytics is not defined", "trackClick"),
    ("TypeError: x.map is not a function", "ProductList"),
    ("Error: Network request failed", "fetchJson"),
    ("SyntaxError: Unexpected token '<' in JSON at position 0", "loadConfig"),
)
_PY_ERRORS = (
    ("ValueError: invalid literal for int() with base 10: 'abc'", "views.py", "checkout"),
    ("KeyError: 'currency'", "payments.py", "charge"),
    ("TimeoutError: upstream did not answer within 5s", "client.py", "call"),
    ("psycopg.OperationalError: connection is closed", "db.py", "fetch_order"),
)
_CURRENCIES = ("EUR", "USD", "GBP")
_PLANS = ("free", "free", "pro", "team")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _parse_start(start: datetime | str | int) -> int:
    if isinstance(start, int):
        return start
    if isinstance(start, str):
        start = datetime.fromisoformat(start)
    if start.tzinfo is None:
        raise ValueError("start needs a timezone")
    return (start - _EPOCH) // timedelta(milliseconds=1)


def _uuid4(rng: Random) -> str:
    """A random (version 4) UUID drawn from `rng`: the same text as `uuid.UUID(int=x, version=4)`."""
    x = f"{rng.getrandbits(128):032x}"
    return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-{_UUID_VARIANT[x[16]]}{x[17:20]}-{x[20:]}"


_UUID_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def format_timestamp(ms: int, style: str, offset: timezone = _OFFSETS[0]) -> str | int:
    """An event time in one of the contract's timestamp styles."""
    if style == "epoch_ms":
        return ms
    moment = _EPOCH + timedelta(milliseconds=ms)
    if style == "iso_z":
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return moment.astimezone(offset).isoformat(timespec="milliseconds")


@dataclass(slots=True)
class _User:
    tenant: str
    user_id: str | None
    ip: str
    user_agent: str
    ts_style: str
    offset: timezone


@dataclass(slots=True)
class _Session:
    user: _User
    session_id: str
    remaining: int
    split_pending: bool
    page: str | None = None
    count: int = 0


class _Zipf:
    """Ranks 1..n with P(k) ∝ 1/k^s."""

    def __init__(self, n: int, s: float):
        self.cumulative = list(itertools.accumulate(1.0 / k**s for k in range(1, n + 1)))

    def draw(self, rng: Random) -> int:
        total = self.cumulative[-1]
        return bisect.bisect_left(self.cumulative, rng.random() * total) + 1


class _Workload:
    def __init__(
        self,
        n: int,
        *,
        seed: int,
        start: datetime | str | int,
        span_s: float,
        late_fraction: float,
        bad_fraction: float,
        include_too_large: bool,
        max_disorder_s: float,
        users: int | None,
    ):
        if n < 0 or span_s <= 0:
            raise ValueError("n must be >= 0 and span_s > 0")
        if not 0 <= late_fraction <= 1 or not 0 <= bad_fraction <= 1:
            raise ValueError("late_fraction and bad_fraction must be within 0..1")
        self.n = n
        self.seed = seed
        self.start_ms = _parse_start(start)
        self.late_fraction = late_fraction
        self.bad_fraction = bad_fraction
        self.include_too_large = include_too_large
        self.max_disorder_ms = max(0.0, max_disorder_s * 1000)
        # independent streams, so e.g. a different bad_fraction leaves the valid events alone
        self.rng_sessions = Random(f"{seed}:sessions")
        self.rng_events = Random(f"{seed}:events")
        self.rng_delay = Random(f"{seed}:delay")
        self.rng_bad = Random(f"{seed}:bad")
        self.resolvable, self.unresolvable = load_ips()
        self.ipv4 = [a for a in self.resolvable if ":" not in a]
        self.ipv6 = [a for a in self.resolvable if ":" in a] or self.ipv4
        self.user_agents = load_user_agents()
        self.ua_zipf = _Zipf(len(self.user_agents), 0.9)
        total_users = users if users is not None else max(50, n // 15)
        self.tenants = [name for name, _ in _TENANTS]
        self.tenant_weights = list(itertools.accumulate(share for _, share in _TENANTS))
        self.zipf = {
            name: _Zipf(max(5, round(total_users * share)), _ZIPF_S) for name, share in _TENANTS
        }
        self.user_cache: dict[tuple[str, int], _User] = {}
        # session arrivals per millisecond
        self.arrival_rate = n / (span_s * 1000.0) / _MEAN_EVENTS_PER_SESSION if n else 1.0
        self.bad_count = 0  # bad records so far
        self.turn = 0  # bad records of the BAD_KINDS rotation so far

    # --- who --------------------------------------------------------------------------------------

    def user(self, tenant: str, rank: int) -> _User:
        key = (tenant, rank)
        found = self.user_cache.get(key)
        if found is None:
            rng = Random(f"{self.seed}:user:{tenant}:{rank}")
            anonymous = rng.random() < _ANONYMOUS_P
            if rng.random() < _UNRESOLVABLE_IP_P:
                ip = rng.choice(self.unresolvable)
            else:
                ip = rng.choice(self.ipv6 if rng.random() < _IPV6_P else self.ipv4)
            found = _User(
                tenant=tenant,
                user_id=None if anonymous else f"u-{rng.getrandbits(32):08x}",
                ip=ip,
                user_agent=self.user_agents[self.ua_zipf.draw(rng) - 1],
                ts_style=rng.choices(_TS_STYLES, _TS_STYLE_WEIGHTS)[0],
                offset=rng.choice(_OFFSETS),
            )
            self.user_cache[key] = found
        return found

    def new_session(self) -> _Session:
        rng = self.rng_sessions
        tenant = self.tenants[
            bisect.bisect_left(self.tenant_weights, rng.random() * self.tenant_weights[-1])
        ]
        user = self.user(tenant, self.zipf[tenant].draw(rng))
        length = 1 + int(rng.expovariate(1.0 / (_MEAN_EVENTS_PER_SESSION - 1)))
        return _Session(
            user=user,
            session_id=f"s-{rng.getrandbits(48):012x}",
            remaining=length,
            split_pending=length > 2 and rng.random() < _SPLIT_SESSION_P,
        )

    def next_gap_ms(self, session: _Session) -> float:
        rng = self.rng_sessions
        if session.split_pending and rng.random() < 0.35:
            session.split_pending = False
            return rng.uniform(31 * 60_000, 55 * 60_000)  # longer than the 30 min session gap
        return min(1000 + rng.expovariate(1 / 40_000), 20 * 60_000)

    # --- what -------------------------------------------------------------------------------------

    def event(self, session: _Session, ms: int) -> dict:
        rng = self.rng_events
        user = session.user
        domain = f"https://{user.tenant}.example.com"
        if session.count == 0:
            kind = "pageview"
        else:
            kind = _TYPES[bisect.bisect(_TYPE_CUMULATIVE, rng.random() * _TYPE_CUMULATIVE[-1])]
        session.count += 1
        server_side = kind == "exception"  # reported by the backend: no client address or agent
        record: dict = {
            "schema_urn": SCHEMA_URN,
            "version": VERSION,
            "event_id": _uuid4(rng),
            "type": kind,
            "timestamp": format_timestamp(ms, user.ts_style, user.offset),
            "tenant": user.tenant,
        }
        if user.user_id is not None:
            record["user_id"] = user.user_id
        record["session_id"] = session.session_id
        if not server_side:
            record["ip"] = user.ip
            record["user_agent"] = user.user_agent
        if kind == "pageview" or session.page is None:
            path = rng.choice(_PAGES)
            number = rng.randint(1, 250)
            previous = session.page
            session.page = domain + path.format(n=number)
            record["url"] = session.page
            if kind == "pageview":
                props: dict = {}
                referrer = rng.choice(_REFERRERS) if previous is None else None  # external only
                if referrer:
                    props["referrer"] = referrer
                if rng.random() < 0.4:  # page timings are sampled
                    props["load_ms"] = int(80 + rng.expovariate(1 / 400))
                if props:
                    record["properties"] = props
        else:
            record["url"] = session.page
        if kind == "click":
            record["properties"] = {
                "element": rng.choice(_ELEMENTS),
                "x": rng.randint(0, 1920),
                "y": rng.randint(0, 1080),
            }
        elif kind == "error":
            message, function = rng.choice(_JS_ERRORS)
            bundle = f"{domain}/static/app.{rng.getrandbits(16):04x}.js"
            record["error"] = {
                "message": message,
                "stack": f"{message}\n    at {function} ({bundle}:1:{rng.randint(100, 99999)})\n"
                f"    at HTMLDocument.<anonymous> ({bundle}:1:{rng.randint(100, 99999)})",
            }
        elif kind == "exception":
            message, module, function = rng.choice(_PY_ERRORS)
            record["error"] = {
                "message": message,
                "stack": "Traceback (most recent call last):\n"
                f'  File "/srv/app/{module}", line {rng.randint(20, 400)}, in {function}\n'
                f"{message}",
            }
            record["properties"] = {"service": "checkout-api"}
        elif kind == "signup":
            record["properties"] = {
                "plan": rng.choice(_PLANS),
                "method": rng.choice(("email", "google", "github")),
            }
        elif kind == "purchase":
            record["properties"] = {
                "order_id": f"ord-{rng.getrandbits(32):08x}",
                "amount": round(rng.uniform(5, 400), 2),
                "currency": rng.choice(_CURRENCIES),
                "items": rng.randint(1, 6),
            }
        if rng.random() < _CORRELATION_P:
            record["correlation_id"] = _uuid4(rng)
        return record

    # --- how it breaks ------------------------------------------------------------------------------

    def next_bad_kind(self) -> str:
        index = self.bad_count
        self.bad_count += 1
        if self.include_too_large and index % TOO_LARGE_EVERY == len(BAD_KINDS):
            return TOO_LARGE
        kind = BAD_KINDS[self.turn % len(BAD_KINDS)]
        self.turn += 1
        return kind

    def spoil(self, record: dict, ms: int, kind: str) -> bytes:
        """A line that the validator rejects with reason `kind`, made from a valid event."""
        rng = self.rng_bad
        record = dict(record)
        variant = rng.randrange(4)
        if kind == "malformed_json":
            line = orjson.dumps(record)
            if variant == 0:
                return line[: rng.randint(1, len(line) - 2)]  # truncated
            if variant == 1:
                return line.replace(b'"tenant":"', b'"tenant":"\xc3\x28', 1)  # invalid UTF-8
            if variant == 2:
                return line[:-1] + b",}"  # trailing comma
            return repr(record).encode()  # a Python dict, single quotes
        if kind == "not_an_object":
            value = ([record], record["type"], 42, None)[variant]
            return orjson.dumps(value)
        if kind == "missing_schema_urn":
            if variant < 2:
                del record["schema_urn"]
            else:
                record["schema_urn"] = (None, "")[variant - 2]
        elif kind == "unknown_schema":
            record["schema_urn"] = (
                "urn:nc:events:mobile",
                "urn:nc:events:web:v1",
                "urn:acme:clicks",
                "urn:nc:events:Web",
            )[variant]
        elif kind == "unsupported_version":
            if variant == 3:
                del record["version"]
            else:
                record["version"] = (2, 0, 99)[variant]
        elif kind == "missing_field":
            name = rng.choice(("event_id", "type", "timestamp", "tenant"))
            mode = rng.randrange(3)
            if mode == 0:
                del record[name]
            else:
                record[name] = (None, "")[mode - 1]
        elif kind == "bad_timestamp":
            record["timestamp"] = (
                str(format_timestamp(ms, "iso_z"))[:-1],  # no offset
                "yesterday",
                "2500-01-01T00:00:00Z",  # out of range
                ms * 1000,  # microseconds instead of milliseconds: far in the future
            )[variant]
        elif kind == "bad_type":
            if variant == 0:
                record["event_id"] = rng.randint(1, 10**9)
            elif variant == 1:
                record["properties"] = [record.get("properties") or {}]
            elif variant == 2:
                record["type"] = "error"
                record["error"] = "something went wrong"
            else:
                record["user_id"] = rng.randint(1, 10**6)
        elif kind == TOO_LARGE:
            record["properties"] = {"blob": "x" * (ONE_MIB + rng.randint(1, 4096))}
        else:  # pragma: no cover
            raise ValueError(f"unknown bad kind {kind!r}")
        return orjson.dumps(record)

    # --- when -------------------------------------------------------------------------------------

    def items(self) -> Iterator[Item]:
        if self.n == 0:
            return
        rng = self.rng_sessions
        delay_rng = self.rng_delay
        sessions: list[tuple[float, int, _Session]] = []  # (next event at, seq, session)
        buffer: list[tuple[float, int, dict, int, bool]] = []  # (arrives at, seq, event, ms, late)
        seq = itertools.count()
        next_arrival = float(self.start_ms)
        emitted = 0
        while True:
            if sessions and sessions[0][0] <= next_arrival:
                at, _, session = heapq.heappop(sessions)
            else:
                at, session = next_arrival, self.new_session()
                next_arrival += rng.expovariate(self.arrival_rate)
            ms = int(at)
            record = self.event(session, ms)
            session.remaining -= 1
            if session.remaining > 0:
                heapq.heappush(sessions, (at + self.next_gap_ms(session), next(seq), session))
            late = delay_rng.random() < self.late_fraction
            if late:
                delay = delay_rng.uniform(120_000, 3_600_000)
            else:
                delay = self.max_disorder_ms * delay_rng.random() ** 3
            heapq.heappush(buffer, (at + delay, next(seq), record, ms, late))
            while buffer and buffer[0][0] <= at:
                _, _, ready, ready_ms, ready_late = heapq.heappop(buffer)
                if self.rng_bad.random() < self.bad_fraction:
                    kind = self.next_bad_kind()
                    yield Item(self.spoil(ready, ready_ms, kind), kind, ready_late, None)
                else:
                    yield Item(orjson.dumps(ready), None, ready_late, ready_ms)
                emitted += 1
                if emitted >= self.n:
                    return


def generate_items(
    n: int,
    *,
    seed: int = 7,
    start: datetime | str | int = "2024-05-01T08:00:00Z",
    span_s: float = 3600.0,
    late_fraction: float = 0.01,
    bad_fraction: float = 0.02,
    include_too_large: bool = False,
    max_disorder_s: float = 20.0,
    users: int | None = None,
) -> Iterator[Item]:
    """Like `generate`, with each line's kind (bad kind or None), lateness and event time."""
    return _Workload(
        n,
        seed=seed,
        start=start,
        span_s=span_s,
        late_fraction=late_fraction,
        bad_fraction=bad_fraction,
        include_too_large=include_too_large,
        max_disorder_s=max_disorder_s,
        users=users,
    ).items()


def generate(n: int, **options) -> Iterator[bytes]:
    """`n` JSON lines (no trailing newline), deterministic for the same arguments.

    Options: seed, start (datetime, ISO text or epoch ms), span_s, late_fraction, bad_fraction,
    include_too_large, max_disorder_s, users (total users over all tenants; default n/15).
    """
    return (item.line for item in generate_items(n, **options))


def write(path: Path | str, n: int, **options) -> int:
    """Write `n` generated lines to `path` (newline-terminated); returns the byte count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with path.open("wb") as out:
        for line in generate(n, **options):
            out.write(line)
            out.write(b"\n")
            size += len(line) + 1
    return size


def sample_bytes() -> bytes:
    """The exact content of the bundled sample."""
    args = dict(SAMPLE_ARGS)
    return b"".join(line + b"\n" for line in generate(args.pop("n"), **args))


# --- the word lists -------------------------------------------------------------------------------

_MAINSTREAM_FAMILIES = (
    "Chrome", "Chrome Mobile", "Chrome Mobile iOS", "Chrome Mobile WebView", "Mobile Safari",
    "Safari", "Mobile Safari UI/WKWebView", "Firefox", "Firefox Mobile", "Firefox iOS", "Edge",
    "Edge Mobile", "Samsung Internet", "Opera", "Opera Mobile", "Opera Mini", "Brave", "Vivaldi",
    "Yandex Browser", "UC Browser", "Facebook", "Instagram", "Pinterest", "Whale", "Amazon Silk",
    "IE", "Android", "QQ Browser Mobile", "WeChat Browser", "Googlebot", "bingbot",
)  # fmt: skip
_EXTRA_USER_AGENTS = (
    "curl/8.5.0",
    "python-requests/2.31.0",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
)


def refresh_data(
    geoip_json: Path = ROOT / "tests" / "data" / "geoip" / "GeoLite2-City-Test.json",
    geoip_mmdb: Path = ROOT / "dataflows" / "data" / "GeoLite2-City-Test.mmdb",
    uap_yaml: Path = ROOT / "tests" / "data" / "uap" / "test_ua.yaml",
    out: Path = DATA_DIR,
    user_agents: int = 300,
) -> None:
    """Rebuild bench/data/ips.txt and user_agents.txt from the test corpora (needs PyYAML)."""
    import ipaddress

    import geoip2.database
    import geoip2.errors
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    networks = [next(iter(entry)) for entry in orjson.loads(geoip_json.read_bytes())]
    resolvable: list[str] = []
    with geoip2.database.Reader(str(geoip_mmdb)) as reader:
        for text in networks:
            network = ipaddress.ip_network(text)
            if network.version == 4:
                step = max(1, network.num_addresses // 6)
                candidates = [network[i] for i in range(0, network.num_addresses, step)][:6]
            else:
                candidates = [network[1], network[0x1234_5678]]
            for address in candidates:
                try:
                    city = reader.city(str(address))
                except geoip2.errors.AddressNotFoundError:
                    continue
                if city.country.iso_code and str(address) not in resolvable:
                    resolvable.append(str(address))
    unresolvable = [
        "10.0.0.17", "10.20.30.40", "172.16.5.4", "192.168.1.20", "127.0.0.1", "192.0.2.10",
        "198.51.100.7", "8.8.8.8", "::1", "fe80::1", "2001:db8::42", "999.12.0.1", "not-an-ip",
    ]  # fmt: skip
    lines = [
        "# Client addresses for generated events (bench/workload.py).",
        "# Addresses inside networks of MaxMind's GeoLite2-City-Test database (see LICENSE-MIT),",
        "# all resolving to at least a country in dataflows/data/GeoLite2-City-Test.mmdb:",
        *resolvable,
        f"{_UNRESOLVABLE_MARK} private, loopback, link-local, documentation, public but not in the",
        "# test database, and malformed:",
        *unresolvable,
    ]
    (out / "ips.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    cases = yaml.safe_load(uap_yaml.read_text(encoding="utf-8"))["test_cases"]
    chosen: list[str] = []
    seen: set[str] = set()

    def take(ua: str) -> None:
        if ua and ua not in seen and "\n" not in ua and ua.isprintable():
            seen.add(ua)
            chosen.append(ua)

    rank = {family: i for i, family in enumerate(_MAINSTREAM_FAMILIES)}
    mainstream = sorted(
        (c for c in cases if c["family"] in rank), key=lambda c: rank[c["family"]]
    )  # stable: within a family, file order
    for case in mainstream:
        take(case["user_agent_string"])
    others = [c["user_agent_string"] for c in cases if c["family"] not in rank]
    room = max(0, user_agents - len(_EXTRA_USER_AGENTS) - len(chosen))
    if others and room:
        step = len(others) / room
        for i in range(room):
            take(others[int(i * step)])
    for ua in _EXTRA_USER_AGENTS:
        take(ua)
    header = [
        "# User-Agent strings for generated events (bench/workload.py), most common kinds first.",
        "# From uap-core's tests/test_ua.yaml (see LICENSE-uap-core), plus curl, python-requests and",
        "# Googlebot.",
    ]
    (out / "user_agents.txt").write_text("\n".join(header + chosen) + "\n", encoding="utf-8")
    shutil.copyfile(uap_yaml.parent / "LICENSE", out / "LICENSE-uap-core")
    shutil.copyfile(geoip_json.parent / "LICENSE-MIT", out / "LICENSE-MIT")
    load_ips.cache_clear()
    load_user_agents.cache_clear()


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.workload",
        description="Write deterministic urn:nc:events:web v1 events as JSON Lines.",
    )
    parser.add_argument("--n", type=int, default=5000, help="number of lines")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--start", default="2024-05-01T08:00:00Z", help="ISO-8601 with offset")
    parser.add_argument("--span-s", type=float, default=3600.0, help="event-time span, seconds")
    parser.add_argument("--late-fraction", type=float, default=0.01)
    parser.add_argument("--bad-fraction", type=float, default=0.02)
    parser.add_argument("--max-disorder-s", type=float, default=20.0)
    parser.add_argument("--users", type=int, default=None, help="total users (default n/15)")
    parser.add_argument("--too-large", action="store_true", help="include records over 1 MiB")
    parser.add_argument("--out", type=Path, help="output file (default: standard output)")
    parser.add_argument("--sample", action="store_true", help="write the bundled sample")
    parser.add_argument("--refresh-data", action="store_true", help="rebuild bench/data lists")
    args = parser.parse_args(argv)

    if args.refresh_data:
        refresh_data()
        print(f"rebuilt {IPS_FILE} and {USER_AGENTS_FILE}", file=sys.stderr)
        return 0
    if args.sample:
        target = args.out or SAMPLE_PATH
        data = sample_bytes()
        target.write_bytes(data)
        print(f"wrote {target} ({len(data)} bytes)", file=sys.stderr)
        return 0
    options = {
        "seed": args.seed,
        "start": args.start,
        "span_s": args.span_s,
        "late_fraction": args.late_fraction,
        "bad_fraction": args.bad_fraction,
        "include_too_large": args.too_large,
        "max_disorder_s": args.max_disorder_s,
        "users": args.users,
    }
    if args.out is None:
        out = sys.stdout.buffer
        for line in generate(args.n, **options):
            out.write(line + b"\n")
        out.flush()
        return 0
    size = write(args.out, args.n, **options)
    print(f"wrote {args.out} ({args.n} lines, {size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
