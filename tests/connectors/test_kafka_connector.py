from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime

import orjson
import polars as pl
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from connectors import kafka
from dataflows import priorities
from dataflows.config import Settings
from dataflows.outputs import KAFKA_FORMATS
from operators.model import RawRecord, arrow_columns, as_dicts
from tests import chaos


def test_producer_config_defaults_and_overrides():
    settings = Settings(kafka_bootstrap_servers="broker:1234")
    conf = kafka.producer_config(settings, transactional_id="tx-1", **{"linger.ms": 20})
    assert conf == {
        "bootstrap.servers": "broker:1234",
        "enable.idempotence": True,
        "acks": "all",
        "transactional.id": "tx-1",
        "linger.ms": 20,
    }
    assert "transactional.id" not in kafka.producer_config(settings)


def test_sink_producer_tuning_gives_way_to_kafka_config():
    settings = Settings(
        kafka_bootstrap_servers="b:1",
        kafka_compression="none",
        kafka_config={"compression.type": "zstd"},
    )
    conf = kafka.sink_producer_config(settings, "tx-2")
    assert conf == {
        "bootstrap.servers": "b:1",
        "compression.type": "zstd",
        "enable.idempotence": True,
        "acks": "all",
        "transactional.id": "tx-2",
        "linger.ms": 20,
        "transaction.timeout.ms": 600_000,
        "message.timeout.ms": 590_000,
        "delivery.report.only.error": True,
    }
    default = kafka.sink_producer_config(Settings(kafka_bootstrap_servers="b:1"), "tx-2")
    assert default["compression.type"] == "lz4"
    plain = Settings(kafka_bootstrap_servers="b:1", kafka_compression="none")
    assert kafka.sink_producer_config(plain, "tx-2")["compression.type"] == "none"
    with pytest.raises(ValueError, match="kafka_compression"):
        Settings(kafka_compression="brotli")


def test_source_prefetch_is_bounded_unless_kafka_config_sets_it():
    tuning = kafka.SOURCE_CONSUMER_TUNING
    assert kafka.unless_configured(Settings(), tuning) == {"queued.max.messages.kbytes": 8192}
    own = Settings(kafka_config={"queued.max.messages.kbytes": 65536})
    assert kafka.unless_configured(own, tuning) == {}


def test_consumer_config_defaults_and_overrides():
    settings = Settings(kafka_consumer_group="g1")
    conf = kafka.consumer_config(settings, **{"isolation.level": "read_uncommitted"})
    assert conf["group.id"] == "g1"
    assert conf["isolation.level"] == "read_uncommitted"
    assert conf["enable.auto.commit"] is False
    assert conf["auto.offset.reset"] == "earliest"
    assert kafka.consumer_config(settings, group_id="g2")["group.id"] == "g2"
    assert kafka.consumer_config(settings)["isolation.level"] == "read_committed"


def test_pipeline_topics_lists_every_topic_setting():
    settings = Settings()
    topic_fields = {name for name in Settings.model_fields if name.startswith("kafka_topic_")}
    assert sorted(kafka.pipeline_topics(settings)) == sorted(
        getattr(settings, name) for name in topic_fields
    )


def _drain(consumer: Consumer, topic: str, timeout_s: float = 30.0) -> list[bytes]:
    """Every value of partition 0 from the beginning up to its end (EOF), in order."""
    consumer.assign([TopicPartition(topic, 0, 0)])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() == KafkaError._PARTITION_EOF:
                return values
            raise AssertionError(msg.error())
        values.append(msg.value())
    raise AssertionError(f"no end of partition within {timeout_s}s; got {values}")


