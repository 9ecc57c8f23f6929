"""Pure logic of stream/: positions, codecs, batcher, holdout, file and scenario sources (no broker)."""

from __future__ import annotations

import json
import struct
import time
from types import SimpleNamespace

import numpy as np
import pytest

from continuity.stream import (
    NO_SEGMENT,
    Batcher,
    BinaryCodec,
    CodecError,
    FeatureSpec,
    FileSource,
    Holdout,
    JsonCodec,
    JsonLinesDeadLetters,
    KafkaSettings,
    KafkaSourceError,
    Ownership,
    PartitionPosition,
    PartitionRecords,
    Positions,
    RecordingWriter,
    ScenarioSource,
    encode_binary,
    encode_json,
    read_dead_letters,
)
from continuity.stream.ingest import Ingest, batches

SPEC = FeatureSpec((8, 8, 1), "float32", 10)


def _records(values, *, topic="t", partition=0, first_offset=0, keys=None):
    n = len(values)
    offsets = np.arange(first_offset, first_offset + n, dtype=np.int64)
    return PartitionRecords(topic, partition, list(values), list(keys or [None] * n), offsets, offsets * 10)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32)


def test_positions_round_trip_json_and_merge():
    positions = Positions({("b", 1): 7, ("a", 0): PartitionPosition(3, 2)})
    text = json.dumps(positions.to_json())
    assert json.loads(text) == [
        {"topic": "a", "partition": 0, "offset": 3, "skip": 2},
        {"topic": "b", "partition": 1, "offset": 7},
    ]
    assert Positions.from_json(text) == positions
    assert positions.merged({("a", 0): 9})[("a", 0)] == PartitionPosition(9, 0)
    assert positions.offset("b", 1) == 7 and positions.offset("zz", 0) is None
    with pytest.raises(ValueError, match="offset"):
        Positions({("a", 0): -1})
    with pytest.raises(ValueError, match="unknown keys"):
        Positions.from_json([{"topic": "a", "partition": 0, "offset": 1, "extra": 1}])


def test_binary_layout_is_as_documented():
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    value = encode_binary(x, np.int32(3), segment="s", key=b"k")
    magic, version, dtype, label, ndim, flags, reserved, count = struct.unpack_from("<4sBBBBHHI", value)
    assert (magic, version, dtype, label, ndim, flags, reserved, count) == (b"CTNY", 1, 1, 1, 2, 3, 0, 1)
    assert struct.unpack_from("<2I", value, 16) == (2, 2)
    assert value[24:27] == b"\x01\x00s" and value[27:30] == b"\x01\x00k"
    assert np.array_equal(np.frombuffer(value, "<f4", 4, 30), x.ravel())
    assert struct.unpack_from("<i", value, 46) == (3,) and len(value) == 50


@pytest.mark.parametrize("codec_cls", [BinaryCodec, JsonCodec])
def test_codec_round_trip_single_examples(codec_cls):
    codec = codec_cls(SPEC)
    x, y = _data(50)
    values = [codec.encode(x[i], y[i], segment=f"seg{i // 20}") for i in range(50)]
    block, letters = codec.decode(_records(values, keys=[f"k{i}".encode() for i in range(50)]))
    assert letters == []
    np.testing.assert_allclose(block.x, x, rtol=1e-6)
    assert block.x.dtype == np.float32 and np.array_equal(block.y, y)
    assert block.segments[0] == "seg0" and block.segments[-1] == "seg2"
    assert block.keys[3] == b"k3" and list(block.offsets) == list(range(50))


def test_binary_batched_records_decode_in_order_with_skip():
    codec = BinaryCodec(SPEC)
    x, y = _data(300)
    values = [codec.encode(x[i : i + 100], y[i : i + 100], segment="s") for i in range(0, 300, 100)]
    records = _records(values)
    block, letters = codec.decode(records)
    assert letters == [] and len(block) == 300
    assert np.array_equal(block.x, x) and np.array_equal(block.y, y)
    assert block.position_after(149) == PartitionPosition(1, 50)
    assert block.position_after(199) == PartitionPosition(2, 0)
    records.skip_first = 40
    resumed, _ = codec.decode(records)
    assert np.array_equal(resumed.y, y[40:]) and int(resumed.index[0]) == 40


