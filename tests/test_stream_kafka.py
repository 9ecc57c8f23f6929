"""Kafka ingestion against the real embedded broker (Tansu): round trips, seeks, groups, dead letters,
outages through a TCP proxy, recordings."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import SHORT_SESSION
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from continuity.benchmarks.tcp_proxy import TcpProxy
from continuity.stream import (
    Batcher,
    BinaryCodec,
    EmbeddedBroker,
    FeatureSpec,
    FileSource,
    Ingest,
    JsonCodec,
    JsonLinesDeadLetters,
    KafkaDeadLetters,
    KafkaSettings,
    KafkaSource,
    MemoryDeadLetters,
    Positions,
    ProcessShare,
    create_topic,
    encode_binary,
    free_port,
    read_dead_letters,
    record_topic,
)

SPEC = FeatureSpec((8, 8, 1), "float32", 10)
ID_SPEC = FeatureSpec((2,), "float32", 10)  # x = [id, id]: lets tests follow every example


def _produce(bootstrap, topic, values, *, keys=None, partitions=None):
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i, value in enumerate(values):
        producer.send(
            topic,
            value=value,
            key=None if keys is None else keys[i],
            partition=None if partitions is None else partitions[i],
        )
    producer.flush()
    producer.close()


def _collect(ingest, batcher, expected, *, timeout_s=30.0):
    """Batches until `expected` examples were delivered (partial batches flushed when idle)."""
    got = []
    delivered = 0
    deadline = time.monotonic() + timeout_s
    while delivered < expected and time.monotonic() < deadline:
        batch = batcher.next_batch()
        if batch is None:
            block = ingest.get(timeout_s=0.2)
            if block is not None:
                batcher.add(block)
                continue
            batch = batcher.next_batch(flush=True)
        if batch is not None and batch.size:
            got.append(batch)
            delivered += batch.size
    return got


def _ids(batches):
    return [int(v) for b in batches for v in b.x[b.mask][:, 0]]


@pytest.mark.parametrize("codec_cls,per_record", [(BinaryCodec, 1), (BinaryCodec, 25), (JsonCodec, 1)])
def test_produce_consume_round_trip(broker, topic_name, codec_cls, per_record):
    topic = topic_name()
    create_topic(broker.bootstrap, topic, 1)
    codec = codec_cls(SPEC)
    rng = np.random.default_rng(1)
    x = rng.random((200, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 200).astype(np.int32)
    if per_record == 1:
        values = [codec.encode(x[i], y[i], segment=f"s{i // 100}") for i in range(200)]
    else:
        values = [
            codec.encode(x[i : i + per_record], y[i : i + per_record], segment=f"s{i // 100}")
            for i in range(0, 200, per_record)
        ]
    _produce(broker.bootstrap, topic, values)
    source = KafkaSource(KafkaSettings(broker.bootstrap, (topic,)))
    batcher = Batcher(SPEC, 32, ownership=source.ownership)
    with Ingest(source, codec) as ingest:
        got = _collect(ingest, batcher, 200)
    np.testing.assert_allclose(np.concatenate([b.x[b.mask] for b in got]), x, rtol=1e-6)
    assert np.array_equal(np.concatenate([b.y[b.mask] for b in got]), y)
    assert batcher.segment_names == ["s0", "s1"]
    assert got[-1].positions == Positions({(topic, 0): len(values)})


def test_a_new_sources_first_poll_reads_without_taking_its_first_connection_for_an_outage(
    broker, topic_name, monkeypatch
):
    """kafka-python connects at the first fetch: a new consumer is connecting, not cut off, so its
    first poll neither pauses nor asks for fresh metadata (which kafka-python holds back ~0.1 s)."""
    from continuity.stream import kafka

    topic = topic_name()
    create_topic(broker.bootstrap, topic, 1)
    _produce(broker.bootstrap, topic, [encode_binary(np.zeros((1, 8, 8, 1), np.float32), np.zeros(1, np.int32))] * 5)
    refreshed = []
    real = kafka._refresh_metadata
    monkeypatch.setattr(kafka, "_refresh_metadata", lambda *a, **k: refreshed.append(a) or real(*a, **k))
    source = KafkaSource(KafkaSettings(broker.bootstrap, (topic,), partitions=(0,)), start=Positions({(topic, 0): 0}))
    try:
        source.open()
        got = 0
        deadline = time.monotonic() + 30
        while got < 5 and time.monotonic() < deadline:
            got += sum(len(run.values) for run in source.poll(1.0))
        assert got == 5 and refreshed == [] and not source._recheck
        assert source._connected_once  # from now on a lost connection is an outage at once
    finally:
        source.close()


def test_seek_to_saved_positions_resumes_exactly_after_the_last_record(broker, topic_name):
    topic = topic_name()
    create_topic(broker.bootstrap, topic, 2)
    codec = BinaryCodec(ID_SPEC)
    # Partition 0: single-example records; partition 1: records of 10 examples.
    single = [codec.encode(np.array([i, i]), i % 10) for i in range(60)]
    batched = [
        codec.encode(np.repeat(np.arange(1000 + j, 1010 + j)[:, None], 2, 1), np.arange(10) % 10)
        for j in range(0, 60, 10)
    ]
    _produce(broker.bootstrap, topic, single + batched, partitions=[0] * 60 + [1] * 6)
    everything = set(range(60)) | set(range(1000, 1060))
    settings = KafkaSettings(broker.bootstrap, (topic,))
    first = KafkaSource(settings)
    batcher = Batcher(ID_SPEC, 16, ownership=first.ownership)
    with Ingest(first, codec) as ingest:
        part = _collect(ingest, batcher, 53)[:3]  # 48 examples, stop mid-stream
    saved = Positions.from_json(part[-1].positions.to_json())
    seen = _ids(part)
    second = KafkaSource(settings, start=saved)
    rest_batcher = Batcher(ID_SPEC, 16, ownership=second.ownership, start=saved)
    with Ingest(second, codec) as ingest:
        rest = _ids(_collect(ingest, rest_batcher, 120 - len(seen)))
    assert sorted(seen + rest) == sorted(everything)
    assert len(seen) + len(rest) == 120  # nothing twice, even inside a half-delivered batched record
    assert rest_batcher.positions == Positions({(topic, 0): 60, (topic, 1): 6})


def test_a_partition_without_a_saved_position_starting_at_the_group_s_commit_is_said_loudly(broker, topic_name, caplog):
    """A fresh model in a group that committed before (another member, or a model whose checkpoints are
    gone) starts where the group got to: the records before are never trained by it, so it is said."""
    import logging

    topic = topic_name()
    create_topic(broker.bootstrap, topic, 1)
    codec = BinaryCodec(ID_SPEC)
    _produce(broker.bootstrap, topic, [codec.encode(np.array([i, i]), i % 10) for i in range(100)])
    from kafka.structs import OffsetAndMetadata

    earlier = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=f"g-{topic}", enable_auto_commit=False)
    earlier.assign([TopicPartition(topic, 0)])
    earlier.commit({TopicPartition(topic, 0): OffsetAndMetadata(60, "", -1)})  # what the group got to
    earlier.close(autocommit=False)
    settings = KafkaSettings(broker.bootstrap, (topic,), group_id=f"g-{topic}", **SHORT_SESSION)
    fresh = KafkaSource(settings)
    with caplog.at_level(logging.INFO, logger="continuity.stream.kafka"), Ingest(fresh, codec) as ingest:
        ids = _ids(_collect(ingest, Batcher(ID_SPEC, 16, ownership=fresh.ownership), 40))
    assert ids == list(range(60, 100))
    said = [r.getMessage() for r in caplog.records if "have no saved position" in r.getMessage()]
    assert said == [
        f"kafka: ['{topic}/0'] have no saved position; starting where the consumer group 'g-{topic}' committed, at "
        f"{{'{topic}/0': 60}}: what another member or an earlier model reached. This model never trains the records "
        "before them (another stream.group, or none, starts at stream.auto_offset_reset = 'earliest')"
    ]
    assert [r.levelno for r in caplog.records if "have no saved position" in r.getMessage()] == [logging.WARNING]


def test_a_group_member_rewinds_in_place_to_saved_positions(broker, topic_name):
    """A rollback or retry moves the live consumer back (no new group member): every example
    from the saved positions on is delivered again, inside a half-delivered batched record too."""
    topic = topic_name()
    create_topic(broker.bootstrap, topic, 1)
    codec = BinaryCodec(ID_SPEC)
    records = [
        codec.encode(np.repeat(np.arange(10 * j, 10 * j + 10)[:, None], 2, 1), np.arange(10) % 10) for j in range(8)
    ]
    _produce(broker.bootstrap, topic, records)
    source = KafkaSource(KafkaSettings(broker.bootstrap, (topic,), group_id="rewind", **SHORT_SESSION))
    batcher = Batcher(ID_SPEC, 16, ownership=source.ownership)
    ingest = Ingest(source, codec).start()
    first = _collect(ingest, batcher, 32)[:2]  # 32 examples: record 3 is cut after 2 of its 10
    saved = first[-1].positions
    assert saved == Positions({(topic, 0): (3, 2)})
    _collect(ingest, batcher, 80 - 32)  # read on to the end, as a window that then regressed would
    consumer = source._consumer
    ingest.stop(close_source=False)

    assert source.rewind(saved)
    assert source._consumer is consumer  # the same member: no re-join
    again = Batcher(ID_SPEC, 16, ownership=source.ownership, start=saved)
    with Ingest(source, codec) as ingest:
        replayed = _ids(_collect(ingest, again, 80 - 32))
    assert replayed == list(range(32, 80))
    assert again.positions == Positions({(topic, 0): 8})


def test_two_consumers_in_a_group_split_partitions_without_loss_or_duplicates(broker, topic_name):
    topic = topic_name()
    create_topic(broker.bootstrap, topic, 4)
    codec = BinaryCodec(ID_SPEC)
    n = 4000
    _produce(
        broker.bootstrap,
        topic,
        [codec.encode(np.array([i, i]), i % 10) for i in range(n)],
        partitions=[i % 4 for i in range(n)],
    )
    settings = KafkaSettings(broker.bootstrap, (topic,), group_id=f"g-{topic}", max_poll_records=50, **SHORT_SESSION)
    consumers = []

    def join():
        source = KafkaSource(settings)
        ingest = Ingest(source, codec, queue_blocks=4).start()
        consumers.append((source, ingest, Batcher(ID_SPEC, 16, ownership=source.ownership), []))

    join()
    delivered = []
    deadline = time.monotonic() + 60
    assigned_b = False
    while len(delivered) < n and time.monotonic() < deadline:
        if not assigned_b and len(delivered) >= 300:
            join()  # B joins while A is mid-stream: a rebalance
            assigned_b = True
        for source, ingest, batcher, mine in consumers:
            block = ingest.get(timeout_s=0.02)
            if block is not None:
                batcher.add(block)
            # Slow consumer: one batch per turn, so a lot is queued when the rebalance hits.
            batch = batcher.next_batch() or (batcher.next_batch(flush=True) if block is None else None)
            if batch is not None and batch.size:
                ids = _ids([batch])
                mine.extend(ids)
                delivered.extend(ids)
                source.commit(batch.positions)
    for _, ingest, _, _ in consumers:
        ingest.stop()
    a, b = consumers[0][3], consumers[1][3]
    assert len(delivered) == n and sorted(delivered) == list(range(n))  # no loss, no duplicate
    assert a and b  # both consumers took part
    owners_b = {i % 4 for i in b[-100:]}
    assert owners_b and not owners_b & {i % 4 for i in a[-100:]}  # split, after the rebalance
    assert consumers[0][2].examples_dropped > 0 or consumers[1][2].examples_dropped >= 0


def test_source_recovers_from_a_cut_connection_and_delivers_every_record_once(topic_name):
    proxy_port = free_port()
    with EmbeddedBroker(advertised_port=proxy_port) as direct:
        proxy = TcpProxy(proxy_port, direct.port).start()
        try:
            topic = topic_name()
            create_topic(direct.bootstrap, topic, 2)
            codec = BinaryCodec(ID_SPEC)
            _produce(
                direct.bootstrap,
                topic,
                [codec.encode(np.array([i, i]), i % 10) for i in range(1500)],
                partitions=[i % 2 for i in range(1500)],
            )
            settings = KafkaSettings(
                direct.bootstrap, (topic,), max_poll_records=100, request_timeout_ms=5000, reconnect_backoff_max_ms=500
            )
            source = KafkaSource(settings)
            batcher = Batcher(ID_SPEC, 50, ownership=source.ownership)
            with Ingest(source, codec, queue_blocks=2) as ingest:
                got = _ids(_collect(ingest, batcher, 400))
                proxy.cut()
                time.sleep(1.5)  # the outage: the source keeps retrying
                more = _collect(ingest, batcher, 10**6, timeout_s=0.5)  # whatever was already queued
                got += _ids(more)
                proxy.restore()
                _produce(
                    direct.bootstrap,
                    topic,
                    [codec.encode(np.array([i, i]), i % 10) for i in range(1500, 2000)],
                    partitions=[i % 2 for i in range(1500, 2000)],
                )
                got += _ids(_collect(ingest, batcher, 2000 - len(got), timeout_s=40))
        finally:
            proxy.cut()
    assert sorted(got) == list(range(2000))
    for p in (0, 1):  # each partition in order
        ids = [i for i in got if i % 2 == p]
        assert ids == sorted(ids)


def test_bad_records_go_to_the_dead_letter_topic_and_file_good_ones_are_delivered(broker, topic_name, tmp_path):
    topic = topic_name()
    create_topic(broker.bootstrap, topic, 1)
    create_topic(broker.bootstrap, topic + ".dlq", 1)
    codec = BinaryCodec(SPEC)
    good = np.full((8, 8, 1), 0.5, np.float32)
    nan = good.copy()
    nan[1, 1, 0] = np.nan
    bad = {
        "bad bytes": b"\x00garbage",
        "bad shape": encode_binary(np.zeros((3,), np.float32), np.int32(1)),
        "non-finite": encode_binary(nan, np.int32(1)),
        "label out of range": encode_binary(good, np.int32(42)),
        "empty value": b"",
        "bad JSON": b'{"x": [',
    }
    values = []
    for value in bad.values():
        values.append(codec.encode(good, len(values) % 10))
        values.append(value)
    values.append(codec.encode(good, 3))
    _produce(broker.bootstrap, topic, values)
    source = KafkaSource(KafkaSettings(broker.bootstrap, (topic,)))
    to_topic = KafkaDeadLetters(broker.bootstrap)
    batcher = Batcher(SPEC, 4, ownership=source.ownership)
    with Ingest(source, codec, to_topic) as ingest:
        got = _collect(ingest, batcher, 7)
    to_topic.close()
    assert sum(b.size for b in got) == 7
    assert batcher.positions == Positions({(topic, 0): len(values)})
    expected = {"bad bytes": 1, "bad shape": 1, "non-finite": 1, "label out of range": 1, "empty value": 1}
    expected["bad bytes"] += 1  # invalid JSON is bad bytes to the binary codec
    assert dict(to_topic.counts) == expected
    dlq = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    dlq.assign([TopicPartition(topic + ".dlq", 0)])
    letters = [m for m in dlq]
    dlq.close()
    assert len(letters) == 6
    reasons = [dict(m.headers)["dlq.reason"].decode() for m in letters]
    assert all(reasons) and [int(dict(m.headers)["dlq.offset"]) for m in letters] == [1, 3, 5, 7, 9, 11]
    # The JSON codec to a file sink, same neighbours.
    json_topic = topic_name("-json")
    create_topic(broker.bootstrap, json_topic, 1)
    json_codec = JsonCodec(SPEC)
    json_values = [
        json_codec.encode(good, 1),
        b"",
        b'{"x": [',
        json_codec.encode(good, 11),
        json_codec.encode(np.full((8, 8, 1), 1e300), 1),  # finite in JSON, inf in float32
        b"\xff",
        json_codec.encode(np.zeros(3), 1),
        json_codec.encode(good, 2),
    ]
    _produce(broker.bootstrap, json_topic, json_values)
    sink = JsonLinesDeadLetters(tmp_path / "dead.jsonl")
    source = KafkaSource(KafkaSettings(broker.bootstrap, (json_topic,)))
    batcher = Batcher(SPEC, 4, ownership=source.ownership)
    with Ingest(source, json_codec, sink) as ingest:
        got = _collect(ingest, batcher, 2)
    sink.close()
    assert [int(v) for b in got for v in b.y[b.mask]] == [1, 2]
    rows = read_dead_letters(tmp_path / "dead.jsonl")
    assert [r["offset"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["reason"].split(":")[0] for r in rows] == [
        "empty value",
        "bad JSON",
        "label out of range",
        "non-finite",
        "bad bytes",
        "bad shape",
    ]


def test_record_then_file_source_gives_the_same_records_positions_and_order(broker, topic_name, tmp_path):
    topic = topic_name()
    create_topic(broker.bootstrap, topic, 3)
    values = [f"value-{i}".encode() for i in range(900)]
    _produce(
        broker.bootstrap,
        topic,
        values,
        keys=[f"k{i}".encode() for i in range(900)],
        partitions=[i % 3 for i in range(900)],
    )
    from continuity.cli import main

    out = tmp_path / "stream.parquet"
    assert (
        main(
            [
                "record",
                "--bootstrap",
                broker.bootstrap,
                "--topic",
                topic,
                "--out",
                str(out),
                "--from-beginning",
                "--until-end",
            ]
        )
        == 0
    )
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.num_rows == 900
    rows = list(
        zip(
            table.column("partition").to_pylist(),
            table.column("offset").to_pylist(),
            table.column("key").to_pylist(),
            table.column("value").to_pylist(),
            table.column("timestamp_ms").to_pylist(),
        )
    )
    # Against Kafka itself: every record, with its position, key, value and timestamp.
    check = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=3000)
    check.assign([TopicPartition(topic, p) for p in range(3)])
    in_kafka = {(m.partition, m.offset, m.key, m.value, m.timestamp) for m in check}
    check.close()
    assert set(rows) == in_kafka
    source = FileSource(out, read_rows=100)
    replayed = []
    while not source.finished:
        for run in source.poll():
            replayed.extend(
                (run.partition, int(o), k, v, int(t))
                for o, k, v, t in zip(run.offsets, run.keys, run.values, run.timestamps_ms)
            )
    assert replayed == rows  # same order as recorded
    # --max-records with the Python API
    assert (
        record_topic(
            KafkaSettings(broker.bootstrap, (topic,)), tmp_path / "part.parquet", from_beginning=True, max_records=10
        )
        == 10
    )


def test_unreachable_broker_is_retried_with_backoff_without_crashing(caplog):
    port = free_port()
    settings = KafkaSettings(f"127.0.0.1:{port}", ("nowhere",), request_timeout_ms=1000, bootstrap_timeout_ms=300)
    source = KafkaSource(settings)
    ingest = Ingest(source, BinaryCodec(SPEC), MemoryDeadLetters()).start()
    try:
        with caplog.at_level("WARNING", logger="stream.kafka"):
            deadline = time.monotonic() + 20
            while source.errors < 2 and time.monotonic() < deadline:
                assert ingest.get(timeout_s=0.2) is None
        assert source.errors >= 2
        assert any("retry" in r.getMessage() for r in caplog.records)
    finally:
        ingest.stop()


def test_two_process_shares_read_disjoint_partitions_and_one_reader_resumes_all_of_them_at_their_positions(
    broker, topic_name
):
    """Process i of 2 reads partitions p % 2 == i by assignment (no group); a restart as one process,
    from both processes' positions merged, reads every partition on from where its owner stopped."""
    topic = topic_name()
    create_topic(broker.bootstrap, topic, 4)
    codec = BinaryCodec(ID_SPEC)
    n = 400
    _produce(
        broker.bootstrap,
        topic,
        [codec.encode(np.array([i, i]), i % 10) for i in range(n)],
        partitions=[i % 4 for i in range(n)],
    )
    settings = KafkaSettings(broker.bootstrap, (topic,))
    seen: list[int] = []
    saved = Positions()
    for process in (0, 1):
        source = KafkaSource(settings, share=ProcessShare(process, 2))
        batcher = Batcher(ID_SPEC, 16, ownership=source.ownership)
        with Ingest(source, codec) as ingest:
            part = _collect(ingest, batcher, 190)[:11]  # 176 of its 200 examples (so of both partitions), then stop
        ids = _ids(part)
        assert {i % 4 for i in ids} == {process, process + 2}  # its share, both of its partitions
        assert {key.partition for key in part[-1].positions} == {process, process + 2}
        seen += ids
        saved = saved.merged(part[-1].positions)
    assert len(saved) == 4  # every partition of every process
    one = KafkaSource(settings, start=saved)
    batcher = Batcher(ID_SPEC, 16, ownership=one.ownership, start=saved)
    with Ingest(one, codec) as ingest:
        rest = _ids(_collect(ingest, batcher, n - len(seen)))
    assert sorted(seen + rest) == list(range(n))  # every record once: nothing skipped or read twice
    assert batcher.positions == Positions({(topic, p): 100 for p in range(4)})


def test_a_process_share_is_read_by_assignment_never_by_a_consumer_group(broker):
    from continuity.stream import KafkaSourceError

    with pytest.raises(KafkaSourceError, match="read by assignment: give no `group_id`"):
        KafkaSource(KafkaSettings(broker.bootstrap, ("t",), group_id="g"), share=ProcessShare(0, 2))
    with pytest.raises(ValueError, match=r"`process` must be in 0 \.\. processes - 1 = 1"):
        ProcessShare(2, 2)
    assert ProcessShare(1, 3).select("t", range(7)) == [1, 4]