@pytest.mark.servers
def test_transactions_read_committed_skips_aborted(settings: Settings, unique: str):
    topic = f"{unique}.tx"
    assert kafka.ensure_topics(settings, [topic], partitions=1) == [topic]
    assert kafka.ensure_topics(settings, [topic], partitions=1) == []

    producer = kafka.producer(settings, transactional_id=f"{unique}-producer")
    producer.init_transactions(30)

    producer.begin_transaction()
    producer.produce(topic, b"committed-1", key=b"k")
    producer.produce(topic, b"committed-2", key=b"k")
    producer.commit_transaction(30)

    producer.begin_transaction()
    producer.produce(topic, b"aborted-1", key=b"k")
    producer.flush(30)  # on the broker, so only the isolation level can hide it
    producer.abort_transaction(30)

    producer.begin_transaction()
    producer.produce(topic, b"committed-3", key=b"k")
    producer.commit_transaction(30)

    committed = kafka.consumer(settings, group_id=f"{unique}-rc", **{"enable.partition.eof": True})
    uncommitted = kafka.consumer(
        settings,
        group_id=f"{unique}-ru",
        **{"enable.partition.eof": True, "isolation.level": "read_uncommitted"},
    )
    try:
        assert _drain(committed, topic) == [b"committed-1", b"committed-2", b"committed-3"]
        # The aborted record is in the log: a read_uncommitted consumer does see it.
        assert _drain(uncommitted, topic) == [
            b"committed-1",
            b"committed-2",
            b"aborted-1",
            b"committed-3",
        ]
    finally:
        committed.close()
        uncommitted.close()


@pytest.mark.servers
def test_ensure_topics_creates_requested_partitions(settings: Settings, unique: str):
    topic = f"{unique}.parts"
    assert kafka.ensure_topics(settings, [topic, topic], partitions=3) == [topic]
    metadata = kafka.admin(settings).list_topics(topic, timeout=30)
    assert sorted(metadata.topics[topic].partitions) == [0, 1, 2]


# --- the exactly-once sink -------------------------------------------------------------------


def _tricky_frame() -> pl.DataFrame:
    """Values whose JSON is easy to get wrong: escapes, non-ASCII, nulls, float forms, Float32,
    datetimes with and without a time zone."""
    texts = [
        "plain",
        "ünï©ødé 日本 🎉",
        'q"uote\\back/slash',
        "ctl\x00\x1f\x7f\t\n",
        "\u2028",
        None,
    ]
    floats = [0.1, 1e20, 1e-7, -0.0, 123456789.123456789, None]
    stamp = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    return pl.DataFrame(
        {
            "text": texts,
            "f64": floats,
            "f32": floats,
            "i32": [-3, 0, 7, None, 2**31 - 1, 1],
            "u64": [2**64 - 1, 0, 1, 2, 3, None],
            "flag": [True, False, None, True, False, True],
            "at": [stamp, None, stamp, stamp, stamp, stamp],
            "naive": [stamp.replace(tzinfo=None)] * 6,
            "nothing": [None] * 6,
            "source": [f"events.raw/0/{i}" for i in range(6)],
        },
        schema_overrides={
            "f32": pl.Float32,
            "i32": pl.Int32,
            "u64": pl.UInt64,
            "at": pl.Datetime("us", "UTC"),
            "naive": pl.Datetime("ms"),
        },
    )


def test_frame_values_are_exactly_orjson_of_as_dicts(monkeypatch):
    frame = _tricky_frame()
    expected = [orjson.dumps(row) for row in as_dicts(frame)]
    if kafka._native_json_rows is not None:  # built by `make install`
        assert kafka._native_values(frame) == expected
        assert kafka._native_values(frame.slice(2, 3)) == expected[2:5]
        # a column type it does not write (a list): the frame is left to the other paths
        assert kafka._native_values(frame.with_columns(pl.concat_list("i32").alias("l"))) is None
    assert kafka._json_values(frame) == expected
    monkeypatch.setattr(kafka, "_native_json_rows", None)
    assert kafka._json_values(frame) == expected
    # A type polars would write otherwise (a list) goes row by row: the same bytes.
    listed = frame.with_columns(pl.concat_list("i32", "i32").alias("pair"))
    assert kafka._json_values(listed) == [orjson.dumps(row) for row in as_dicts(listed)]


