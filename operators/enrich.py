"""Geo and user-agent enrichment of an events batch — pure, no servers.

`Enricher.enrich(events)` takes a polars frame with the `EVENT_SCHEMA` columns and returns the
same rows with the `ENRICHMENT_SCHEMA` columns appended, plus DLQ records for the rows whose
enrichment failed (those rows are removed from the returned frame).

Throughput design
-----------------
Real traffic repeats: a batch of thousands of events carries a few hundred distinct IPs and user
agents. Only the *unique* non-null values of `ip` and `user_agent` are looked up in Python, each
through a bounded LRU cache that lives as long as the `Enricher` (sizes `GEO_CACHE_SIZE` /
`UA_CACHE_SIZE`; 0 disables caching). The per-value results become a small table whose rows are
gathered back onto the batch by each row's value number (one pass over the column in Python to
number the values; a polars join costs ten times more on the small batches of a live stream).

Geo (`geo_*`)
-------------
GeoIP2/GeoLite2 City database at `settings.geoip_city_db`, opened through
`geoip2.database.Reader` with the maxminddb C extension over mmap (`MODE_MMAP_EXT`; falls back
to the pure-Python reader in `MODE_MEMORY` if the extension is not built).
`geo_country` = country ISO code, `geo_region` = ISO code of the *first* (largest) subdivision,
`geo_city` = English city name, `geo_lat` / `geo_lon` = location. A null IP, an IP the database
does not know (private ranges, unallocated space: `AddressNotFoundError`) and a string that is not
an IP address (`ValueError`) all give nulls — that is data, not a failure. A missing database
file or one that is not a City database fails `Enricher(...)` at start-up (configuration error).

User agent (`ua_*`)
-------------------
ua-parser 1.x with the Rust resolver (`ua_parser.regex.Resolver`, backed by `ua-parser-rs`), which
is what `ua_parser.BestAvailableResolver` selects when `ua-parser-rs` is installed; it is built
explicitly here so the choice does not depend on import-time probing, and `Enricher.ua_backend`
names the backend in use (the pure-Python `ua_parser.basic.Resolver` is the fallback when the
Rust extension is missing — same results, ~10x slower per miss).
`ua_browser` / `ua_os` / `ua_device_family` follow ua-parser's conventions: a UA that matches no
rule gets family `Other` and a null major. `ua_browser_major` / `ua_os_major` are the major
versions as text.

`ua_device_type` is one of `mobile`, `tablet`, `desktop`, `bot`, `other`, decided by
`device_type()` with these rules, first match wins:

1. `bot` — ua-parser's device family is `Spider`; or the UA contains a crawler/monitoring token
   (`bot` as a word end, `crawl`, `spider`, `slurp`, `HeadlessChrome`, `PhantomJS`, `monitor`,
   a `+http://` contact URL, …); or it is an HTTP library / command-line client (a product token
   with a version: curl, Wget, python-requests, Python-urllib, httpx, aiohttp, Go-http-client,
   okhttp, Java, Apache-HttpClient, libwww-perl, PostmanRuntime, axios, node-fetch, undici,
   Guzzle, HTTPie, Scrapy, cloud SDKs, PowerShell, …).
2. `other` — TVs, game consoles, VR headsets, watches and streaming devices (SMART-TV, HbbTV,
   GoogleTV, Xbox, PlayStation, Nintendo, Quest, tvOS/Apple TV, Roku, Chromecast, watchOS): they
   would otherwise fall into the desktop or mobile buckets through their OS family.
3. `tablet` — device family iPad or Kindle, any device family/brand mentioning `Tablet`,
   BlackBerry PlayBook; a `Tablet` token in the UA (but not Windows' `Tablet PC`), `Kindle`,
   Amazon `Silk/`.
4. `mobile` — device family iPhone/iPod or ua-parser's generic smartphone/feature phone.
5. `tablet` — an Android *browser* UA (one with `Mozilla/`) without a `Mobile` token (Google's
   convention for Android tablets). Android app UAs without `Mozilla/` (e.g. `Dalvik/…`) carry
   no form factor; they fall through to `mobile` since phones dominate.
6. `mobile` — a mobile OS family (iOS, Android, Windows Phone/Mobile, BlackBerry OS, Symbian,
   KaiOS, Firefox OS, Nokia Series 30/40, Bada, …) or a phone token (`Mobile`/`Mobi`, IEMobile,
   Windows CE, J2ME/MIDP feature-phone browsers such as Opera Mini, UC Browser, NetFront).
7. `desktop` — a desktop OS family: Windows, Mac OS X, Linux and its distributions, Chrome OS,
   the BSDs, Solaris.
8. `other` — everything else (unparseable strings included).

A null or blank `user_agent` is not parsed: `ua_browser`, `ua_browser_major`, `ua_os`,
`ua_os_major` and `ua_device_family` are null, and `ua_device_type` is `other`, so the device
type column is never null and always within its five values (aggregations can group by it
without a null bucket).

`processed_at` is the batch's wall-clock time (UTC, millisecond precision), one value per call.

Failures
--------
A lookup that raises anything other than "not found"/"invalid address" (a corrupt database —
`maxminddb.InvalidDatabaseError` —, an `OSError`, an unexpected parser error) is transient until
proven otherwise: all values that failed in a batch are retried together, up to `retries` (3)
more times, sleeping `backoff_s * 2**n` (0.02 s, 0.04 s, 0.08 s by default) before each round —
so a batch waits at most ~0.14 s however many values fail. Failures are not cached. Each row whose
`ip` or `user_agent` still fails afterwards becomes one `enrichment_failed` DLQ record (stage
`enrich`, the error names the field and value, the payload is the row as JSON, source and
correlation id are the row's) and is dropped from the output. `enrich` itself never raises for
bad data or a bad database.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import geoip2.database
import geoip2.errors
import orjson
import polars as pl
import pyarrow as pa
import ua_parser
from ua_parser import Domain, load_builtins, load_lazy_builtins

from dataflows.config import Settings
from operators.model import ENRICHMENT_SCHEMA, DlqReason, arrow_array, arrow_columns, dlq_record

try:  # native/, built by `make install`
    from pipeline_native import dictionary_codes as _native_codes
except ImportError:  # the Python loop below
    _native_codes = None

STAGE = "enrich"

GEO_COLUMNS = ("geo_country", "geo_region", "geo_city", "geo_lat", "geo_lon")
UA_COLUMNS = (
    "ua_browser",
    "ua_browser_major",
    "ua_os",
    "ua_os_major",
    "ua_device_family",
    "ua_device_type",
)

GeoResult = tuple[str | None, str | None, str | None, float | None, float | None]
UaResult = tuple[str | None, str | None, str | None, str | None, str | None, str]

NULL_GEO: GeoResult = (None, None, None, None, None)
NULL_UA: UaResult = (None, None, None, None, None, "other")

DEVICE_TYPES = ("mobile", "tablet", "desktop", "bot", "other")

# --- device type rules ---------------------------------------------------------------------------

# Crawler and monitoring tokens. `bot` must end a word ("Googlebot/", "AhrefsBot;", "Slackbot-")
# but not be the tail of the CUBOT phone brand.
_CRAWLER_RE = re.compile(
    r"(?<!cu)bot\b|crawl|spider|slurp|scraper|externalhit|headlesschrome|phantomjs|lighthouse"
    r"|monitor|pinger|pingdom|site24x7|openvas|nessus|zgrab|masscan|\+https?://",
    re.IGNORECASE,
)

# HTTP libraries and command-line clients: a product token followed by "/<version>", or the
# whole UA. Matched anywhere a token can start ("Apache-HttpClient/4.5 (Java/17)" is caught twice).
_HTTP_CLIENT_RE = re.compile(
    r"(?:^|[\s(;,\-])(?:curl|libcurl|libcurl-agent|pycurl|wget2?|python-requests|python-urllib"
    r"|python-httpx|httpx|aiohttp|urllib3|go-http-client|go-resty|okhttp|java|ahc|apache-httpclient"
    r"|httpclient|java-http-client|jersey|reactornetty|vert\.x-webclient|akka-http|scalaj-http"
    r"|apache-cxf|libwww-perl|lwp::simple|postmanruntime|insomnia|axios|node-fetch|undici|node"
    r"|got|superagent|guzzlehttp|php|ruby|http\.rb|faraday|rest-client|restsharp|reqwest|ureq"
    r"|hyper|httpie|scrapy|colly|dart|winhttp|mechanize|http_request2|feign|ktor-client"
    r"|grpc-[a-z]+|aws-sdk-[a-z0-9]+|boto3|botocore|minio-go|rclone|s3fs|aria2|lftp|urlgrabber"
    r"|lua-resty-http)(?:/v?\d|/?$)"
    r"|powershell/\d",
    re.IGNORECASE,
)
# Browser families ua-parser assigns to such clients (belt and braces for the regexes above).
_HTTP_CLIENT_FAMILIES = frozenset(
    {
        "curl",
        "Wget",
        "Python Requests",
        "Python-urllib",
        "Go-http-client",
        "okhttp",
        "Java",
        "Apache-HttpClient",
        "libwww-perl",
        "PostmanRuntime",
        "axios",
        "HTTPie",
        "HeadlessChrome",
        "PhantomJS",
    }
)

# TVs, consoles, VR headsets, watches, streaming sticks.
_NON_COMPUTING_RE = re.compile(
    r"smart-?tv|\bhbbtv\b|googletv|\bnetcast\b|\bweb0s\b|\btizen\b.*\btv\b|\bxbox\b|playstation"
    r"|\bpsp\b|nintendo|dreamcast|\bcrkey\b|\bapple ?tv\b|\broku\b|\baft[a-z]{1,3}\b"
    r"|oculusbrowser|\bquest \d",
    re.IGNORECASE,
)
_NON_COMPUTING_OS = frozenset(
    {
        "tvOS",
        "ATV OS X",
        "WatchOS",
        "GoogleTV",
        "Roku",
        "Chromecast Android",
        "Chromecast Fuchsia",
        "Chromecast Linux",
        "Chromecast SmartSpeaker",
        "FireHbbTV",
        "WebTV",
    }
)

_TABLET_TOKEN_RE = re.compile(r"\bTablet\b(?! PC)|\bSilk/|\bPlayBook\b|\bKindle\b", re.IGNORECASE)
# Phone tokens: "Mobile"/"Mobi", Windows CE/IEMobile, J2ME feature phones and their browsers,
# Symbian/Nokia, Facebook's Android/iOS app markers.
_MOBILE_TOKEN_RE = re.compile(
    r"\bMobi(?:le)?\b|IEMobile|Windows ?CE|\bMIDP\b|\bCLDC\b|J2ME|UP\.Browser|Obigo|Openwave"
    r"|NetFront|Opera Mini|UCWEB|UC ?Browser|MQQBrowser|OneBrowser|\bBREW\b|Series ?[46]0"
    r"|SymbianOS|\bNokia|SonyEricsson|\[FBAN/FB(?:4A|IOS)"
)

_MOBILE_OS = frozenset(
    {
        "iOS",
        "Android",
        "Windows Phone",
        "Windows Mobile",
        "BlackBerry OS",
        "Firefox OS",
        "KaiOS",
        "Symbian OS",
        "Symbian^3",
        "Symbian^3 Anna",
        "Symbian^3 Belle",
        "Nokia Series 40",
        "Nokia Series 30 Plus",
        "Brew MP",
        "BREW",
        "Bada",
        "MeeGo",
        "Maemo",
        "Sailfish",
        "Ubuntu Touch",
    }
)
_PHONE_DEVICES = frozenset({"Generic Smartphone", "Generic Feature Phone"})

_DESKTOP_OS = frozenset(
    {
        "Windows",
        "Mac OS X",
        "Mac OS",
        "macOS",
        "Linux",
        "Ubuntu",
        "Kubuntu",
        "Xubuntu",
        "Lubuntu",
        "Debian",
        "Fedora",
        "Red Hat",
        "CentOS",
        "SUSE",
        "openSUSE",
        "Mandriva",
        "Gentoo",
        "Slackware",
        "Mint",
        "Linux Mint",
        "Arch Linux",
        "Chrome OS",
        "ChromeOS",
        "FreeBSD",
        "OpenBSD",
        "NetBSD",
        "BSD",
        "Solaris",
    }
)


def device_type(
    ua: str | None,
    browser: str | None,
    os: str | None,
    device: str | None,
    brand: str | None = None,
) -> str:
    """Classify a user agent into `mobile`, `tablet`, `desktop`, `bot` or `other`.

    `ua` is the raw string; `browser`, `os`, `device` are ua-parser's families and `brand` its
    device brand (None = no match). The rules are listed in the module docstring.
    """
    if ua is None or not ua.strip():
        return "other"
    browser = browser or "Other"
    os = os or "Other"
    device = device or "Other"
    brand = brand or ""

    # 1. bots, crawlers, monitors, HTTP libraries and command-line clients
    if device == "Spider" or browser in _HTTP_CLIENT_FAMILIES:
        return "bot"
    if _CRAWLER_RE.search(ua) or _HTTP_CLIENT_RE.search(ua):
        return "bot"

    # 2. TVs, consoles, VR headsets, watches, streaming devices
    if os in _NON_COMPUTING_OS or _NON_COMPUTING_RE.search(ua):
        return "other"

    # 3. explicit tablets
    if (
        device.startswith("iPad")
        or "Kindle" in device
        or "Tablet" in device
        or "Tablet" in brand
        or device == "BlackBerry Playbook"
        or os == "BlackBerry Tablet OS"
        or _TABLET_TOKEN_RE.search(ua)
    ):
        return "tablet"

    # 4. explicit phones
    if device.startswith(("iPhone", "iPod")) or device in _PHONE_DEVICES:
        return "mobile"

    # 5. Android browsers without "Mobile" are tablets (Google's convention); Android apps that
    #    are not browsers carry no form factor and fall through to "mobile".
    if os == "Android" and "Mozilla/" in ua and "Mobile" not in ua:
        return "tablet"

    # 6. other phones: mobile OS families and phone tokens
    if os in _MOBILE_OS or os.startswith(("Symbian", "Nokia Series")):
        return "mobile"
    if _MOBILE_TOKEN_RE.search(ua):
        return "mobile"

    # 7. desktops
    if os in _DESKTOP_OS:
        return "desktop"
    return "other"


# --- ua-parser backend ---------------------------------------------------------------------------


def build_ua_resolver() -> tuple[Callable[[str, Domain], Any], str]:
    """The uncached ua-parser resolver and the name of its backend.

    `ua_parser.regex.Resolver` runs the uap-core rules in Rust (`ua-parser-rs`); it is the one
    `ua_parser.BestAvailableResolver` would choose, built explicitly (with the lazily loaded
    builtin matchers, as ua-parser does for that backend). Without the extension the pure-Python
    `ua_parser.basic.Resolver` over the eagerly compiled builtins gives the same answers, slower.
    """
    if ua_parser.RegexResolver is not None:
        from ua_parser.regex import Resolver as RegexResolver

        return RegexResolver(load_lazy_builtins()), "regex (ua-parser-rs, Rust)"
    return ua_parser.BasicResolver(load_builtins()), "basic (pure Python re)"


def _open_geo_reader(path: str) -> geoip2.database.Reader:
    """Open the City database; a missing file or a database of another type (e.g. ASN) is a
    configuration error and fails here, at start-up, rather than dead-lettering every event."""
    try:
        reader = geoip2.database.Reader(path, mode=geoip2.database.MODE_MMAP_EXT)
    except ValueError:  # maxminddb's C extension is not available
        reader = geoip2.database.Reader(path, mode=geoip2.database.MODE_MEMORY)
    database_type = reader.metadata().database_type
    if "City" not in database_type:
        reader.close()
        raise ValueError(f"GEOIP_CITY_DB {path} is a {database_type} database, not a City one")
    return reader


class Enricher:
    """Adds the `ENRICHMENT_SCHEMA` columns to event batches; holds the GeoIP reader, the UA
    parser and their caches. One per worker; not shared between threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        sleep: Callable[[float], None] = time.sleep,
        retries: int = 3,
        backoff_s: float = 0.02,
    ) -> None:
        self._sleep = sleep
        self._retries = retries
        self._backoff_s = backoff_s
        self.geo_reader = _open_geo_reader(str(settings.geoip_city_db))
        # Verified with ua-parser 1.0.2 + ua-parser-rs 0.1.5: this is the Rust `regex` resolver
        # (tests assert it). ua-parser's own CachingResolver is not used: the LRU below caches
        # the whole derived row (families, majors, device type) instead.
        self.ua_resolver, self.ua_backend = build_ua_resolver()
        self._geo_cached = functools.lru_cache(maxsize=settings.geo_cache_size)(self._lookup_geo)
        self._ua_cached = functools.lru_cache(maxsize=settings.ua_cache_size)(self._parse_ua)

    # --- per unique value (cached) ---------------------------------------------------------------

    def _lookup_geo(self, ip: str) -> GeoResult:
        try:
            city = self.geo_reader.city(ip)
        except (geoip2.errors.AddressNotFoundError, ValueError):
            return NULL_GEO
        subdivisions = city.subdivisions
        return (
            city.country.iso_code,
            subdivisions[0].iso_code if len(subdivisions) else None,
            city.city.names.get("en"),
            city.location.latitude,
            city.location.longitude,
        )

    def _parse_ua(self, ua: str) -> UaResult:
        if not ua.strip():
            return NULL_UA
        result = self.ua_resolver(ua, Domain.ALL)
        agent, os, device = result.user_agent, result.os, result.device
        browser = agent.family if agent else "Other"
        os_family = os.family if os else "Other"
        device_family = device.family if device else "Other"
        return (
            browser,
            agent.major if agent else None,
            os_family,
            os.major if os else None,
            device_family,
            device_type(ua, browser, os_family, device_family, device.brand if device else None),
        )

    def cache_info(self) -> dict[str, dict[str, int]]:
        """Hits, misses and sizes of the two caches (for metrics and tests)."""
        out = {}
        for name, cached in (("geo", self._geo_cached), ("ua", self._ua_cached)):
            info = cached.cache_info()
            out[name] = {
                "hits": info.hits,
                "misses": info.misses,
                "size": info.currsize,
                "maxsize": info.maxsize or 0,
            }
        return out

    # --- batch ---------------------------------------------------------------------------------

    def _resolve(
        self, values: Iterable[str], lookup: Callable[[str], tuple]
    ) -> tuple[dict[str, tuple], dict[str, str]]:
        """Look every value up; retry the failures together with exponential backoff.

        Returns the results and, for values that failed every attempt, a readable error.
        """
        results: dict[str, tuple] = {}
        pending: Iterable[str] = values
        errors: dict[str, Exception] = {}
        for attempt in range(self._retries + 1):
            if attempt:
                self._sleep(self._backoff_s * 2 ** (attempt - 1))
            errors = {}
            for value in pending:
                try:
                    results[value] = lookup(value)
                except Exception as exc:  # noqa: BLE001 — anything else is treated as transient
                    errors[value] = exc
            if not errors:
                break
            pending = list(errors)
        attempts = self._retries + 1
        return results, {
            v: f"{type(e).__name__}: {e} (after {attempts} attempts)" for v, e in errors.items()
        }

    def enrich(self, events: pl.DataFrame) -> tuple[pl.DataFrame, list[dict]]:
        """The rows of `events` with the enrichment columns appended, and DLQ records for the rows
        whose enrichment failed (removed from the frame)."""
        processed_ms = time.time_ns() // 1_000_000
        base = events
        if stale := [c for c in ENRICHMENT_SCHEMA if c in events.columns]:
            base = events.drop(stale)
        for key in ("ip", "user_agent"):
            if base.schema[key] != pl.String:
                base = base.with_columns(pl.col(key).cast(pl.String))

        geo, geo_errors = self._columns(base["ip"], self._geo_cached, GEO_COLUMNS, NULL_GEO)
        ua, ua_errors = self._columns(base["user_agent"], self._ua_cached, UA_COLUMNS, NULL_UA)
        # from an integer: a Series from a zone-aware datetime costs ~80 µs
        stamp = pl.Series("processed_at", [processed_ms]).cast(ENRICHMENT_SCHEMA["processed_at"])
        out = base.hstack([*geo, *ua, stamp.new_from_index(0, base.height)])

        dlq: list[dict] = []
        if geo_errors or ua_errors:
            failed = pl.col("ip").is_in(list(geo_errors)).fill_null(False) | pl.col(
                "user_agent"
            ).is_in(list(ua_errors)).fill_null(False)
            for row in base.filter(failed).iter_rows(named=True):
                dlq.append(_dlq_for(row, geo_errors, ua_errors))
            out = out.filter(~failed)
        return out, dlq

    def _columns(
        self,
        values: pl.Series,
        lookup: Callable[[str], tuple],
        columns: tuple[str, ...],
        missing: tuple,
    ) -> tuple[list[pl.Series], dict[str, str]]:
        """The `columns` of `lookup` for each of `values`, each distinct value looked up once
        (`missing` for a null). Distinct values are numbered (`dictionary_codes`) and the result
        rows gathered by number: a join costs far more on the small batches of a live stream."""
        codes, distinct = dictionary_codes(values)
        results, errors = self._resolve(distinct, lookup)
        # a failed value's row is removed from the batch: its cells may be anything
        rows = [missing, *(results.get(value, missing) for value in distinct)]
        table = pl.DataFrame(
            list(zip(*rows, strict=True)),
            schema={c: ENRICHMENT_SCHEMA[c] for c in columns},
            orient="col",
        )
        # column by column: a frame's gather is handed to polars' thread pool and waited for
        return [column[codes] for column in table.get_columns()], errors