def test_binary_mixed_layouts_keep_stream_order():
    codec = BinaryCodec(SPEC)
    x, y = _data(10)
    values = [
        codec.encode(x[0], y[0]),
        codec.encode(x[1:4], y[1:4], segment="a"),
        codec.encode(x[4], y[4], segment="bb", key="key4"),
        codec.encode(x[5], y[5]),
        codec.encode(x[6:10], y[6:10]),
    ]
    block, letters = codec.decode(_records(values))
    assert letters == []
    assert np.array_equal(block.y, y) and np.array_equal(block.x, x)
    assert block.segments == [None, "a", "bb", None, None] and block.keys[2] == b"key4"


def _bad_binary():
    x, _ = _data(1)
    good = encode_binary(x[0], np.int32(1))
    nan = x[0].copy()
    nan[0, 0, 0] = np.nan
    return {
        "empty value": b"",
        "bad bytes": b"\x00not a record at all",
        "bad header": good[:4] + b"\x09" + good[5:],
        "bad shape": encode_binary(np.zeros((4, 4), np.float32), np.int32(1)),
        "bad dtype": encode_binary(x[0], np.int32(1), dtype="float64"),
        "non-finite": encode_binary(nan, np.int32(1)),
        "label out of range": encode_binary(x[0], np.int32(10)),
        "bad label": encode_binary(x[0], np.float32(0.5)),
    }


def _bad_json():
    x, _ = _data(1)
    row = x[0].tolist()
    return {
        "empty value": b"",
        "bad bytes": b"\xff\xfe",
        "bad JSON": b'{"x": [1, 2',
        "bad shape": json.dumps({"x": [1.0, 2.0], "y": 1}).encode(),
        "non-finite": json.dumps({"x": np.full((8, 8, 1), 1e300).tolist(), "y": 1}).encode(),  # inf in float32
        "label out of range": json.dumps({"x": row, "y": -1}).encode(),
        "bad label": json.dumps({"x": row, "y": 1.5}).encode(),
    }


@pytest.mark.parametrize("codec_cls,bad", [(BinaryCodec, _bad_binary), (JsonCodec, _bad_json)])
def test_every_kind_of_bad_record_is_a_dead_letter_and_neighbours_survive(codec_cls, bad):
    codec = codec_cls(SPEC)
    x, y = _data(20)
    kinds = bad()
    values, expected_kinds = [], {}
    for i, (kind, value) in enumerate(kinds.items()):
        values.append(codec.encode(x[i], y[i]))
        expected_kinds[len(values)] = kind
        values.append(value)
    values.append(codec.encode(x[19], y[19]))
    block, letters = codec.decode(_records(values))
    assert {letter.record.position.offset: letter.kind for letter in letters} == expected_kinds
    assert all(letter.reason for letter in letters)
    assert np.array_equal(block.y, np.r_[y[: len(kinds)], y[19]])


def test_feature_spec_validates_and_names_the_field():
    with pytest.raises(CodecError, match="`dtype` must be one of"):
        FeatureSpec((2,), "int64")
    with pytest.raises(CodecError, match="`shape`"):
        FeatureSpec((0, 2))
    regression = BinaryCodec(FeatureSpec((2,), num_classes=None))
    block, letters = regression.decode(_records([regression.encode(np.ones(2), 0.25)]))
    assert letters == [] and block.y.dtype == np.float32 and block.y[0] == 0.25


def _block(n, *, topic="t", partition=0, first_offset=0, segment="s", codec=None):
    codec = codec or BinaryCodec(SPEC)
    x, y = _data(n, seed=first_offset)
    values = [codec.encode(x[i], y[i], segment=segment) for i in range(n)]
    block, _ = codec.decode(_records(values, topic=topic, partition=partition, first_offset=first_offset))
    return block, x, y


def test_batcher_fixed_shapes_pad_mask_segments_and_positions():
    batcher = Batcher(SPEC, 8, segment_names=["zero"])
    block, x, y = _block(12, segment="one")
    batcher.add(block)
    first = batcher.next_batch()
    assert first.x.shape == (8, 8, 8, 1) and first.mask.all() and first.size == 8
    assert np.array_equal(first.y, y[:8]) and set(first.segment) == {1}
    assert first.positions == Positions({("t", 0): 8})
    assert batcher.next_batch() is None
    last = batcher.next_batch(flush=True)
    assert last.size == 4 and list(last.mask) == [True] * 4 + [False] * 4
    assert np.array_equal(last.x[:4], x[8:]) and not last.x[4:].any()
    assert list(last.segment[4:]) == [NO_SEGMENT] * 4
    assert last.positions == Positions({("t", 0): 12})
    assert batcher.segment_names == ["zero", "one"]