def test_compiled_values_of_an_enriched_batch_are_exactly_orjson_of_as_dicts():
    pytest.importorskip("pipeline_native")
    stamps = [-1, 0, 1714550400123, 253402300799999, 7258118399999]
    frame = pl.DataFrame(
        {
            "at": pl.Series(stamps, dtype=pl.Int64).cast(pl.Datetime("ms", "UTC")),
            "us": pl.Series([s * 1000 - 1 for s in stamps]).cast(pl.Datetime("us")),
            "ns": pl.Series([-1, 0, 1714550400123456789, 999_999, None], dtype=pl.Int64).cast(
                pl.Datetime("ns", "UTC")
            ),
            "lat": [51.5142, -0.0, float("nan"), float("inf"), 1e-7],
            "small": pl.Series([1, -128, 127, 0, None], dtype=pl.Int8),
        }
    )
    assert kafka._native_values(frame) == [orjson.dumps(row) for row in as_dicts(frame)]
    empty = pl.DataFrame({"s": ["", None], "n": pl.Series([None, None], dtype=pl.Int64)})
    assert kafka._native_values(empty) == [orjson.dumps(row) for row in as_dicts(empty)]
    # years past 9999 are left to the other paths
    beyond = pl.DataFrame({"at": pl.Series([253402300800000]).cast(pl.Datetime("ms", "UTC"))})
    assert kafka._native_values(beyond) is None


def test_compiled_values_read_string_views_inline_and_in_several_data_buffers():
    pytest.importorskip("pipeline_native")
    first = pl.DataFrame({"s": [f"a long value number {i}, past 12 bytes" for i in range(900)]})
    second = pl.DataFrame({"s": [f'a "quoted" one, ünï {i}' for i in range(900)] + ["é", None, ""]})
    frame = pl.concat([first, second], rechunk=False)  # one array over several data buffers
    _arrays, ((_, type_name, _, buffers),) = arrow_columns(frame, string_views=True)
    assert (type_name, len(buffers) > 3) == ("string_view", True)
    for rows in (frame, frame.slice(890, 20), frame.tail(3)):
        assert kafka._native_values(rows) == [orjson.dumps(row) for row in as_dicts(rows)]


def test_compiled_values_escape_at_every_position_of_the_scan():
    pytest.importorskip("pipeline_native")
    # the scan reads sixteen bytes at a time, then eight, then one: put each kind of escaped byte
    # (and its neighbours that must not be escaped) at every offset of values up to three
    # sixteen-byte blocks long
    specials = ['"', "\\", "\x00", "\x1f", "\n", " ", "\x7f", "é", "!", "#", "[", "]"]
    texts = [
        "x" * at + special + "y" * (length - at - 1)
        for length in range(1, 50)
        for at in range(length)
        for special in specials
    ]
    texts += ["", '""\\\\', "\x01" * 17, "é" * 13 + '"']
    frame = pl.DataFrame({"s": texts})
    assert kafka._native_values(frame) == [orjson.dumps(row) for row in as_dicts(frame)]


def test_keys_and_identities_are_the_same_from_a_frame_dicts_and_read_back_values():
    frame = _tricky_frame().with_columns(pl.col("text").alias("event_id"))
    fmt = KAFKA_FORMATS["enriched"]
    values = kafka._json_values(frame)
    read_back = [orjson.loads(value) for value in values]
    for rows in (frame, as_dicts(frame), read_back):
        assert fmt.identities(rows) == [f"events.raw/0/{i}" for i in range(6)]
        assert fmt.keys(rows) == [None if t is None else t.encode() for t in frame["text"]]
    # Expressions over other types see them as the JSON holds them.
    stamped = kafka.StreamFormat(
        key=pl.col("source"), identity=pl.concat_str("at", "flag", "f32", "i32", separator="|")
    )
    assert stamped.identities(frame.head(1)) == [
        "2024-01-02T03:04:05.678Z|true|0.10000000149011612|-3"
    ]
    assert stamped.identities(read_back[:1]) == stamped.identities(frame.head(1))


def test_window_session_and_dlq_identities():
    window = {
        "tenant": "a",
        "event_type": "click",
        "window": "1m",
        "window_start": "T0",
        "count": 1,
    }
    session = {"session_id": "s1", "start": "T1", "event_count": 2}
    dead = {"stage": "validate", "source": "events.raw/1/5", "correlation_id": None}
    assert KAFKA_FORMATS["aggregates"].identities([window]) == ["a|click|1m|T0"]
    assert KAFKA_FORMATS["aggregates"].keys([window]) == [b"a|click|1m|T0"]
    assert KAFKA_FORMATS["sessions"].identities([session]) == ["s1|T1"]
    assert KAFKA_FORMATS["dlq"].identities([dead]) == ["validate|events.raw/1/5"]
    assert KAFKA_FORMATS["dlq"].keys([dead]) == [None]  # no key
    assert KAFKA_FORMATS["dlq"].keys([]) == []
    with pytest.raises(ValueError, match="identity"):
        KAFKA_FORMATS["sessions"].identities([{"session_id": "s1"}])


