"""The Kafka sink's replay ledger: what a resumed sink partition skips or re-numbers (no servers)."""

from connectors.kafka import ReplayLedger


def window(count: int, revision: int) -> dict:
    return {"tenant": "a", "window": "1m", "count": count, "revision": revision}


def test_events_already_committed_are_skipped_others_written():
    ledger = ReplayLedger(revisioned=False)
    ledger.record("events.raw/0/7", None)
    assert ledger.admit("events.raw/0/7", {"x": 1}) is None
    assert ledger.admit("events.raw/0/8", {"x": 2}) == {"x": 2}


def test_a_replayed_revision_with_committed_content_is_skipped():
    ledger = ReplayLedger(revisioned=True)
    ledger.record("w", window(10, 0))
    ledger.record("w", window(12, 1))
    assert ledger.admit("w", window(10, 0)) is None
    assert ledger.admit("w", window(12, 0)) is None  # same totals, other revision: still there


def test_new_content_after_a_replay_gets_a_revision_above_the_committed_ones():
    ledger = ReplayLedger(revisioned=True)
    ledger.record("w", window(10, 0))
    ledger.record("w", window(11, 1))
    assert ledger.admit("w", window(12, 0)) == window(12, 2)
    assert ledger.admit("w", window(13, 1)) == window(13, 3)  # stays increasing afterwards
    assert ledger.admit("w", window(14, 7)) == window(14, 7)  # already above: kept as it is
    assert ledger.floors == {"w": 7}


def test_keys_the_replay_never_committed_pass_through():
    ledger = ReplayLedger(revisioned=True)
    ledger.record("w", window(10, 0))
    assert ledger.admit("other", window(1, 0)) == window(1, 0)


def test_after_a_new_revision_committed_content_is_written_again_above_it():
    # Committed before the crash: 10 (rev 0), 12 (rev 1). The replay passes through 11 first.
    ledger = ReplayLedger(revisioned=True)
    ledger.record("w", window(10, 0))
    ledger.record("w", window(12, 1))
    assert ledger.admit("w", window(11, 1)) == window(11, 2)
    # 12 is committed, but 11 is the latest revision now: 12 must come again to be the latest.
    assert ledger.admit("w", window(12, 2)) == window(12, 3)


def test_a_ledger_is_active_while_it_can_skip_or_renumber():
    assert not ReplayLedger(revisioned=False).active
    ledger = ReplayLedger(revisioned=False)
    ledger.record("events.raw/0/7", None)
    assert ledger.active
    assert ReplayLedger(revisioned=True, floors={"w": 3}).active
