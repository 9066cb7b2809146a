"""Enrichment: geo and user-agent columns, device type rules, retries/DLQ, caches. No servers.

Reference data lives in tests/data: MaxMind's GeoLite2 City test database source (JSON), a
deliberately corrupt GeoIP2 City test database, and uap-core's test_ua.yaml / test_os.yaml.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import maxminddb
import polars as pl
import pytest
import yaml

from dataflows.config import BUNDLED_GEOIP_CITY_DB, Settings
from operators import enrich
from operators.enrich import DEVICE_TYPES, Enricher, device_type
from operators.model import ENRICHED_SCHEMA, ENRICHMENT_SCHEMA, EVENT_SCHEMA

DATA = Path(__file__).resolve().parents[1] / "data"
GEO_JSON = DATA / "geoip" / "GeoLite2-City-Test.json"
BROKEN_DB = DATA / "geoip" / "GeoIP2-City-Test-Broken-Double-Format.mmdb"
UAP = DATA / "uap"

CORPUS_THRESHOLD = 0.995

UA = {
    "curl": "curl/8.4.0",
    "googlebot": "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "iphone": (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
    ),
    "ipad": (
        "Mozilla/5.0 (iPad; CPU OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
    ),
    "android_tablet": (
        "Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36"
    ),
    "android_phone": (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/119.0.0.0 Mobile Safari/537.36"
    ),
    "windows_chrome": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"
    ),
    "python_requests": "python-requests/2.31.0",
}


def settings(**overrides) -> Settings:
    return Settings(**{"geoip_city_db": BUNDLED_GEOIP_CITY_DB, **overrides})


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def frame(pairs: list[tuple[str | None, str | None]]) -> pl.DataFrame:
    """An EVENT_SCHEMA frame with one row per (ip, user_agent) pair."""
    n = len(pairs)
    t0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    data = {column: [None] * n for column in EVENT_SCHEMA}
    data.update(
        event_id=[f"e{i}" for i in range(n)],
        schema_urn=["urn:test:event"] * n,
        version=[1] * n,
        type=["page_view"] * n,
        tenant=["acme"] * n,
        timestamp=[t0 + timedelta(seconds=i) for i in range(n)],
        user_id=[f"u{i % 7}" for i in range(n)],
        ip=[p[0] for p in pairs],
        user_agent=[p[1] for p in pairs],
        properties=['{"k": 1}'] * n,
        correlation_id=[f"corr-{i}" for i in range(n)],
        ingested_at=[t0 + timedelta(seconds=i, milliseconds=5) for i in range(n)],
        source=[f"events.jsonl:{i + 1}" for i in range(n)],
    )
    return pl.DataFrame(data, schema=EVENT_SCHEMA)


@pytest.fixture(scope="module")
def enricher() -> Enricher:
    return Enricher(settings(), sleep=Sleeps())


# --- shape ------------------------------------------------------------------------------------


def test_output_has_enriched_schema_in_order_and_keeps_rows(enricher):
    events = frame([("2.125.160.216", UA["iphone"]), (None, None), ("10.0.0.1", "curl/8.4.0")])
    before = datetime.now(UTC)
    out, dlq = enricher.enrich(events)
    after = datetime.now(UTC)

    assert dlq == []
    assert out.schema == pl.Schema(ENRICHED_SCHEMA)
    assert out.select(list(EVENT_SCHEMA)).equals(events)
    stamps = out["processed_at"].unique().to_list()
    assert len(stamps) == 1
    assert before - timedelta(milliseconds=1) <= stamps[0] <= after
    assert stamps[0].microsecond % 1000 == 0


def test_empty_batch(enricher):
    out, dlq = enricher.enrich(frame([]))
    assert out.height == 0 and dlq == []
    assert out.schema == pl.Schema(ENRICHED_SCHEMA)


def test_existing_enrichment_columns_are_replaced(enricher):
    first, _ = enricher.enrich(frame([("2.125.160.216", "curl/8.4.0")]))
    again, _ = enricher.enrich(first)
    assert again.schema == pl.Schema(ENRICHED_SCHEMA)
    assert again.drop("processed_at").equals(first.drop("processed_at"))


def test_ua_backend_is_rust(enricher):
    # ua-parser-rs is a declared dependency (ua-parser[regex]); the fallback would be far slower.
    assert enricher.ua_backend.startswith("regex")


# --- user agent: uap-core corpora -------------------------------------------------------------


def _corpus(name: str) -> list[dict]:
    with open(UAP / name, encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["test_cases"]


def _match_rates(enricher, cases, family_col, major_col):
    events = frame([(None, c["user_agent_string"]) for c in cases])
    out, dlq = enricher.enrich(events)
    assert dlq == [] and out.height == len(cases)
    family_ok = major_ok = 0
    misses = []
    got = out.select(family_col, major_col).iter_rows()
    for case, (family, major) in zip(cases, got, strict=True):
        expected_major = None if case["major"] in (None, "") else str(case["major"])
        if family == case["family"]:
            family_ok += 1
            if major == expected_major:
                major_ok += 1
                continue
        misses.append((case["user_agent_string"], case["family"], expected_major, family, major))
    return family_ok / len(cases), major_ok / len(cases), misses


def test_browser_family_and_major_match_uap_corpus(enricher):
    cases = _corpus("test_ua.yaml")
    family_rate, major_rate, misses = _match_rates(
        enricher, cases, "ua_browser", "ua_browser_major"
    )
    print(
        f"\ntest_ua.yaml: {len(cases)} cases, browser family {family_rate:.4%}, "
        f"family+major {major_rate:.4%}"
    )
    assert family_rate >= CORPUS_THRESHOLD, misses[:20]
    assert major_rate >= CORPUS_THRESHOLD, misses[:20]


def test_os_family_and_major_match_uap_corpus(enricher):
    cases = _corpus("test_os.yaml")
    family_rate, major_rate, misses = _match_rates(enricher, cases, "ua_os", "ua_os_major")
    print(
        f"\ntest_os.yaml: {len(cases)} cases, OS family {family_rate:.4%}, "
        f"family+major {major_rate:.4%}"
    )
    assert family_rate >= CORPUS_THRESHOLD, misses[:20]
    assert major_rate >= CORPUS_THRESHOLD, misses[:20]


def test_every_corpus_ua_gets_a_known_device_type(enricher):
    cases = _corpus("test_ua.yaml") + _corpus("test_os.yaml")
    uas = sorted({c["user_agent_string"] for c in cases})
    out, _ = enricher.enrich(frame([(None, ua) for ua in uas]))
    counts = Counter(out["ua_device_type"].to_list())
    print(f"\ndevice types over {len(uas)} corpus UAs: {dict(counts)}")
    assert set(counts) <= set(DEVICE_TYPES)
    assert out["ua_device_type"].null_count() == 0


# --- user agent: device type rules ------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("curl", "bot"),
        ("googlebot", "bot"),
        ("iphone", "mobile"),
        ("ipad", "tablet"),
        ("android_tablet", "tablet"),
        ("android_phone", "mobile"),
        ("windows_chrome", "desktop"),
        ("python_requests", "bot"),
    ],
)
def test_device_type_examples(enricher, key, expected):
    out, _ = enricher.enrich(frame([(None, UA[key])]))
    assert out["ua_device_type"].to_list() == [expected]


@pytest.mark.parametrize(
    ("ua", "expected"),
    [
        ("Wget/1.21.4", "bot"),
        ("Go-http-client/1.1", "bot"),
        ("okhttp/4.12.0", "bot"),
        ("Java/17.0.2", "bot"),
        ("Apache-HttpClient/4.5.14 (Java/17.0.2)", "bot"),
        ("libwww-perl/6.72", "bot"),
        ("PostmanRuntime/7.36.0", "bot"),
        ("axios/1.6.2", "bot"),
        ("node-fetch/1.0 (+https://github.com/bitinn/node-fetch)", "bot"),
        ("Python-urllib/3.11", "bot"),
        ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", "bot"),
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "HeadlessChrome/120.0.0.0 Safari/537.36",
            "bot",
        ),
        # the CUBOT phone brand is not a bot
        (
            "Mozilla/5.0 (Linux; Android 9; CUBOT X19) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/119.0.0.0 Mobile Safari/537.36",
            "mobile",
        ),
        ("Mozilla/5.0 (Android 14; Tablet; rv:120.0) Gecko/120.0 Firefox/120.0", "tablet"),
        ("Mozilla/5.0 (Android 14; Mobile; rv:120.0) Gecko/120.0 Firefox/120.0", "mobile"),
        (
            "Mozilla/5.0 (Linux; U; Android 4.0.3; en-us; KFTT Build/IML74K) AppleWebKit/535.19 "
            "(KHTML, like Gecko) Silk/3.4 Mobile Safari/535.19 Silk-Accelerated=true",
            "tablet",
        ),
        (
            "Mozilla/5.0 (Windows Phone 10.0; Android 6.0.1; Microsoft; Lumia 950) "
            "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/52.0.2743.116 Mobile Safari/537.36 "
            "Edge/15.14900",
            "mobile",
        ),
        ("Dalvik/2.1.0 (Linux; U; Android 11; SM-G991B Build/RP1A.200720.012)", "mobile"),
        (
            "Opera/9.80 (J2ME/MIDP; Opera Mini/9.80 (S60; SymbOS; Opera Mobi/23.348; U; en) "
            "Presto/2.5.25 Version/10.54",
            "mobile",
        ),
        (
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
            "(KHTML, like Gecko) Version/17.1 Safari/605.1.15",
            "desktop",
        ),
        (
            "Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/119.0.0.0 Safari/537.36",
            "desktop",
        ),
        (
            "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
            "desktop",
        ),
        (
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox One) AppleWebKit/537.36 "
            "(KHTML, like Gecko) Chrome/70.0.3538.102 Safari/537.36 Edge/18.19041",
            "other",
        ),
        (
            "Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) "
            "SamsungBrowser/4.0 Chrome/76.0.3809.146 TV Safari/537.36",
            "other",
        ),
        ("garbage", "other"),
    ],
)
def test_device_type_rules(enricher, ua, expected):
    out, _ = enricher.enrich(frame([(None, ua)]))
    assert out["ua_device_type"].to_list() == [expected]


def test_device_type_helper_is_pure():
    assert device_type(None, None, None, None) == "other"
    assert device_type("   ", None, None, None) == "other"
    assert device_type("anything", "Other", "Other", "Spider") == "bot"
    assert device_type("x", "Other", "Windows", "Other") == "desktop"
    assert device_type("x", "Other", "iOS", "iPad") == "tablet"
    assert device_type("x", "Other", "Android", "Generic Smartphone") == "mobile"


def test_unknown_ua_follows_ua_parser_conventions(enricher):
    out, _ = enricher.enrich(frame([(None, "SomethingWeNeverKnewExisted")]))
    row = out.row(0, named=True)
    assert (row["ua_browser"], row["ua_browser_major"]) == ("Other", None)
    assert (row["ua_os"], row["ua_os_major"]) == ("Other", None)
    assert row["ua_device_family"] == "Other"
    assert row["ua_device_type"] == "other"


@pytest.mark.parametrize("ua", [None, "", "   "])
def test_missing_ua_gives_null_fields_and_device_type_other(enricher, ua):
    out, dlq = enricher.enrich(frame([("2.125.160.216", ua)]))
    row = out.row(0, named=True)
    assert dlq == []
    for column in ("ua_browser", "ua_browser_major", "ua_os", "ua_os_major", "ua_device_family"):
        assert row[column] is None, column
    assert row["ua_device_type"] == "other"
    assert row["geo_country"] == "GB"


def test_ua_fields_for_a_known_browser(enricher):
    out, _ = enricher.enrich(frame([(None, UA["iphone"])]))
    row = out.row(0, named=True)
    assert row["ua_browser"] == "Mobile Safari"
    assert row["ua_browser_major"] == "17"
    assert row["ua_os"] == "iOS"
    assert row["ua_os_major"] == "17"
    assert row["ua_device_family"] == "iPhone"


# --- geo ------------------------------------------------------------------------------------


def _expected_geo() -> list[tuple[str, tuple]]:
    """(first address of each network, expected geo fields), computed from the JSON source of the
    test database without geoip2.

    Networks in the JSON may overlap; the database answers an address with its most specific
    network, so the expectation for an address is the record of the longest-prefix network that
    contains it. Every network of the JSON is present in the City test database (it is the file
    the database was built from), so none is skipped; the assertion below guards that.
    """
    with open(GEO_JSON, encoding="utf-8") as f:
        entries = [
            (ipaddress.ip_network(k, strict=False), v) for e in json.load(f) for k, v in e.items()
        ]
    expected = []
    for network, _ in entries:
        address = network.network_address
        best = max(
            ((n, r) for n, r in entries if n.version == address.version and address in n),
            key=lambda nr: nr[0].prefixlen,
        )[1]
        subdivisions = best.get("subdivisions") or []
        location = best.get("location") or {}
        expected.append(
            (
                str(address),
                (
                    (best.get("country") or {}).get("iso_code"),
                    subdivisions[0].get("iso_code") if subdivisions else None,
                    ((best.get("city") or {}).get("names") or {}).get("en"),
                    location.get("latitude"),
                    location.get("longitude"),
                ),
            )
        )
    return expected


def test_geo_matches_geolite2_city_test_json_for_every_network(enricher):
    expected = _expected_geo()
    assert len(expected) == 242
    out, dlq = enricher.enrich(frame([(ip, None) for ip, _ in expected]))
    assert dlq == []
    got = out.select("ip", "geo_country", "geo_region", "geo_city", "geo_lat", "geo_lon").rows()
    mismatches = [
        (ip, want, tuple(row[1:]))
        for (ip, want), row in zip(expected, got, strict=True)
        if tuple(row[1:]) != want
    ]
    print(f"\ngeo: {len(expected) - len(mismatches)}/{len(expected)} networks match")
    assert mismatches == []
    # the set is not trivial: IPv4 and IPv6, with and without city/subdivision
    assert sum(1 for _, w in expected if w[2] is not None) >= 10
    assert sum(1 for ip, _ in expected if ":" in ip) >= 200


def test_geo_fields_for_a_known_address(enricher):
    out, _ = enricher.enrich(frame([("81.2.69.160", None)]))
    row = out.row(0, named=True)
    assert (row["geo_country"], row["geo_region"], row["geo_city"]) == ("GB", "ENG", "London")
    assert (row["geo_lat"], row["geo_lon"]) == (51.5142, -0.0931)


@pytest.mark.parametrize("ip", ["10.0.0.1", "192.168.1.1", "not-an-ip", "1.1.1.1", "::1", "", None])
def test_private_invalid_unknown_or_missing_ip_gives_nulls_not_dlq(enricher, ip):
    out, dlq = enricher.enrich(frame([(ip, UA["iphone"])]))
    assert dlq == []
    assert out.height == 1
    geo = out.select("geo_country", "geo_region", "geo_city", "geo_lat", "geo_lon")
    assert geo.row(0) == (None,) * 5
    assert out["ua_device_type"].to_list() == ["mobile"]


# --- transient failures, retries, DLQ -----------------------------------------------------------


def test_broken_database_retries_then_dead_letters_rows_with_an_ip():
    sleeps = Sleeps()
    enricher = Enricher(settings(geoip_city_db=BROKEN_DB), sleep=sleeps, backoff_s=0.5)
    # In the broken test database every address that has a record fails to decode; addresses
    # without a record are still answered "not found".
    events = frame(
        [
            ("81.2.69.160", UA["iphone"]),
            (None, UA["windows_chrome"]),
            ("2001:218::1", UA["curl"]),
            ("10.0.0.1", None),
            ("81.2.69.160", UA["ipad"]),
        ]
    )
    out, dlq = enricher.enrich(events)

    assert sleeps.calls == [0.5, 1.0, 2.0]  # 3 retries, exponential backoff, once per batch
    assert out["event_id"].to_list() == ["e1", "e3"]
    assert out.filter(pl.col("event_id") == "e1")["ua_device_type"].to_list() == ["desktop"]
    assert out.schema == pl.Schema(ENRICHED_SCHEMA)

    assert [d["source"] for d in dlq] == ["events.jsonl:1", "events.jsonl:3", "events.jsonl:5"]
    assert [d["correlation_id"] for d in dlq] == ["corr-0", "corr-2", "corr-4"]
    failed_rows = events.filter(pl.col("ip").is_in(["81.2.69.160", "2001:218::1"]))
    for record, row in zip(dlq, failed_rows.iter_rows(named=True), strict=True):
        assert record["reason"] == "enrichment_failed"
        assert record["stage"] == "enrich"
        assert "ip=" in record["error"] and repr(row["ip"]) in record["error"]
        assert "InvalidDatabaseError" in record["error"]
        payload = json.loads(record["payload"])
        assert payload["event_id"] == row["event_id"]
        assert payload["ip"] == row["ip"] and payload["user_agent"] == row["user_agent"]
        assert payload["timestamp"].startswith("2024-05-01T12:00:0")
        assert set(payload) == set(EVENT_SCHEMA)


def test_broken_database_raises_the_expected_error():
    # Guards the premise of the test above: this file really is corrupt for found addresses.
    with maxminddb.open_database(str(BROKEN_DB)) as reader:
        with pytest.raises(maxminddb.InvalidDatabaseError):
            reader.get("81.2.69.160")


def test_missing_database_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError):
        Enricher(settings(geoip_city_db=tmp_path / "nope.mmdb"))


class FlakyReader:
    """Wraps a geoip2 reader: raises `error` for `ip` the first `failures` times."""

    def __init__(self, inner, ip: str, failures: int, error: Exception) -> None:
        self.inner, self.ip, self.failures, self.error = inner, ip, failures, error
        self.calls: Counter[str] = Counter()

    def city(self, ip: str):
        self.calls[ip] += 1
        if ip == self.ip and self.calls[ip] <= self.failures:
            raise self.error
        return self.inner.city(ip)


def test_transient_failure_recovers_within_the_retries():
    sleeps = Sleeps()
    enricher = Enricher(settings(), sleep=sleeps)
    enricher.geo_reader = FlakyReader(enricher.geo_reader, "81.2.69.160", 2, OSError("disk hiccup"))
    out, dlq = enricher.enrich(frame([("81.2.69.160", None), ("2.125.160.216", None)]))
    assert dlq == []
    assert out["geo_city"].to_list() == ["London", "Boxford"]
    assert sleeps.calls == [0.02, 0.04]
    # only the failing value was retried
    assert enricher.geo_reader.calls == Counter({"81.2.69.160": 3, "2.125.160.216": 1})


def test_persistent_failure_of_one_value_leaves_other_rows_alone():
    sleeps = Sleeps()
    enricher = Enricher(settings(), sleep=sleeps)
    enricher.geo_reader = FlakyReader(enricher.geo_reader, "81.2.69.160", 99, OSError("EIO"))
    events = frame(
        [("2.125.160.216", UA["curl"]), ("81.2.69.160", UA["iphone"]), ("10.0.0.1", None)]
    )
    out, dlq = enricher.enrich(events)
    assert len(sleeps.calls) == 3
    assert enricher.geo_reader.calls["81.2.69.160"] == 4
    assert out["event_id"].to_list() == ["e0", "e2"]
    assert out["geo_city"].to_list() == ["Boxford", None]
    assert out["ua_device_type"].to_list() == ["bot", "other"]
    [record] = dlq
    assert record["source"] == "events.jsonl:2" and record["correlation_id"] == "corr-1"
    assert "geo lookup failed for ip='81.2.69.160'" in record["error"]
    assert "OSError: EIO" in record["error"] and "4 attempts" in record["error"]


def test_failures_are_not_cached():
    enricher = Enricher(settings(), sleep=Sleeps())
    real = enricher.geo_reader
    enricher.geo_reader = FlakyReader(real, "81.2.69.160", 4, OSError("EIO"))
    _, dlq = enricher.enrich(frame([("81.2.69.160", None)]))
    assert len(dlq) == 1
    out, dlq = enricher.enrich(frame([("81.2.69.160", None)]))  # the 5th call succeeds
    assert dlq == [] and out["geo_city"].to_list() == ["London"]


def test_ua_parser_failure_goes_to_dlq_and_names_the_user_agent():
    enricher = Enricher(settings(), sleep=Sleeps())
    real = enricher.ua_resolver

    def resolver(ua, domains):
        if ua == "explode":
            raise RuntimeError("parser blew up")
        return real(ua, domains)

    enricher.ua_resolver = resolver
    out, dlq = enricher.enrich(frame([("2.125.160.216", "explode"), ("2.125.160.216", UA["curl"])]))
    assert out["event_id"].to_list() == ["e1"]
    [record] = dlq
    assert record["reason"] == "enrichment_failed"
    assert "user-agent parse failed for user_agent='explode'" in record["error"]
    assert record["source"] == "events.jsonl:1"


# --- caches -------------------------------------------------------------------------------------


class CountingReader:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def city(self, ip: str):
        self.calls[ip] += 1
        return self.inner.city(ip)


def test_second_batch_with_same_values_hits_the_caches():
    enricher = Enricher(settings(), sleep=Sleeps())
    enricher.geo_reader = CountingReader(enricher.geo_reader)
    parsed: Counter[str] = Counter()
    real = enricher.ua_resolver

    def resolver(ua, domains):
        parsed[ua] += 1
        return real(ua, domains)

    enricher.ua_resolver = resolver
    pairs = [("2.125.160.216", UA["iphone"]), ("10.0.0.1", UA["curl"])] * 50
    pairs.append(("not-an-ip", UA["ipad"]))
    first, _ = enricher.enrich(frame(pairs))
    # within a batch every distinct value is looked up once
    assert set(enricher.geo_reader.calls.values()) == {1} and len(enricher.geo_reader.calls) == 3
    assert set(parsed.values()) == {1} and len(parsed) == 3

    second, _ = enricher.enrich(frame(pairs))
    assert sum(enricher.geo_reader.calls.values()) == 3
    assert sum(parsed.values()) == 3
    assert second.drop("processed_at").equals(first.drop("processed_at"))
    info = enricher.cache_info()
    assert info["geo"]["hits"] == 3 and info["geo"]["misses"] == 3
    assert info["ua"]["hits"] == 3 and info["ua"]["misses"] == 3


def test_caches_are_bounded_by_settings():
    enricher = Enricher(settings(ua_cache_size=2, geo_cache_size=1), sleep=Sleeps())
    enricher.enrich(
        frame([("2.125.160.216", UA["iphone"]), ("81.2.69.160", UA["curl"]), (None, UA["ipad"])])
    )
    info = enricher.cache_info()
    assert info["ua"]["size"] == 2 and info["ua"]["maxsize"] == 2
    assert info["geo"]["size"] == 1 and info["geo"]["maxsize"] == 1


def test_cache_size_zero_disables_caching_but_still_enriches():
    enricher = Enricher(settings(ua_cache_size=0, geo_cache_size=0), sleep=Sleeps())
    for _ in range(2):
        out, _ = enricher.enrich(frame([("2.125.160.216", UA["iphone"])]))
        assert out["geo_city"].to_list() == ["Boxford"]
        assert out["ua_device_type"].to_list() == ["mobile"]
    info = enricher.cache_info()
    assert info["ua"]["hits"] == 0 and info["ua"]["misses"] == 2
    assert info["geo"]["size"] == 0


def test_enrichment_columns_match_the_model():
    assert list(ENRICHED_SCHEMA)[-len(ENRICHMENT_SCHEMA) :] == list(ENRICHMENT_SCHEMA)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [None, None],
        ["81.2.69.160", None, "2001:db8::1", "81.2.69.160", "x" * 13, "x" * 12, "", "é" * 40],
        [f"Mozilla/5.0 ({i % 7})" if i % 5 else None for i in range(5000)],
    ],
    ids=["empty", "nulls", "mixed", "many"],
)
def test_dictionary_codes_compiled_and_in_python_agree(values, monkeypatch):
    pytest.importorskip("pipeline_native")
    series = pl.Series("ip", ["skipped", *values, "skipped too"], dtype=pl.String)[1:-1]  # offset
    codes, distinct = enrich.dictionary_codes(series)
    monkeypatch.setattr(enrich, "_native_codes", None)
    python_codes, python_distinct = enrich.dictionary_codes(series)
    assert python_codes.to_list() == codes.to_list() and python_distinct == distinct
    expected = {None: 0}
    assert codes.dtype == pl.UInt32 and codes.name == "ip"
    assert codes.to_list() == [expected.setdefault(v, len(expected)) for v in values]
    assert distinct == list(expected)[1:]
