"""`SnapshotLog`: chunked snapshots restore exactly the state they were sealed from, only the
changes are pickled anew, and dead copies do not pile up."""

import datetime
import pickle
import random

import pytest

from operators.snapshot_log import SnapshotLog


def encode(keys: list, current: dict) -> dict:
    return {"keys": keys, "values": [current[key] for key in keys]}


def decode(chunk: dict) -> tuple[list, list]:
    return chunk["keys"], chunk["values"]


class Expiring:
    """A state as the log expects one: each value is (revision, expires_at), an entry is only
    deleted once the horizon passes its expiry, and an update never moves the expiry back."""

    def __init__(self):
        self.entries: dict[int, tuple[int, int]] = {}
        self.horizon = 0
        self.log = SnapshotLog(encode, decode)

    def put(self, key: int, expires_at: int) -> None:
        revision, before = self.entries.get(key, (-1, 0))
        self.entries[key] = (revision + 1, max(before, expires_at))
        self.log.changed.add(key)

    def advance(self, horizon: int) -> None:
        self.horizon = horizon
        for key in [k for k, (_, expiry) in self.entries.items() if expiry <= horizon]:
            del self.entries[key]
            self.log.changed.add(key)

    def snapshot(self) -> bytes:
        return pickle.dumps((self.horizon, self.log.seal(self.entries)))

    @classmethod
    def restore(cls, snapshot: bytes) -> "Expiring":
        state = cls()
        state.horizon, chunks = pickle.loads(snapshot)
        state.entries = state.log.load(chunks, lambda _, value: value[1] > state.horizon)
        return state


def test_unchanged_chunks_are_handed_over_as_they_were():
    log = SnapshotLog(encode, decode)
    entries = {key: key * 10 for key in range(1000)}
    log.changed.update(entries)
    first = log.seal(entries)
    assert len(first) == 1
    entries[7] = -1
    log.changed.add(7)
    second = log.seal(entries)
    assert second[0] is first[0]  # the old chunk is not pickled again
    assert pickle.loads(second[1]) == {"keys": [7], "values": [-1]}
    assert log.seal(entries) == second  # nothing changed, nothing sealed
    assert log.stats() == {
        "chunks": 2,
        "bytes": len(first[0]) + len(second[1]),
        "entries": 1001,
        "live": 1000,
    }
    restored = SnapshotLog(encode, decode).load(second, lambda key, value: True)
    assert restored == entries


@pytest.mark.parametrize("seed", range(5))
def test_a_restored_state_is_the_state_and_goes_on_like_it(seed):
    rng = random.Random(seed)
    state = Expiring()
    now = 0
    for epoch in range(400):
        now += 10
        for _ in range(rng.choice([0, 1, 5, 50])):
            key = int(rng.paretovariate(1.2) * 10) % 5000  # a few hot keys, a long tail
            state.put(key, now + rng.randrange(1, 2000))
        state.advance(now - 500)
        snapshot = state.snapshot()
        restored = Expiring.restore(snapshot)
        assert restored.entries == state.entries, epoch
        if epoch % 37 == 0:  # resume from here: the restored state's later snapshots stay exact
            state = restored
        chunks = pickle.loads(snapshot)[1]
        live = max(len(state.entries), 1)
        written = sum(len(pickle.loads(chunk)["keys"]) for chunk in chunks)
        assert written <= 3 * live + 100, epoch  # dead copies are rewritten away
        assert len(chunks) <= 2 + live.bit_length(), epoch  # chunks grow with age


def test_a_state_of_a_few_hot_keys_pickles_only_them():
    log = SnapshotLog(encode, decode)
    entries = {key: 0 for key in range(100_000)}
    log.changed.update(entries)
    log.seal(entries)
    fresh_bytes = []
    for step in range(1, 50):
        for key in range(10):
            entries[key] = step
        log.changed.update(range(10))
        chunks = log.seal(entries)
        fresh_bytes.append(len(chunks[-1]))
    assert len(chunks) == 2
    assert max(fresh_bytes) < 200  # the 10 hot entries, not the 100,000 cold ones


def test_a_chunk_holding_anything_but_builtins_is_refused():
    chunk = pickle.dumps(encode([1], {1: datetime.date(2024, 1, 1)}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load datetime.date"):
        SnapshotLog(encode, decode).load([chunk], lambda key, value: True)


def test_a_chunk_that_is_half_dead_is_rewritten_with_its_live_entries():
    state = Expiring()
    for key in range(1000):
        state.put(key, expires_at=key)
    state.snapshot()
    state.advance(399)  # 400 of the first chunk's entries expire: it stays
    assert [len(pickle.loads(c)["keys"]) for c in pickle.loads(state.snapshot())[1]] == [1000]
    state.advance(599)  # 600 gone: what is left is written again, on its own
    chunks = pickle.loads(state.snapshot())[1]
    assert [pickle.loads(c)["keys"] for c in chunks] == [list(range(600, 1000))]
