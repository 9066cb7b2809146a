"""The workload generator: deterministic, realistic, and its bad records fail as labelled."""

from __future__ import annotations

import collections
import ipaddress
from datetime import UTC, datetime
from pathlib import Path

import geoip2.database
import geoip2.errors
import orjson
import polars as pl
import pytest

from bench.workload import (
    BAD_KINDS,
    SAMPLE_ARGS,
    SAMPLE_PATH,
    TOO_LARGE,
    generate,
    generate_items,
    load_ips,
    load_user_agents,
    main,
    sample_bytes,
    write,
)
from dataflows.config import BUNDLED_GEOIP_CITY_DB, BUNDLED_SAMPLE
from operators.model import RawBatch, RawRecord
from operators.validate import decode_batch


def _decode(items) -> tuple[pl.DataFrame, dict[int, dict]]:
    records = [RawRecord(item.line, f"gen:{i}", 1_714_550_400.0) for i, item in enumerate(items)]
    batch = decode_batch(RawBatch("gen", records))
    return batch.events, {int(d["source"].split(":")[1]): d for d in batch.dlq}


@pytest.fixture(scope="module")
def sample_items():
    args = dict(SAMPLE_ARGS)
    return list(generate_items(args.pop("n"), **args))


# --- determinism ----------------------------------------------------------------------------------


def test_same_seed_same_bytes():
    first = list(generate(2000, seed=11, late_fraction=0.05, bad_fraction=0.05))
    second = list(generate(2000, seed=11, late_fraction=0.05, bad_fraction=0.05))
    assert first == second
    assert len(first) == 2000
    assert all(b"\n" not in line for line in first)
    assert list(generate(2000, seed=12)) != list(generate(2000, seed=11))


def test_bad_fraction_leaves_valid_events_alone():
    """Separate random streams: more bad records do not reshuffle the valid ones."""
    clean = [i.line for i in generate_items(1500, seed=3, bad_fraction=0.0)]
    dirty = [i for i in generate_items(1500, seed=3, bad_fraction=0.1)]
    assert not any(i.bad for i in generate_items(1500, seed=3, bad_fraction=0.0))
    valid = [i.line for i in dirty if i.bad is None]
    assert set(valid) <= set(clean)


def test_bundled_sample_is_reproducible():
    assert SAMPLE_PATH == BUNDLED_SAMPLE
    data = BUNDLED_SAMPLE.read_bytes()
    assert data == sample_bytes(), "regenerate with `python -m bench.workload --sample`"
    assert len(data) < 3_000_000
    assert data.count(b"\n") == SAMPLE_ARGS["n"] == 6000


def test_cli_writes_the_same_lines(tmp_path: Path):
    out = tmp_path / "w.jsonl"
    assert main(["--n", "500", "--seed", "7", "--out", str(out)]) == 0
    assert out.read_bytes() == b"".join(line + b"\n" for line in generate(500, seed=7))
    other = tmp_path / "x.jsonl"
    assert write(other, 500, seed=7) == out.stat().st_size
    assert other.read_bytes() == out.read_bytes()


# --- bad records ----------------------------------------------------------------------------------


def test_every_bad_kind_fails_validation_with_its_reason():
    items = list(generate_items(3000, seed=5, bad_fraction=0.08, include_too_large=True))
    kinds = collections.Counter(i.bad for i in items if i.bad)
    assert set(kinds) == {*BAD_KINDS, TOO_LARGE}
    assert kinds[TOO_LARGE] == 1  # rare: bad record no. 8, then every 1000th
    events, dlq = _decode(items)
    for index, item in enumerate(items):
        if item.bad is None:
            assert index not in dlq, (item.line[:200], dlq.get(index))
        else:
            assert dlq[index]["reason"] == item.bad, (item.line[:200], dlq[index])
            assert dlq[index]["stage"] == "validate"
    assert events.height == len(items) - len(dlq)


def test_bad_kinds_take_turns():
    kinds = [i.bad for i in generate_items(1000, seed=9, bad_fraction=0.1) if i.bad]
    assert tuple(kinds[: len(BAD_KINDS)]) == BAD_KINDS
    assert TOO_LARGE not in kinds


def test_no_bad_records_when_fraction_is_zero():
    events, dlq = _decode(list(generate_items(1000, seed=2, bad_fraction=0.0)))
    assert dlq == {} and events.height == 1000


# --- the bundled sample ---------------------------------------------------------------------------


def test_sample_validates_as_labelled(sample_items):
    events, dlq = _decode(sample_items)
    bad = [i for i in sample_items if i.bad]
    assert 0.01 < len(bad) / len(sample_items) < 0.03
    assert {i.bad for i in bad} == set(BAD_KINDS)  # every reason, no too_large
    assert {d["reason"] for d in dlq.values()} == set(BAD_KINDS)
    assert len(dlq) == len(bad)
    for index, item in enumerate(sample_items):
        assert (index in dlq) == (item.bad is not None)
        if item.bad:
            assert dlq[index]["reason"] == item.bad
    assert events.height == len(sample_items) - len(bad)


