"""Exactly-once under crashes: SIGKILLs at random moments, and rescaling, against a clean run.

The long version is `make chaos` (50 kills); see tests/chaos.py.
"""

from __future__ import annotations

import random
import uuid

import pytest
from confluent_kafka import TopicPartition

from connectors import kafka
from dataflows.config import Settings
from tests import chaos

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    unique = f"eo{uuid.uuid4().hex[:8]}"
    raw = f"{unique}.raw"
    items = chaos.produce_input(Settings(), raw, 30_000, seed=3)
    workdir = tmp_path_factory.mktemp("eo")
    clean = chaos.Run(f"{unique}.clean", raw, workdir / "clean")
    chaos.run_clean(clean)
    return unique, raw, workdir, clean, items


def test_random_sigkills_change_nothing(scenario):
    unique, raw, workdir, clean, items = scenario
    crashed = chaos.Run(f"{unique}.crashed", raw, workdir / "crashed")
    crashed.env.update(PIPELINE_SINKS="local,kafka,postgres", POSTGRES_SCHEMA=f"{unique}_crashed")
    landed = chaos.run_with_kills(crashed, 10, rng=random.Random(7), min_s=1.0, max_s=4.0)
    assert landed >= 5, "most kills should land while the run is still going"
    assert chaos.compare(clean, crashed) == []
    assert chaos.postgres_state(crashed.settings) == chaos.expected_postgres_state(clean)
    settings = crashed.settings
    reader = kafka.consumer(settings)
    parts = [TopicPartition(raw, p) for p in range(chaos.RAW_PARTITIONS)]
    committed = [tp.offset for tp in reader.committed(parts, timeout=10)]
    ends = [reader.get_watermark_offsets(tp, timeout=10)[1] for tp in parts]
    reader.close()
    assert committed == ends and sum(ends) == len(items)


def test_rescale_one_to_two_to_one_process(scenario):
    unique, raw, workdir, clean, _ = scenario
    rescaled = chaos.Run(f"{unique}.rescaled", raw, workdir / "rescaled")
    counts = [1, 2, 2, 1]
    chaos.run_with_kills(
        rescaled,
        len(counts) - 1,
        rng=random.Random(11),
        min_s=3.0,
        max_s=5.0,
        processes_per_attempt=lambda attempt: counts[attempt],
    )
    assert chaos.compare(clean, rescaled) == []


def test_kafka_outage_mid_run_loses_and_doubles_nothing(scenario):
    unique, raw, workdir, clean, _ = scenario
    run = chaos.Run(f"{unique}.kafka-outage", raw, workdir / "kafka-outage")
    run.env["PIPELINE_BATCH_SIZE"] = "100"  # slow enough for the outage to land mid-run
    chaos.run_with_outage(run, "kafka", outage_s=30)
    assert chaos.compare(clean, run) == []


def test_postgres_outage_mid_run_loses_and_doubles_nothing(scenario):
    unique, raw, workdir, clean, _ = scenario
    run = chaos.Run(f"{unique}.pg-outage", raw, workdir / "pg-outage")
    run.env.update(
        PIPELINE_SINKS="local,kafka,postgres",
        POSTGRES_SCHEMA=f"{unique}_pg_outage",
        PIPELINE_BATCH_SIZE="100",
    )
    chaos.run_with_outage(run, "postgres", outage_s=30)
    assert chaos.compare(clean, run) == []
    assert chaos.postgres_state(run.settings) == chaos.expected_postgres_state(clean)