def test_a_batch_that_ends_a_block_moves_its_positions_past_the_empty_blocks_after_it():
    batcher = Batcher(SPEC, 8)
    block, x, y = _block(8)
    empty, letters = BinaryCodec(SPEC).decode(_records([b"not a record"], first_offset=8))
    empty.end = PartitionPosition(9, 0)  # as Ingest stamps it: past the dead letter
    batcher.add(block)
    batcher.add(empty)
    batch = batcher.next_batch()
    assert len(letters) == 1 and batch.size == 8 and batch.mask.all()
    assert np.array_equal(batch.x, x) and np.array_equal(batch.y, y)
    assert batch.positions == Positions({("t", 0): 9}) and len(batcher) == 0


def test_a_block_read_over_several_batches_keeps_its_rows_positions_and_holdout_in_order():
    """A block that fills several batches is read on from where the last batch stopped (a batched
    record, a large poll): every row once, in order, each batch's positions after its last row."""
    batcher = Batcher(SPEC, 8, holdout=Holdout(0.3, salt=1))
    block, x, y = _block(27)
    chosen = Holdout(0.3, salt=1).select(block)
    batcher.add(block)
    batches = [batcher.next_batch() for _ in range(3)]
    assert batcher.next_batch() is None and len(batcher) == 3
    batches.append(batcher.next_batch(flush=True))
    assert [b.size for b in batches] == [8, 8, 8, 3]
    assert [b.positions[("t", 0)].offset for b in batches] == [8, 16, 24, 27]
    assert np.array_equal(np.concatenate([b.x[: b.size] for b in batches]), x)
    assert np.array_equal(np.concatenate([b.y[: b.size] for b in batches]), y)
    assert np.array_equal(np.concatenate([b.held_out[: b.size] for b in batches]), chosen)
    assert not batches[0].x.flags.writeable  # a full batch of one block: a read-only view of it


def test_revoking_a_partly_batched_block_drops_only_its_rows_not_yet_batched():
    ownership = Ownership([("t", 0), ("t", 1)])
    batcher = Batcher(SPEC, 8, ownership=ownership)
    first, _, _ = _block(20, partition=0)
    second, x, _ = _block(8, partition=1, first_offset=100)
    batcher.add(first)
    batcher.add(second)
    assert batcher.next_batch().positions[("t", 0)].offset == 8  # 12 of the first block left
    ownership.revoke([("t", 0)])
    batch = batcher.next_batch()
    assert batcher.examples_dropped == 12 and len(batcher) == 0
    assert batch.size == 8 and np.array_equal(batch.x, x)  # the next block, read from its start
    assert batch.positions[("t", 1)].offset == 108


def test_holdout_is_deterministic_and_close_to_its_fraction():
    block, _, _ = _block(4000)
    holdout = Holdout(0.2)
    chosen = holdout.select(block)
    assert np.array_equal(chosen, Holdout(0.2).select(block))
    assert 0.17 < chosen.mean() < 0.23
    assert not np.array_equal(chosen, Holdout(0.2, salt=1).select(block))
    batcher = Batcher(SPEC, 64, holdout=holdout)
    batcher.add(block)
    assert batcher.examples_held_out == chosen.sum()
    flags, real = [], 0
    while (batch := batcher.next_batch(flush=True)) is not None:
        flags.append(batch.held_out[batch.mask])
        real += batch.size
        assert not (batch.held_out & ~batch.mask).any()  # padding is never held out
        assert np.array_equal(batch.train_mask, batch.mask & ~batch.held_out)
    # Every example arrives in stream order, held-out ones flagged where they fall.
    assert real == 4000 and np.array_equal(np.concatenate(flags), chosen)
    assert batcher.positions == Positions({("t", 0): 4000})


def test_settings_never_show_secrets():
    settings = KafkaSettings(
        "h:1",
        ("t",),
        security={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": "u",
            "sasl_plain_password": "hunter2",
        },
    )
    assert "hunter2" not in repr(settings) and "***" in repr(settings)
    with pytest.raises(KafkaSourceError, match="unknown security option"):
        KafkaSettings("h:1", ("t",), security={"sasl_password": "x"})