def _events(first: int, count: int) -> pl.DataFrame:
    at = datetime(2024, 5, 1, tzinfo=UTC)
    return pl.DataFrame(
        {
            "event_id": [f"ev-{i}" for i in range(first, first + count)],
            "source": [f"events.raw/0/{i}" for i in range(first, first + count)],
            "timestamp": [at] * count,
            "ingested_at": [at] * count,
        },
        schema_overrides={
            "timestamp": pl.Datetime("ms", "UTC"),
            "ingested_at": pl.Datetime("ms", "UTC"),
        },
    )


def _sink(settings: Settings, topic: str, transactional_id: str, stream: str, resume=None):
    return kafka._TransactionalPartition(
        settings, topic, transactional_id, KAFKA_FORMATS[stream], resume, stream=stream
    )


@pytest.mark.servers
def test_a_replayed_epoch_already_committed_is_not_written_twice(settings: Settings, unique: str):
    topic = f"{unique}.enriched"
    kafka.ensure_topics(settings, [topic], partitions=2)
    first = _sink(settings, topic, f"{unique}.enriched-0", "enriched")
    for batch in range(2):
        first.write_batch([_events(25 * batch, 25)])
        first.snapshot()
        time.sleep(0.5)  # the end offsets asked for after this commit are in by the next one
    persisted = first.snapshot()  # the last snapshot Bytewax persists
    first.write_batch([_events(50, 50)])
    first.snapshot()  # committed in Kafka; the crash comes before this snapshot is persisted
    first.write_batch([_events(100, 50)])  # in the open transaction when the process dies
    # Another sink partition committed rows of this replay (as after a change in the number of
    # sink partitions): they are not written twice either.
    other = _sink(settings, topic, f"{unique}.enriched-1", "enriched")
    other.write_batch([_events(100, 10)])
    other.close()

    resumed = _sink(settings, topic, f"{unique}.enriched-0", "enriched", persisted)
    resumed.write_batch([_events(50, 30), _events(80, 70)])  # the replay, cut differently
    resumed.close()

    records = chaos.read_topic(settings, topic)
    sources = Counter(row["source"] for _, _, row in records)
    assert sources == Counter(f"events.raw/0/{i}" for i in range(150))
    written = {row["source"]: row for _, _, row in records}
    assert written["events.raw/0/7"] == as_dicts(_events(7, 1))[0]
    # tail_from moved past the first batches, and lies at or before everything written after the
    # snapshot that holds it
    assert sum(persisted.tail_from.values()) >= 25
    for partition, offset, row in records:
        if int(row["source"].rsplit("/", 1)[1]) >= 50:
            assert persisted.tail_from[partition] <= offset


@pytest.mark.servers
def test_a_start_without_snapshot_skips_what_the_first_commit_wrote(settings, unique):
    topic = f"{unique}.late"
    kafka.ensure_topics(settings, [topic], partitions=2)
    first = _sink(settings, topic, f"{unique}.late-0", "late")
    first.write_batch([_events(0, 20)])
    first.snapshot()  # committed; the process dies before any snapshot is persisted
    resumed = _sink(settings, topic, f"{unique}.late-0", "late")
    resumed.write_batch([_events(0, 30)])
    resumed.close()
    sources = Counter(row["source"] for _, _, row in chaos.read_topic(settings, topic))
    assert sources == Counter(f"events.raw/0/{i}" for i in range(30))


def _raw_records(settings: Settings, topic: str) -> dict[int, list[tuple[bytes | None, bytes]]]:
    """Per partition, the (key, value) of every committed record in offset order."""
    reader = kafka.consumer(settings, group_id=f"{topic}.raw", **{"enable.partition.eof": True})
    partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
    records: dict[int, list[tuple[bytes | None, bytes]]] = {}
    for message in kafka.read_to_end(reader, topic, dict.fromkeys(partitions, 0), timeout_s=1.0):
        records.setdefault(message.partition(), []).append((message.key(), message.value()))
    reader.close()
    return records


