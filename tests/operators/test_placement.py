"""Placement: our model of where Bytewax runs a key agrees with where a real Bytewax dataflow runs
it, and the gate's keys land on the worker that reads their partition."""

import threading
import zlib

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.testing import cluster_main

from operators.placement import ROUTING_MODULUS, colocated_key, partition_number, route, sink_part


class _OneItem(StatefulSourcePartition):
    def __init__(self, name: str):
        self._name = name
        self._sent = False

    def next_batch(self):
        if self._sent:
            raise StopIteration
        self._sent = True
        return [self._name]

    def snapshot(self):
        return None


class _Parts(FixedPartitionedSource):
    """Partitions with the given names; notes the thread (worker) each is read on."""

    def __init__(self, names: list[str], seen: dict):
        self._names = names
        self._seen = seen

    def list_parts(self):
        return self._names

    def build_part(self, step_id, for_part, resume_state):
        self._seen[("part", for_part)] = threading.get_ident()
        return _OneItem(for_part)


class _NoteKey(StatefulBatchLogic):
    def __init__(self, seen: dict):
        self._seen = seen

    def on_batch(self, keys):
        self._seen[("key", keys[0])] = threading.get_ident()
        return [], StatefulBatchLogic.DISCARD

    def snapshot(self):
        return None


def _placements(parts: list[str], keys: list[str], workers: int) -> dict:
    """Run a dataflow on `workers` threads; the thread each part is read on and each key's state
    runs on."""
    seen: dict = {}
    flow = Dataflow("placement")
    names = op.input("parts", flow, _Parts(parts, seen))
    # every key once, sent from the first partition's worker
    keyed = op.flat_map(
        "keys", names, lambda name: [(k, k) for k in keys] if name == parts[0] else []
    )
    op.inspect("done", op.stateful_batch("note", keyed, lambda resume: _NoteKey(seen)))
    cluster_main(flow, [], 0, worker_count_per_proc=workers)
    return seen


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_route_is_where_bytewax_runs_a_key(workers):
    # Bytewax reads partition i of the sorted names on worker i % W: that names the threads
    parts = [f"p{i:02d}" for i in range(workers * 2)]
    keys = [f"events.raw/{i}" for i in range(12)] + [f"shard-{i:03d}" for i in range(8)]
    keys += ["x" * n for n in range(18)] + ["é/3"]  # every length modulo 8, and non-ASCII
    seen = _placements(parts, keys, workers)
    thread_of_worker = {i % workers: seen[("part", name)] for i, name in enumerate(sorted(parts))}
    assert len(set(thread_of_worker.values())) == workers
    for key in keys:
        assert seen[("key", key)] == thread_of_worker[route(key, workers)], key


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_a_partitions_clock_runs_where_the_partition_is_read(workers):
    parts = [f"events.raw/{p}" for p in range(8)]
    seen = _placements(parts, [colocated_key(p) for p in parts], workers)
    for part in parts:
        assert seen[("key", colocated_key(part))] == seen[("part", part)], part


def test_colocated_keys_route_to_their_partition_number_for_every_dividing_worker_count():
    divisors = [w for w in range(1, 50) if ROUTING_MODULUS % w == 0]
    assert divisors[:12] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14]
    for p in [*range(20), 1000, 5039, 5040, 123456]:
        key = colocated_key(f"events.raw/{p}")
        assert key.startswith(f"events.raw/{p}~")
        assert [route(key, w) for w in divisors] == [p % w for w in divisors]


def test_colocated_keys_are_stable():
    first = colocated_key("bench.run.raw/3")
    colocated_key.cache_clear()
    assert colocated_key("bench.run.raw/3") == first
    assert len({colocated_key(f"t/{p}") for p in range(16)}) == 16


def test_a_name_without_a_partition_number_is_its_own_key():
    assert colocated_key("events.jsonl") == "events.jsonl"
    assert colocated_key("shard-003") == "shard-003"  # not a source partition


def test_sink_parts_are_on_the_worker_of_the_step_that_emits_the_items():
    assert partition_number("events.raw/12") == 12
    assert partition_number("a/b/3") == 3
    assert partition_number("events.raw") is None
    assert partition_number("shard-007") is None
    parts = 4  # sink partitions; a multiple of the worker count
    for workers in (1, 2, 4):
        for p in range(12):  # a source partition's streams: where the partition is read (p % W)
            assert sink_part(f"events.raw/{p}") % parts % workers == p % workers
        for shard in range(8):  # a shard's rows: where the shard's state is
            key = f"shard-{shard:03d}"
            assert sink_part(key) % parts % workers == route(key, workers)
    assert sink_part("events.jsonl") == zlib.crc32(b"events.jsonl")