def test_file_source_bounded_reads_and_seek(tmp_path):
    codec = BinaryCodec(SPEC)
    x, y = _data(100)
    path = tmp_path / "rec.parquet"
    with RecordingWriter(path, row_group_records=16) as writer:
        for lo in range(0, 100, 10):  # interleave two partitions
            part = (lo // 10) % 2
            writer.write(
                _records(
                    [codec.encode(x[i], y[i]) for i in range(lo, lo + 10)], partition=part, first_offset=lo // 20 * 10
                )
            )
    source = FileSource(path, read_rows=7)
    runs = []
    while not source.finished:
        runs.extend(source.poll())
    assert max(len(r) for r in runs) <= 7
    assert sum(len(r) for r in runs) == 100
    order = [(r.partition, int(o)) for r in runs for o in r.offsets]
    assert order[:12] == [(0, i) for i in range(10)] + [(1, 0), (1, 1)]
    resumed = FileSource(path, start=Positions({("t", 0): 45, ("t", 1): 3}))
    left = []
    while not resumed.finished:
        left.extend((r.partition, int(o)) for r in resumed.poll() for o in r.offsets)
    assert left == [p for p in order if p[1] >= (45 if p[0] == 0 else 3)]


def _fake_scenario():
    rng = np.random.default_rng(3)
    segments = tuple(
        SimpleNamespace(
            name=f"task{s}",
            train_x=rng.random((25, 8, 8, 1), dtype=np.float32),
            train_y=rng.integers(0, 10, 25).astype(np.int32),
            poisoned=False,
        )
        for s in range(3)
    )
    return SimpleNamespace(name="fake", segments=segments, num_classes=10, example_shape=(8, 8, 1), seed=3)


@pytest.mark.parametrize("per_record", [1, 10])
def test_scenario_source_streams_segments_in_order_and_resumes(per_record):
    scenario = _fake_scenario()
    codec = BinaryCodec(SPEC)
    source = ScenarioSource(scenario, codec, examples_per_record=per_record, poll_records=4)
    ingest = Ingest(source, codec)
    batcher = Batcher(SPEC, 16)
    with ingest:
        got = list(batches(ingest, batcher))
    ys = np.concatenate([b.y[b.mask] for b in got])
    assert np.array_equal(ys, np.concatenate([s.train_y for s in scenario.segments]))
    assert batcher.segment_names == ["task0", "task1", "task2"]
    middle = got[1].positions
    resumed = ScenarioSource(scenario, codec, examples_per_record=per_record, start=middle)
    with Ingest(resumed, codec) as again:
        rest = list(batches(again, Batcher(SPEC, 16, start=middle)))
    assert np.array_equal(np.concatenate([b.y[b.mask] for b in rest]), ys[32:])


def test_json_lines_dead_letter_file(tmp_path):
    sink = JsonLinesDeadLetters(tmp_path / "dlq.jsonl")
    codec = JsonCodec(SPEC)
    _, letters = codec.decode(_records([b"{", encode_json(np.zeros((8, 8, 1)), 99)]))
    for letter in letters:
        sink.put(letter)
    sink.close()
    rows = read_dead_letters(tmp_path / "dlq.jsonl")
    assert [r["offset"] for r in rows] == [0, 1] and sink.counts == {"bad JSON": 1, "label out of range": 1}


def test_a_dead_letter_file_keeps_each_letter_once_across_restarts_yet_takes_a_recreated_topics_anew(tmp_path):
    """After a restart the records after the last checkpoint are read again, bad ones included."""
    path = tmp_path / "dlq.jsonl"
    codec = JsonCodec(SPEC)
    _, letters = codec.decode(_records([b"{", b"[", b"}"]))  # offsets 0, 1, 2; timestamps 0, 10, 20
    sink = JsonLinesDeadLetters(path)
    for letter in letters[:2]:
        sink.put(letter)
    sink.close()
    with path.open("a") as torn:
        torn.write('{"topic": "t", "partit')  # a crash mid-write
    again = JsonLinesDeadLetters(path)  # restarted: reads from the checkpoint, before offset 0
    for letter in letters:
        again.put(letter)
    assert again.total == 1 and again.counts == {"bad JSON": 1}  # offset 2 alone is new
    # The topic recreated: offsets from 0 again, at later timestamps.
    _, recreated = codec.decode(_records([b"{"]))
    later = recreated[0]._replace(record=recreated[0].record._replace(timestamp_ms=1_000))
    again.put(later)
    again.close()
    offsets = [(r["offset"], r["timestamp_ms"]) for r in read_dead_letters(path)]
    assert offsets == [(0, 0), (1, 10), (2, 20), (0, 1_000)]


def test_a_dead_letter_file_on_a_full_disk_holds_its_letters_in_order_and_writes_them_whole_once_it_can(
    tmp_path, monkeypatch, caplog
):
    """A full disk must not stop the service: the letters wait in memory (`unwritten` says so,
    and checkpoints wait on it), then reach the file whole, in order, each once."""
    import errno
    import os

    from continuity.stream import deadletters

    path = tmp_path / "dlq.jsonl"
    _, letters = JsonCodec(SPEC).decode(_records([b"{", b"[", b"}", b"{{", b"]"]))
    sink = JsonLinesDeadLetters(path)
    sink.put(letters[0])
    assert sink.unwritten() is None
    write, room = os.write, [30]  # the disk takes 30 more bytes, then nothing: a line torn mid-way

    def full_disk(fd, data):
        if not room[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        taken = min(room[0], len(data))
        room[0] -= taken
        return write(fd, bytes(data[:taken]))

    monkeypatch.setattr(deadletters.os, "write", full_disk)
    sink.put(letters[1])  # no error: held
    sink.put(letters[2])
    assert sink.unwritten() == f"dead letters not yet written to {path} (No space left on device) are held in memory"
    assert caplog.text.count("cannot write") == 1  # once for the spell, not once a letter
    monkeypatch.setattr(deadletters.os, "write", write)  # room again
    sink.put(letters[3])
    assert sink.unwritten() is None and "writable again" in caplog.text
    sink.close()
    assert [r["offset"] for r in read_dead_letters(path)] == [0, 1, 2, 3]
    assert len(path.read_text().splitlines()) == 4  # the torn line went on where it stopped
    with pytest.raises(ValueError, match="is closed: dead letter t/0@4 cannot be kept"):
        sink.put(letters[4])  # not held where nothing would ever write it


def test_a_dead_letter_topic_holds_checkpoints_until_the_broker_acknowledged_each_letter_and_resends_a_failed_one(
    monkeypatch,
):
    """Sends are asynchronous: a checkpoint committed before the broker took a letter would lose
    it in a crash, and a send the producer gave up on would lose it outright."""
    import kafka
    from kafka.errors import KafkaTimeoutError, RequestTimedOutError
    from kafka.future import Future

    from continuity.stream.deadletters import KafkaDeadLetters

    class Producer:  # kafka-python's KafkaProducer as far as the sink uses it; acks are given by hand
        def __init__(self, **_config):
            self.sent: list[tuple[str, Future]] = []

        def send(self, topic, *, value, key, headers):
            self.sent.append((topic, future := Future()))
            return future

        def flush(self, timeout=None):
            if any(not future.is_done for _, future in self.sent):
                raise KafkaTimeoutError("flush timed out")

    monkeypatch.setattr(kafka, "KafkaProducer", Producer)
    sink = KafkaDeadLetters("broker:9092", ack_wait_s=0.01)
    assert sink.unwritten() is None  # nothing sent
    _, letters = JsonCodec(SPEC).decode(_records([b"{", b"["]))
    for letter in letters:
        sink.put(letter)
    producer = sink._producer
    assert sink.unwritten() == "2 dead letters sent to broker:9092 are not acknowledged yet"
    producer.sent[0][1].success(None)
    producer.sent[1][1].failure(RequestTimedOutError("delivery timed out"))
    reason = sink.unwritten()
    assert reason is not None and reason.startswith("1 dead letter sent to broker:9092 is not acknowledged yet")
    assert "RequestTimedOutError" in reason and "sent again" in reason
    assert [topic for topic, _ in producer.sent] == ["t.dlq"] * 3  # the failed one, sent again
    producer.sent[2][1].success(None)
    assert sink.unwritten() is None


def test_kafka_log_limit_lets_a_few_kafka_lines_a_minute_through_and_says_how_many_it_held_back():
    import logging

    from continuity.stream import KafkaLogLimit

    now = [0.0]
    limit = KafkaLogLimit(per_window=5, window_s=60.0, clock=lambda: now[0])

    def record(name: str, message: str = "Connection failed") -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, message, (), None)

    passed = [limit.filter(record("kafka.net.connection")) for _ in range(1300)]
    assert sum(passed) == 5 and passed[:5] == [True] * 5
    assert all(limit.filter(record(name)) for name in ("continuity.stream.kafka", "kafkaesque", "root"))
    now[0] = 61.0  # the next minute: its first line says what the last one held back
    first = record("kafka.cluster", "Metadata refresh failed")
    assert limit.filter(first)
    assert (
        first.getMessage()
        == "Metadata refresh failed [1295 more kafka-python log lines were held back in the previous 60 s]"
    )
    later = record("kafka.cluster", "again")
    assert limit.filter(later) and later.getMessage() == "again"


def test_kafka_pythons_slow_step_warning_is_reworded_and_other_lines_pass_as_they_are():
    import logging

    from continuity.stream import KafkaSlowStepNote

    def record(name: str, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, (), None)

    note = KafkaSlowStepNote()
    # kafka-python 3.0.12's own words (kafka/net/selector.py), formatted as it formats them
    slow = record(
        "kafka.net.selector",
        "Task <kafka.net.selector.Task object at 0x7f> ran for 0.299s (>0.100s threshold). It is blocking the "
        "event loop -- likely a tight sync loop inside a coroutine. Other pollers will time out.",
    )
    assert note.filter(slow) and slow.levelno == logging.WARNING
    assert slow.getMessage() == (
        "kafka-python's network thread took 0.30 s over one step (its threshold 0.1 s), most likely waiting "
        "for the interpreter lock while training and decoding hold it; harmless unless it nears the "
        "consumer's session timeout"
    )
    for other in (record("kafka.net.selector", "Wakeup socket returned empty. Rebuilding."), record("root", "ran")):
        before = other.getMessage()
        assert note.filter(other) and other.getMessage() == before


def test_a_lost_position_says_which_partition_where_and_why():
    from continuity.stream import LostPosition, LostPositionsError

    lost = LostPosition("digits", 0, 7953, "beyond the log end", log_start=0, log_end=120)
    assert lost.describe() == "digits/0 at offset 7,953 (log 0..120): beyond the log end"
    moved = LostPosition("digits", 3, None, "the topic was recreated", resumed_at=0)
    assert moved.describe() == "digits/3 at no saved position: the topic was recreated; resumed at 0"
    error = LostPositionsError([lost, moved])
    assert str(error).startswith("saved stream positions the broker no longer has: digits/0 at offset 7,953")
    assert error.lost == (lost, moved)


def test_kafka_settings_default_to_kafkas_session_timeout_and_validate_the_lost_positions_policy():
    settings = KafkaSettings("h:1", ("t",))
    assert (settings.session_timeout_ms, settings.heartbeat_interval_ms, settings.on_lost_positions) == (
        45000,
        3000,
        "halt",
    )
    with pytest.raises(KafkaSourceError, match="`on_lost_positions` must be one of 'halt', 'earliest', 'latest'"):
        KafkaSettings("h:1", ("t",), on_lost_positions="skip")


class _JoiningSource(ScenarioSource):
    """A live source that can read nothing until `joins_after_s` has passed (a consumer-group join)."""

    def __init__(self, *args, joins_after_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.joined_at = time.monotonic() + joins_after_s

    @property
    def ready(self) -> bool:
        return time.monotonic() >= self.joined_at

    def poll(self, timeout_s: float = 0.1):
        if not self.ready:
            time.sleep(min(timeout_s, 0.05))
            return []
        return super().poll(timeout_s)

    @property
    def finished(self) -> bool:
        return False  # live: only the idle timeout ends it


def test_the_idle_timeout_counts_from_when_the_source_can_first_read_not_through_its_join():
    scenario = _fake_scenario()
    codec = BinaryCodec(SPEC)
    source = _JoiningSource(scenario, codec, poll_records=4, joins_after_s=1.0)
    with Ingest(source, codec) as ingest:
        got = list(batches(ingest, Batcher(SPEC, 16), idle_timeout_s=0.3, max_wait_s=0.05))
    ys = np.concatenate([b.y[b.mask] for b in got])
    assert np.array_equal(ys, np.concatenate([s.train_y for s in scenario.segments]))  # all of it, after the join


def test_a_consumer_not_connected_yet_is_an_outage_only_past_unreachable_after_s_or_once_it_was_connected(monkeypatch):
    """A new consumer connects at its first fetch: until UNREACHABLE_AFTER_S without a connection
    it is connecting (nothing paused, no metadata asked for); a connection lost after one was up
    is an outage at once, paused until fresh metadata shows the same topics."""
    from continuity.stream import kafka

    source = kafka.KafkaSource(kafka.KafkaSettings("localhost:1", ("t",), partitions=(0,)))
    paused: list = []
    consumer = SimpleNamespace(pause=lambda *tps: paused.extend(tps), assignment=lambda: {"t-0"})
    clock = [1000.0]
    connected = [False]
    refreshes: list = []

    def no_fresh_metadata(*args, **kwargs) -> bool:  # the broker does not answer: the check waits
        refreshes.append(args)
        return False

    monkeypatch.setattr(kafka.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(kafka, "_broker_connected", lambda _consumer: connected[0])
    monkeypatch.setattr(kafka, "_refresh_metadata", no_fresh_metadata)

    source._watch_connection(consumer)
    clock[0] += kafka.UNREACHABLE_AFTER_S / 2
    source._watch_connection(consumer)
    assert not source._recheck and paused == [] and refreshes == []
    clock[0] += kafka.UNREACHABLE_AFTER_S / 2
    source._watch_connection(consumer)  # never connected in a whole UNREACHABLE_AFTER_S: an outage
    assert source._recheck and paused == ["t-0"] and len(refreshes) == 1

    source = kafka.KafkaSource(kafka.KafkaSettings("localhost:1", ("t",), partitions=(0,)))
    paused.clear()
    refreshes.clear()
    connected[0] = True
    source._watch_connection(consumer)
    connected[0] = False
    source._watch_connection(consumer)  # lost after it was up: at once
    assert source._recheck and paused == ["t-0"] and len(refreshes) == 1


class _RacingConsumer:
    """A kafka-python consumer whose polls return `answers` in turn (then nothing). An empty answer
    between two full ones is 3.0.12's early empty poll, when a fetch response lands while the
    poll starts (it then sleeps `retry_backoff_ms`, the records buffered)."""

    def __init__(self, *answers: dict):
        self.answers = list(answers)
        self.timeouts_ms: list[int] = []

    def poll(self, timeout_ms: int) -> dict:
        self.timeouts_ms.append(timeout_ms)
        return self.answers.pop(0) if self.answers else {}


def test_kafka_source_polls_again_within_its_wait_when_a_flowing_streams_poll_comes_back_empty_early():
    from continuity.stream.kafka import POLL_SLICE_S, KafkaSettings, KafkaSource

    source = KafkaSource(KafkaSettings("127.0.0.1:1", ("t",)))
    consumer = _RacingConsumer({"tp": ["first"]}, {}, {"tp": ["second"]})
    assert source._poll_consumer(consumer, 0.5) == {"tp": ["first"]}  # quiet until now: one call
    assert consumer.timeouts_ms == [500]
    assert source._poll_consumer(consumer, 0.5) == {"tp": ["second"]}  # flowing: the empty poll retried
    assert len(consumer.timeouts_ms) == 3
    assert max(consumer.timeouts_ms[1:]) <= POLL_SLICE_S * 1000  # a missed response costs one slice

    started = time.monotonic()
    assert source._poll_consumer(consumer, 0.05) == {}  # nothing more: the whole wait, in slices
    assert time.monotonic() - started < 1.0 and len(consumer.timeouts_ms) >= 5
    calls = len(consumer.timeouts_ms)
    assert source._poll_consumer(consumer, 0.5) == {}  # quiet again: polled in one piece
    assert consumer.timeouts_ms[calls:] == [500]


def test_positions_of_a_checked_dict_equal_the_checked_ones_and_are_a_snapshot():
    from continuity.stream.records import PartitionKey, PartitionPosition, Positions

    own = {PartitionKey("t", 0): PartitionPosition(42, 3), PartitionKey("u", 1): PartitionPosition(7, 0)}
    positions = Positions.of_checked(own)
    assert positions == Positions(own) and positions.offset("t", 0) == 42
    own[PartitionKey("t", 0)] = PartitionPosition(50, 0)  # the Batcher moves on after a batch
    assert positions[("t", 0)] == PartitionPosition(42, 3)