def test_sample_looks_like_traffic(sample_items):
    events, _ = _decode(sample_items)
    tenants = events["tenant"].value_counts(sort=True)
    assert tenants.height == 5
    counts = tenants["count"].to_list()
    assert counts[0] > 3 * counts[-1]  # skewed

    per_user = events.drop_nulls("user_id")["user_id"].value_counts(sort=True)["count"]
    assert per_user[0] > 10 * per_user.median()  # Zipf: a few heavy users, a long tail
    assert events["user_id"].null_count() > 0  # some anonymous visitors

    types = dict(events["type"].value_counts().iter_rows())
    assert set(types) == {"pageview", "click", "error", "exception", "signup", "purchase"}
    assert types["pageview"] > types["click"] > types["error"]
    assert types["pageview"] / events.height > 0.5
    errors = events.filter(pl.col("type").is_in(["error", "exception"]))
    assert errors["error_message"].null_count() == 0 and errors["error_stack"].null_count() == 0
    others = events.filter(~pl.col("type").is_in(["error", "exception"]))
    assert others["error_message"].null_count() == others.height

    sessions = events.group_by("session_id").agg(
        n=pl.len(), users=pl.col("user_id").n_unique(), gaps=pl.col("timestamp").sort().diff()
    )
    assert sessions["users"].max() == 1  # a session belongs to one user
    assert sessions["n"].mean() > 3
    long_gaps = sessions.explode("gaps").filter(pl.col("gaps") > pl.duration(minutes=30))
    assert 10 <= long_gaps.height < sessions.height * 0.2  # some sessions split, most do not


def test_sample_timestamps(sample_items):
    lines = [orjson.loads(i.line) for i in sample_items if i.bad is None]
    styles = collections.Counter(
        "epoch_ms" if isinstance(e["timestamp"], int)
        else "iso_z" if e["timestamp"].endswith("Z")
        else "iso_offset"
        for e in lines
    )  # fmt: skip
    assert set(styles) == {"epoch_ms", "iso_z", "iso_offset"}
    assert styles["iso_z"] > styles["epoch_ms"]
    assert any(isinstance(e["timestamp"], str) and e["timestamp"].endswith("+02:00") for e in lines)

    events, _ = _decode(sample_items)
    ms = events["timestamp"].dt.epoch("ms")
    behind = ms.cum_max() - ms  # how far an event is behind the newest one before it
    late = [i for i in sample_items if i.bad is None and i.late]
    assert 20 <= len(late) <= 120
    assert (behind > 20_000).sum() >= len(late) * 0.8  # late events are minutes behind
    assert behind.max() <= 3_600_000 + 20_000
    assert (behind <= 20_000).mean() > 0.97  # otherwise bounded disorder
    span = (ms.max() - ms.min()) / 1000
    assert 7200 <= span < 7200 * 1.3
    assert events["timestamp"].min() == datetime(2024, 5, 1, 8, tzinfo=UTC)


def test_sample_ips_mostly_resolve(sample_items):
    events, _ = _decode(sample_items)
    ips = events["ip"].drop_nulls().to_list()
    resolved = 0
    with geoip2.database.Reader(str(BUNDLED_GEOIP_CITY_DB)) as reader:
        for ip in ips:
            try:
                reader.city(ip)
                resolved += 1
            except (geoip2.errors.AddressNotFoundError, ValueError):
                pass
    assert 0.9 < resolved / len(ips) < 1.0  # most, not all
    assert any(":" in ip for ip in ips) and any("." in ip for ip in ips)


def test_sample_user_agents(sample_items):
    events, _ = _decode(sample_items)
    agents = set(events["user_agent"].drop_nulls().to_list())
    assert len(agents) > 50
    assert agents <= set(load_user_agents())


# --- word lists -----------------------------------------------------------------------------------


def test_word_lists():
    resolvable, unresolvable = load_ips()
    assert len(resolvable) > 100 and 5 <= len(unresolvable) < 30
    with geoip2.database.Reader(str(BUNDLED_GEOIP_CITY_DB)) as reader:
        for ip in resolvable:
            assert reader.city(ip).country.iso_code, ip
        for ip in unresolvable:
            with pytest.raises((geoip2.errors.AddressNotFoundError, ValueError)):
                reader.city(ip)
    assert any(ipaddress.ip_address(ip).is_private for ip in unresolvable if ip[0].isdigit())
    agents = load_user_agents()
    assert 200 <= len(agents) <= 400
    assert {"curl/8.5.0", "python-requests/2.31.0"} <= set(agents)
    assert any("Googlebot" in a for a in agents)
    data_dir = Path(__file__).resolve().parents[2] / "bench" / "data"
    assert (data_dir / "LICENSE-uap-core").read_text().startswith("Apache License")
    assert "Permission is hereby granted" in (data_dir / "LICENSE-MIT").read_text()