@pytest.mark.servers
def test_the_compiled_writer_writes_what_produce_writes(settings, unique, monkeypatch):
    pytest.importorskip("pipeline_native")
    frame = _tricky_frame().with_columns(pl.col("text").alias("event_id"))  # one key is null
    batches = [frame, frame.slice(2, 3)]
    # A local queue of two records: the writer stops at the full queue and goes on after a poll.
    tiny_queue = {**settings.kafka_config, "queue.buffering.max.messages": 2}
    settings = settings.model_copy(update={"kafka_config": tiny_queue})
    written = {}
    for path in ("compiled", "produce"):
        topic = f"{unique}.{path}"
        kafka.ensure_topics(settings, [topic], partitions=3)
        if path == "produce":
            monkeypatch.setattr(kafka, "record_writer", lambda producer, config: None)
        sink = _sink(settings, topic, f"{topic}-0", "enriched")
        assert (sink._writer is not None) == (path == "compiled")
        sink.write_batch(batches)
        if path == "compiled":  # produced on the writer's thread, named for its priority
            deadline = time.monotonic() + 10  # the thread names itself once it runs
            while (
                "kafka-writer" not in priorities.thread_names().values()
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            assert "kafka-writer" in priorities.thread_names().values()
        sink.close()
        written[path] = _raw_records(settings, topic)
    values = [orjson.dumps(row) for rows in batches for row in as_dicts(rows)]
    keys = [None if t is None else t.encode() for rows in batches for t in rows["text"]]
    for records in written.values():
        assert Counter(r for partition in records.values() for r in partition) == Counter(
            zip(keys, values, strict=True)
        )
    # A keyed record goes to the partition of its key's hash, in order (a keyless one anywhere).
    keyed = {
        path: [(p, k, v) for p, records in sorted(by_partition.items()) for k, v in records if k]
        for path, by_partition in written.items()
    }
    assert keyed["compiled"] == keyed["produce"]


def test_the_compiled_writer_takes_only_the_producer_handle_it_was_given():
    pytest.importorskip("pipeline_native")
    config = {"bootstrap.servers": "127.0.0.1:1", "client.id": "mine"}
    producer = Producer(config)
    assert kafka.record_writer(producer, config) is not None
    assert kafka.record_writer(producer, {**config, "client.id": "another"}) is None
    consumer = Consumer({**config, "group.id": "g"})
    assert kafka.record_writer(consumer, config) is None
    consumer.close()
    with pytest.raises(RuntimeError, match="dlopen"):
        kafka.RecordWriter(producer, "/nonexistent/librdkafka.so", object.__basicsize__, "mine")


def test_the_compiled_reader_takes_only_the_consumer_handle_it_was_given():
    pytest.importorskip("pipeline_native")
    config = {"bootstrap.servers": "127.0.0.1:1", "client.id": "mine", "group.id": "g"}
    consumer = Consumer(config)
    consumer.assign([TopicPartition("t", 0, 0)])
    assert kafka.record_reader(consumer, config, "t", 0) is not None
    assert kafka.record_reader(consumer, {**config, "client.id": "another"}, "t", 0) is None
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "client.id": "mine"})
    assert kafka.record_reader(producer, config, "t", 0) is None
    reader = kafka.record_reader(consumer, config, "t", 0)
    reader.close()
    reader.close()  # once is enough; again does nothing
    with pytest.raises(RuntimeError, match="closed"):
        reader.read(10, 0, 0)
    consumer.close()


