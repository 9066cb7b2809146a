"""Which worker Bytewax runs things on, and keys that keep a partition's stream on its worker.

Bytewax 0.21 places, with W workers in the whole dataflow,

* partition `i` of the sorted partition names of a `FixedPartitionedSource` or
  `FixedPartitionedSink` on worker `i % W`; a sink's `part_fn` value `v` picks sorted partition
  `v % len(parts)`;
* the state of key `k` of a stateful step on worker `route(k, W)`: Rust's `DefaultHasher`
  (SipHash-1-3, zero keys) over the key's UTF-8 bytes and a 0xFF terminator, modulo W.

A batch read from Kafka partition `p` is pickled, sent to the other process and unpickled whenever
its event-time gate or one of its sinks lives on a worker of another process (a tenth of a busy
two-process job). So the gate is keyed by `colocated_key(partition)`, a key that Bytewax routes to
worker `p % W` for every W dividing `ROUTING_MODULUS` (1-10, 12, 14, 15, 16, 18, 20, 21, 24, ...),
without knowing W; and a sink writes each item through the part on the worker of the step that
emitted it (`sink_part`) when W also divides the number of parts.

The gate's worker is the one reading partition `p` while the topic's partition names sort in
number order (up to 10 partitions; beyond, some partitions sit elsewhere, more so with more
workers). Placement is only about speed: any key and any part give the same results.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

import pyarrow as pa
import pyarrow.compute as pc

# 7!: divisible by every worker count up to 10 and by 12, 14, 15, 16, 18, 20, 21, 24, 28, 30, ...
ROUTING_MODULUS = 5040

_SOURCE_PARTITION = re.compile(r"^.+/(\d+)$")  # `<topic>/<partition>`
_SHARD = re.compile(r"^shard-\d+$")  # `operators.sharding.shard_key`
_NONCE_DIGITS = 6  # every candidate key `<partition>~NNNNNN` has the same length
_NONCES_PER_ROUND = 4096  # candidates hashed at once; ROUTING_MODULUS tries are expected
_U64 = pa.uint64()


def partition_number(key: str) -> int | None:
    """The number of a source partition (`events.raw/7`: 7)."""
    match = _SOURCE_PARTITION.match(key)
    return int(match.group(1)) if match else None


@lru_cache(maxsize=4096)
def sink_part(key: str) -> int:
    """A sink's `part_fn` for items keyed by what emitted them: a value whose part (the value
    modulo the parts) is on that step's worker whenever W divides both ROUTING_MODULUS and the
    number of parts. A source partition's streams come from its worker (the map steps and its
    clock, `colocated_key`): `p`. A shard's rows come from its state's worker, `route(shard)`:
    the shard key's hash modulo ROUTING_MODULUS. Anything else: its CRC32."""
    number = partition_number(key)
    if number is not None:
        return number
    if _SHARD.match(key):
        return route(key, ROUTING_MODULUS)
    return zlib.crc32(key.encode())


def route(key: str, workers: int) -> int:
    """The worker Bytewax runs the state of `key` on."""
    return _siphash13([key.encode()])[0].as_py() % workers


@lru_cache(maxsize=4096)
def colocated_key(partition: str) -> str:
    """A state key for source partition `<topic>/<p>` that every W dividing ROUTING_MODULUS
    routes to worker `p % W`: `<topic>/<p>~NNNNNN`, the first nonce that does. A name without a
    partition number stays as it is."""
    p = partition_number(partition)
    if p is None:
        return partition
    target = pa.scalar(p % ROUTING_MODULUS, _U64)
    for start in range(0, 10**_NONCE_DIGITS, _NONCES_PER_ROUND):
        stop = min(start + _NONCES_PER_ROUND, 10**_NONCE_DIGITS)
        keys = [f"{partition}~{n:0{_NONCE_DIGITS}d}".encode() for n in range(start, stop)]
        residues = _modulo(_siphash13(keys), ROUTING_MODULUS)
        hits = pc.indices_nonzero(pc.equal(residues, target))
        if len(hits):
            return keys[hits[0].as_py()].decode()
    return partition  # not reached: no fit among a million nonces has probability e^-198


def _modulo(values: pa.Array, divisor: int) -> pa.Array:
    d = pa.scalar(divisor, _U64)
    return pc.subtract(values, pc.multiply(pc.divide(values, d), d))


def _siphash13(keys: list[bytes]) -> pa.Array:
    """Bytewax's hash of each key (all of one length): SipHash-1-3 with zero keys over the key's
    bytes and a 0xFF terminator, one column per 8-byte word of the keys."""
    length = len(keys[0]) + 1
    words = length // 8 + 1  # whole words, then the rest with the length's low byte on top
    closing = bytes(words * 8 - length - 1) + bytes([length & 0xFF])
    packed = b"".join(key + b"\xff" + closing for key in keys)
    matrix = pa.Array.from_buffers(_U64, len(keys) * words, [None, pa.py_buffer(packed)])
    starts = pa.array(range(0, len(keys) * words, words), pa.int64())
    columns = [pc.take(matrix, pc.add(starts, w)) for w in range(words)]

    def const(value: int) -> pa.Array:
        return pa.array([value] * len(keys), _U64)

    def rotl(x, bits):
        return pc.bit_wise_or(
            pc.shift_left(x, pa.scalar(bits, _U64)), pc.shift_right(x, pa.scalar(64 - bits, _U64))
        )

    v = [
        const(0x736F6D6570736575),
        const(0x646F72616E646F6D),
        const(0x6C7967656E657261),
        const(0x7465646279746573),
    ]

    def sip_round():
        v[0] = pc.add(v[0], v[1])
        v[1] = pc.bit_wise_xor(rotl(v[1], 13), v[0])
        v[0] = rotl(v[0], 32)
        v[2] = pc.add(v[2], v[3])
        v[3] = pc.bit_wise_xor(rotl(v[3], 16), v[2])
        v[0] = pc.add(v[0], v[3])
        v[3] = pc.bit_wise_xor(rotl(v[3], 21), v[0])
        v[2] = pc.add(v[2], v[1])
        v[1] = pc.bit_wise_xor(rotl(v[1], 17), v[2])
        v[2] = rotl(v[2], 32)

    for word in columns:
        v[3] = pc.bit_wise_xor(v[3], word)
        sip_round()
        v[0] = pc.bit_wise_xor(v[0], word)
    v[2] = pc.bit_wise_xor(v[2], pa.scalar(0xFF, _U64))
    for _ in range(3):
        sip_round()
    return pc.bit_wise_xor(pc.bit_wise_xor(v[0], v[1]), pc.bit_wise_xor(v[2], v[3]))
