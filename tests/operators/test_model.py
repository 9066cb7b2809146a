from datetime import UTC, datetime

import polars as pl
import pyarrow as pa

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


def test_texts_and_millis_is_the_select_it_replaces():
    frame = pl.DataFrame(
        {
            "tenant": pl.Series(["acme", None, "globex"], dtype=pl.Categorical),
            "user_id": ["u-1", "u-2", None],
            "timestamp": [datetime(2024, 5, 1, 8, 0, 0, 1000 * ms, UTC) for ms in (0, 1, 999)],
        }
    )
    expected = frame.select(
        pl.col("tenant", "user_id").cast(pl.String), pl.col("timestamp").dt.epoch("ms")
    )
    got = model.texts_and_millis(frame, ("tenant", "user_id"))
    assert got.equals(expected) and got.schema == expected.schema
    assert got["timestamp"].to_list() == [1714550400000, 1714550400001, 1714550400999]


def test_frame_of_arrays_is_what_from_arrow_makes_of_the_table():
    arrays = [
        pa.array(["a", None, "a long value past twelve bytes"], pa.string_view()),
        pa.array([1, None, 3], pa.int32()),
        pa.array([0, 1, None], pa.timestamp("ms", tz="UTC")),
    ]
    names = ["text", "number", "at"]
    expected = pl.from_arrow(pa.Table.from_arrays(arrays, names=names))
    got = model.frame_of_arrays(names, arrays)
    assert got.equals(expected) and got.schema == expected.schema
    assert got.schema == {"text": pl.String, "number": pl.Int32, "at": pl.Datetime("ms", "UTC")}