@pytest.mark.servers
def test_the_compiled_reader_reads_what_consume_reads(settings, unique, monkeypatch):
    pytest.importorskip("pipeline_native")
    topic = f"{unique}.raw"
    kafka.ensure_topics(settings, [topic], partitions=1)
    servers = settings.kafka_bootstrap_servers
    plain = Producer({"bootstrap.servers": servers})
    for i in range(150):
        plain.produce(topic, b'{"n":%d}' % i, timestamp=1_700_000_000_000 + i)
    plain.produce(topic, None)  # a tombstone: no value, and no timestamp given (the broker's)
    plain.flush(10)
    # Transactions leave control records between these: offsets with gaps.
    transactional = Producer({"bootstrap.servers": servers, "transactional.id": f"{unique}.tx"})
    transactional.init_transactions(30)
    for first in (200, 250):
        transactional.begin_transaction()
        for i in range(first, first + 50):
            transactional.produce(topic, b'{"n":%d}' % i, timestamp=1_700_000_000_000 + i)
        transactional.commit_transaction(30)
    small_batches = settings.model_copy(update={"pipeline_batch_size": 64})

    def read(compiled: bool) -> list[RawRecord]:
        if not compiled:
            monkeypatch.setattr(kafka, "RecordReader", None)
        source = kafka.KafkaBatchSource(small_batches, stop_at_end=True, prepare=lambda b: b)
        part = source.build_part("read", f"{topic}/0", None)
        assert (part._reader is not None) is compiled
        records = []
        with pytest.raises(StopIteration):
            while True:
                records += [r for batch in part.next_batch() for r in batch.records]
        part.close()
        return records

    compiled = read(True)
    assert compiled == read(False)
    values = [r.value for r in compiled]
    assert values == [b'{"n":%d}' % i for i in range(150)] + [b""] + [
        b'{"n":%d}' % i for i in range(200, 300)
    ]
    assert compiled[7] == RawRecord(b'{"n":7}', f"{topic}/0/7", 1_700_000_000.007)
    offsets = [int(r.source.rsplit("/", 1)[1]) for r in compiled]
    assert offsets == list(range(201)) + list(range(202, 252))  # 201: the first commit's marker
    assert compiled[150].ingested_at > 1_700_000_000  # the broker's timestamp


@pytest.mark.servers
def test_a_poll_read_ahead_is_prepared_on_its_thread_and_never_in_a_snapshot(settings, unique):
    pytest.importorskip("pipeline_native")
    topic = f"{unique}.raw"
    kafka.ensure_topics(settings, [topic], partitions=1)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    values = [b'{"n":%d}' % i for i in range(350)]
    for value in values:
        producer.produce(topic, value)
    producer.flush(10)
    small_batches = settings.model_copy(update={"pipeline_batch_size": 100})
    prepared_on = []  # the thread of each poll with records, in order

    def prepare(batch):
        if batch.records:
            prepared_on.append(threading.current_thread().name.rsplit("_", 1)[0])
        return [record.value for record in batch.records]

    def read(resume_offset: int | None, batches: int | None = None):
        source = kafka.KafkaBatchSource(small_batches, stop_at_end=True, prepare=prepare)
        part = source.build_part("read", f"{topic}/0", resume_offset)
        handed_over = []
        try:
            while batches is None or batches > 0:
                polled = [value for batch in part.next_batch() for value in batch]
                if polled and batches is not None:
                    batches -= 1
                handed_over += polled
        except StopIteration:
            pass
        return part, handed_over

    part, first = read(None, batches=1)
    ahead = part._ahead.result(timeout=10)  # the next poll, read and prepared meanwhile
    assert len(ahead.records) > 0
    # a snapshot holds what was handed over, not what was read ahead: a resume reads that again
    assert part.snapshot() == len(first)
    part.close()
    prepared_on.clear()
    resumed, rest = read(len(first))
    resumed.close()
    assert first + rest == values
    # after the first, every poll of a backlog is read and prepared ahead, the last one included
    # (a full poll read with less than a poll to come)
    assert prepared_on[1:] == [kafka.READ_AHEAD_THREAD] * (len(prepared_on) - 1)
    assert len(prepared_on) >= 3  # 250 records: 100, 100 (less than a poll to come), 50
    # named for the kernel too, where `dataflows.priorities` and `top -H` see threads
    assert kafka.READ_AHEAD_THREAD in priorities.thread_names().values()

    # less than a full poll behind (live): once records came, each poll is read where it is asked
    # for (only the poll after an empty first one may have been read ahead)
    prepared_on.clear()
    live = kafka.KafkaBatchSource(settings, stop_at_end=False, prepare=prepare)
    part = live.build_part("read", f"{topic}/0", len(first))
    read_in_place = []
    deadline = time.monotonic() + 20
    while len(read_in_place) < len(rest) and time.monotonic() < deadline:
        read_in_place += [value for batch in part.next_batch() for value in batch]
        if read_in_place:
            assert part._ahead is None
    part.close()
    assert read_in_place == rest
    assert set(prepared_on[1:]) <= {threading.current_thread().name}


