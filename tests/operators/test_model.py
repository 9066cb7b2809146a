from datetime import UTC, datetime

from operators import model


def test_utc_now_iso_formats_the_millisecond_of_the_wall_clock(monkeypatch):
    stamps = iter([1_796_639_757_219_999_999, 1_796_639_757_219_000_000, 1_796_639_757_220_000_001])
    monkeypatch.setattr(model.time, "time_ns", lambda: next(stamps))
    assert model.utc_now_iso() == "2026-12-07T10:35:57.219Z"
    assert model.utc_now_iso() == "2026-12-07T10:35:57.219Z"  # the same millisecond
    assert model.utc_now_iso() == "2026-12-07T10:35:57.220Z"


def test_utc_now_iso_is_what_datetime_writes_now():
    before = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    stamp = model.utc_now_iso()
    after = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert before <= stamp <= after and stamp.endswith("Z") and len(stamp) == 24