def dictionary_codes(values: pl.Series) -> tuple[pl.Series, list[str]]:
    """Each value's code (UInt32: 0 for a null, then 1, 2, … in order of first appearance) and
    the distinct values in code order. Compiled (`native/src/dictionary.rs`) where built; this
    loop is its specification."""
    if _native_codes is not None:
        _arrays, (column,) = arrow_columns(values.to_frame(), string_views=True)
        codes, distinct = _native_codes(len(values), column)
        array = arrow_array(pa.uint32(), len(values), (codes, None, None))
        return pl.Series(values.name, array), distinct
    code_of: dict[str | None, int] = {None: 0}
    codes = [code_of.setdefault(value, len(code_of)) for value in values.to_list()]
    return pl.Series(values.name, codes, dtype=pl.UInt32), list(code_of)[1:]


def _short(value: str, limit: int = 200) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _dlq_for(row: dict, geo_errors: dict[str, str], ua_errors: dict[str, str]) -> dict:
    problems = []
    if (ip := row.get("ip")) is not None and ip in geo_errors:
        problems.append(f"geo lookup failed for ip={_short(ip)}: {geo_errors[ip]}")
    if (ua := row.get("user_agent")) is not None and ua in ua_errors:
        problems.append(f"user-agent parse failed for user_agent={_short(ua)}: {ua_errors[ua]}")
    return dlq_record(
        reason=DlqReason.ENRICHMENT_FAILED,
        stage=STAGE,
        error="; ".join(problems),
        payload=orjson.dumps(row, option=orjson.OPT_UTC_Z, default=str).decode(),
        source=row.get("source") or "",
        correlation_id=row.get("correlation_id"),
    )
