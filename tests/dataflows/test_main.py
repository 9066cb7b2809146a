"""End to end: the dataflow on a generated stream, checked against an independent computation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from bytewax.testing import run_main

from bench.workload import generate_items
from connectors.files import read_json_lines
from dataflows.config import Settings
from dataflows.main import build
from tests.dataflows import truth

N = 20_000


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> tuple[Path, list]:
    items = list(
        generate_items(
            N,
            seed=11,
            start="2024-06-01T00:00:00Z",
            span_s=4 * 3600,
            late_fraction=0.02,
            bad_fraction=0.02,
            include_too_large=True,
        )
    )
    path = tmp_path_factory.mktemp("input") / "events.jsonl"
    path.write_bytes(b"".join(item.line + b"\n" for item in items))
    return path, items


def run(stream_path: Path, out: Path, **settings) -> dict[str, list[dict]]:
    run_main(
        build(
            Settings(
                pipeline_input=f"file:{stream_path}",
                pipeline_output_dir=out,
                pipeline_batch_size=1000,
                **settings,
            )
        )
    )
    return {
        name: list(read_json_lines(out / name))
        for name in ("enriched", "aggregates", "sessions", "late", "dlq")
    }


@pytest.fixture(scope="module")
def reaggregated(stream, tmp_path_factory):
    return run(stream[0], tmp_path_factory.mktemp("out"))


def test_every_valid_event_is_enriched_once(stream, reaggregated):
    _, items = stream
    expected = truth.valid_events(items)["event_id"].to_list()
    got = [row["event_id"] for row in reaggregated["enriched"]]
    assert len(got) == len(set(got))
    assert sorted(got) == sorted(expected)


def test_dlq_counts_per_reason_are_exact(stream, reaggregated):
    _, items = stream
    expected = truth.dlq_reasons(items)
    assert set(expected) >= {
        "malformed_json",
        "not_an_object",
        "missing_schema_urn",
        "unknown_schema",
        "unsupported_version",
        "missing_field",
        "bad_timestamp",
        "bad_type",
        "too_large",
    }
    assert Counter(row["reason"] for row in reaggregated["dlq"]) == expected
    sources = {row["source"] for row in reaggregated["dlq"]}
    assert len(sources) == sum(expected.values())  # one DLQ record per bad line


def test_late_events_are_exactly_those_behind_the_watermark(stream, reaggregated):
    _, items = stream
    expected = truth.late_event_ids(truth.valid_events(items), allowed_lateness_ms=60_000)
    assert expected  # the stream does contain late events
    assert {row["event_id"] for row in reaggregated["late"]} == expected


def test_highest_window_revisions_equal_exact_totals(stream, reaggregated):
    _, items = stream
    expected = truth.window_totals(truth.valid_events(items))
    got = truth.final_windows(reaggregated["aggregates"])
    assert got == expected
    assert any(row["revision"] > 0 for row in reaggregated["aggregates"])  # late corrections


def test_sessions_equal_first_last_and_count(stream, reaggregated):
    _, items = stream
    expected = truth.sessions(truth.valid_events(items), gap_ms=1_800_000)
    assert truth.final_sessions(reaggregated["sessions"]) == expected


def test_drop_policy_keeps_late_events_out_of_windows(stream, tmp_path):
    _, items = stream
    out = run(stream[0], tmp_path, pipeline_late_policy="drop")
    events = truth.valid_events(items)
    late = truth.late_event_ids(events, allowed_lateness_ms=60_000)
    on_time = events.filter(~events["event_id"].is_in(list(late)))
    assert {row["event_id"] for row in out["late"]} == late
    assert all(row["revision"] == 0 for row in out["aggregates"])
    assert truth.final_windows(out["aggregates"]) == truth.window_totals(on_time)