@pytest.mark.servers
def test_a_partition_with_nothing_fetched_yet_reads_its_first_records_ahead(settings, unique):
    """A start is usually behind: until the first records arrive, the next poll is read ahead."""
    pytest.importorskip("pipeline_native")
    topic = f"{unique}.raw"
    kafka.ensure_topics(settings, [topic], partitions=1)
    source = kafka.KafkaBatchSource(settings, stop_at_end=False, prepare=lambda batch: batch)
    part = source.build_part("read", f"{topic}/0", None)
    try:
        (announced,) = part.next_batch()  # the partition is announced, with nothing in it
        assert len(announced.records) == 0
        assert part._ahead is not None
        assert part.next_batch() == []  # that poll found nothing either: idle, nothing ahead
        assert part._ahead is None
    finally:
        part.close()


def test_a_record_the_producer_refuses_raises_a_kafka_error():
    pytest.importorskip("pipeline_native")
    config = {"bootstrap.servers": "127.0.0.1:1", "transactional.id": "never-initialised"}
    producer = Producer(config)
    writer = kafka.record_writer(producer, config)
    frame = _events(0, 3)
    arrays, columns = arrow_columns(frame, string_views=True)
    # a transactional producer outside a transaction: the writer's thread meets the error, the
    # next call raises it, and every call after that
    writer.submit("any", frame.height, columns, None, arrays)
    for _ in range(2):
        with pytest.raises(KafkaException) as raised:
            writer.wait(10)
        assert raised.value.args[0].code() == KafkaError._STATE
    with pytest.raises(KafkaException):
        writer.submit("any", frame.height, columns, None, arrays)


@pytest.mark.servers
def test_a_frame_the_compiled_writer_cannot_write_goes_through_produce(settings, unique):
    pytest.importorskip("pipeline_native")
    topic = f"{unique}.enriched"
    kafka.ensure_topics(settings, [topic], partitions=1)
    frame = _events(0, 3).with_columns(
        # the last row's year is past 9999: checked before the first record is produced
        pl.Series("at", [0, 1714550400123, 253402300800000]).cast(pl.Datetime("ms", "UTC")),
    )
    sink = _sink(settings, topic, f"{topic}-0", "enriched")
    assert sink._writer is not None and not sink._write_frame(frame)
    sink.write_batch([frame])
    sink.close()
    ((_, records),) = _raw_records(settings, topic).items()
    assert records == [
        (k.encode(), orjson.dumps(row))
        for k, row in zip(frame["event_id"], as_dicts(frame), strict=True)
    ]


def _window(count: int, revision: int) -> dict:
    return {
        "tenant": "a",
        "event_type": "click",
        "window": "1m",
        "window_start": "2024-05-01T00:00:00.000Z",
        "count": count,
        "revision": revision,
    }


@pytest.mark.servers
def test_replayed_windows_are_renumbered_above_the_committed_revisions(settings, unique):
    topic = f"{unique}.aggregates"
    kafka.ensure_topics(settings, [topic], partitions=2)
    first = _sink(settings, topic, f"{unique}.aggregates-0", "aggregates")
    first.write_batch([[_window(10, 0)]])
    persisted = first.snapshot()
    first.write_batch([[_window(12, 1)]])
    first.snapshot()  # committed, never persisted
    # The replay cuts its batches differently: an intermediate total, then the committed one.
    resumed = _sink(settings, topic, f"{unique}.aggregates-0", "aggregates", persisted)
    resumed.write_batch([[_window(11, 1)], [_window(12, 2)]])
    resumed.snapshot()
    resumed.write_batch([[_window(13, 3)]])
    resumed.close()
    rows = sorted(
        (row for _, _, row in chaos.read_topic(settings, topic)), key=lambda r: r["revision"]
    )
    assert [(r["count"], r["revision"]) for r in rows] == [
        (10, 0),
        (12, 1),
        (11, 2),
        (12, 3),
        (13, 4),
    ]
