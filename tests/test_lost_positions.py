"""Positions the broker no longer has: a broker that lost its log, a recreated topic, a broker
replaced while the source reads. The source never skips or re-reads silently: it halts by
default, or goes on at the log start ("earliest") or end ("latest") as configured.

"A broker that lost its data" is a second embedded broker started on the port of a stopped
one: Tansu keeps topics in memory only, so it comes back empty, and a topic created on it
again gets a new topic id.
"""

from __future__ import annotations

import logging
import time

import pytest
from conftest import SHORT_SESSION
from kafka import KafkaProducer

from continuity.stream import (
    EmbeddedBroker,
    KafkaSettings,
    KafkaSource,
    KafkaSourceError,
    LostPosition,
    LostPositionsError,
    Positions,
    create_topic,
    free_port,
)
from continuity.stream.kafka import TopicIdentity

TOPIC = "digits"


class _Brokers:
    """Embedded brokers on one port, started one after the other: each new one has lost the data."""

    def __init__(self):
        self.port = free_port()
        self.current: EmbeddedBroker | None = None

    def start(self) -> EmbeddedBroker:
        self.current = EmbeddedBroker(self.port).start()
        return self.current

    def replace(self) -> EmbeddedBroker:
        """Stop the running broker and start an empty one on its port."""
        if self.current is not None:
            self.current.stop()
        return self.start()

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


@pytest.fixture
def brokers():
    running = _Brokers()
    yield running
    running.stop()


def _produce(bootstrap: str, tag: str, n: int, *, one_batch_each: bool = True) -> None:
    """`n` records `<tag><i>`; one produce request each, so the broker's reported log end is exact."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0 if one_batch_each else 5)
    for i in range(n):
        producer.send(TOPIC, f"{tag}{i}".encode(), partition=0)
        if one_batch_each:
            producer.flush()
    producer.flush()
    producer.close()


def _read(source: KafkaSource, *, until: int | None = None, seconds: float = 15.0) -> list[bytes]:
    """Values polled for `seconds`, or until `until` values arrived."""
    values: list[bytes] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (until is None or len(values) < until):
        for run in source.poll(0.2):
            values.extend(run.values)
    return values


def _old_run(brokers: _Brokers, settings: KafkaSettings, n: int = 50) -> tuple[Positions, dict]:
    """Read `n` records of a fresh topic to the end: the positions and topic identities a checkpoint keeps."""
    broker = brokers.start()
    create_topic(broker.bootstrap, TOPIC, 1)
    _produce(broker.bootstrap, "old", n, one_batch_each=False)
    source = KafkaSource(settings)
    try:
        assert len(_read(source, until=n)) == n
        identities = source.topic_identities()
    finally:
        source.close()
    assert identities[TOPIC]["partitions"] == 1 and identities[TOPIC]["id"]  # Tansu reports topic ids
    return Positions({(TOPIC, 0): n}), identities


def _restarted(settings: KafkaSettings, positions: Positions, identities: dict | None):
    """A source resuming from a checkpoint's positions; its lost-position reports collected."""
    source = KafkaSource(settings, start=positions)
    if identities is not None:
        source.expect_topics(identities)
    reports: list[tuple[str, tuple[LostPosition, ...]]] = []
    source.on_lost_positions = lambda action, lost: reports.append((action, lost))
    return source, reports


def _settings(bootstrap: str, policy: str = "halt", group: str | None = None) -> KafkaSettings:
    return KafkaSettings(bootstrap, (TOPIC,), group_id=group, on_lost_positions=policy, **SHORT_SESSION)


def test_a_broker_that_lost_its_log_halts_the_source_before_it_reads_a_record(brokers):
    settings = _settings(f"127.0.0.1:{brokers.port}")
    positions, _ = _old_run(brokers, settings)
    broker = brokers.replace()
    create_topic(broker.bootstrap, TOPIC, 1)
    _produce(broker.bootstrap, "new", 10)
    # A checkpoint written before topic identities were kept: only the position can tell.
    source, reports = _restarted(settings, positions, None)
    try:
        with pytest.raises(LostPositionsError) as raised:
            _read(source)
        assert not source.ready and source.state_note() == "stopped: saved positions lost"
        with pytest.raises(LostPositionsError):  # it stays stopped
            source.poll(0.1)
    finally:
        source.close()
    (lost,) = raised.value.lost
    assert (lost.topic, lost.partition, lost.offset, lost.log_end) == (TOPIC, 0, 50, 10)
    assert lost.reason == "beyond the log end" and lost.resumed_at is None
    assert "digits/0 at offset 50 (log 0..10): beyond the log end" in str(raised.value)
    assert reports == [("halt", (lost,))]


def test_a_recreated_topic_halts_the_source_even_when_its_new_log_reaches_past_the_saved_position(brokers, caplog):
    settings = _settings(f"127.0.0.1:{brokers.port}", group="continuity")
    positions, identities = _old_run(brokers, settings)
    broker = brokers.replace()
    create_topic(broker.bootstrap, TOPIC, 1)
    _produce(broker.bootstrap, "new", 80, one_batch_each=False)  # offset 50 exists again, in another log
    source, reports = _restarted(settings, positions, identities)
    try:
        with caplog.at_level(logging.ERROR, logger="continuity.stream.kafka"), pytest.raises(LostPositionsError):
            delivered = _read(source)
            pytest.fail(f"the source read {len(delivered)} records of the recreated topic")
    finally:
        source.close()
    ((action, (lost,)),) = reports
    assert action == "halt" and (lost.partition, lost.offset) == (0, 50)
    assert lost.reason.startswith("the topic was recreated (its id was " + identities[TOPIC]["id"])
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "digits/0 at offset 50" in line and "an operator decides" in line


def test_earliest_reads_a_recreated_topic_from_its_log_start(brokers):
    settings = _settings(f"127.0.0.1:{brokers.port}", "earliest", group="continuity")
    positions, identities = _old_run(brokers, settings)
    broker = brokers.replace()
    create_topic(broker.bootstrap, TOPIC, 1)
    _produce(broker.bootstrap, "new", 80, one_batch_each=False)
    source, reports = _restarted(settings, positions, identities)
    try:
        values = _read(source, until=80)
        assert source.ready
        new_identity = source.topic_identities()[TOPIC]
    finally:
        source.close()
    assert values == [f"new{i}".encode() for i in range(80)]  # every record of the new log, once
    ((action, (lost,)),) = reports
    assert action == "earliest" and (lost.offset, lost.resumed_at) == (50, 0)
    assert new_identity["id"] != identities[TOPIC]["id"]  # a checkpoint now refers to the new topic


def test_latest_skips_a_lost_log_and_reads_what_arrives_after(brokers):
    settings = _settings(f"127.0.0.1:{brokers.port}", "latest")
    positions, identities = _old_run(brokers, settings)
    broker = brokers.replace()
    create_topic(broker.bootstrap, TOPIC, 1)
    _produce(broker.bootstrap, "skipped", 10)
    source, reports = _restarted(settings, positions, identities)
    try:
        assert _read(source, seconds=6) == []
        ((action, (lost,)),) = reports
        assert action == "latest" and (lost.offset, lost.resumed_at) == (50, 10)
        _produce(broker.bootstrap, "after", 5)
        values = _read(source, until=5)
    finally:
        source.close()
    assert values == [f"after{i}".encode() for i in range(5)]  # the 10 in between are never read


def test_a_broker_replaced_while_the_source_reads_halts_it_before_a_record_of_the_new_log(brokers):
    settings = _settings(f"127.0.0.1:{brokers.port}", group="continuity")
    broker = brokers.start()
    create_topic(broker.bootstrap, TOPIC, 1)
    _produce(broker.bootstrap, "old", 50, one_batch_each=False)
    source, reports = _restarted(settings, Positions(), None)
    read: list[bytes] = []
    try:
        read += _read(source, until=50)
        broker.stop()
        # An outage: the source notices, pauses fetching and says so.
        deadline = time.monotonic() + 15
        while "broker unreachable" not in (source.state_note() or ""):
            assert time.monotonic() < deadline, "the source did not notice the broker was gone"
            read += _read(source, seconds=0.2)
        assert not source.ready
        broker = brokers.start()  # back, empty: the topic recreated, its new log longer than what was read
        create_topic(broker.bootstrap, TOPIC, 1)
        _produce(broker.bootstrap, "new", 100, one_batch_each=False)
        with pytest.raises(LostPositionsError) as raised:
            read += _read(source, seconds=90)
    finally:
        source.close()
    assert read == [f"old{i}".encode() for i in range(50)]
    (lost,) = raised.value.lost
    assert lost.offset == 50 and "recreated" in lost.reason
    assert [action for action, _ in reports] == ["halt"]


def test_a_broker_back_without_the_topic_is_said_to_lack_it_not_to_be_unreachable(brokers, caplog):
    settings = _settings(f"127.0.0.1:{brokers.port}", group="continuity")
    broker = brokers.start()
    create_topic(broker.bootstrap, TOPIC, 1)
    _produce(broker.bootstrap, "old", 20, one_batch_each=False)
    source, reports = _restarted(settings, Positions(), None)
    caplog.set_level(logging.WARNING, logger="continuity.stream.kafka")
    try:
        assert len(_read(source, until=20)) == 20
        broker.stop()
        deadline = time.monotonic() + 15
        while "broker unreachable" not in (source.state_note() or ""):
            assert time.monotonic() < deadline, "the source did not notice the broker was gone"
            _read(source, seconds=0.2)
        brokers.start()  # back, empty: it answers, and has no such topic
        deadline = time.monotonic() + 15
        while source.state_note() != f"topic {TOPIC!r} does not exist":
            assert time.monotonic() < deadline, f"the source still says {source.state_note()!r}"
            assert _read(source, seconds=0.2) == []
        assert not source.ready
    finally:
        source.close()
    assert reports == []  # nothing of the topic known yet: nothing judged lost
    said = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    assert said and f"topic {TOPIC!r} does not exist on" in said[0]
    assert "create it with the partition count you want, or check the name" in said[0]


class _Poller:
    """Polls a source on a thread of its own, as the ingest thread does (open() may wait there)."""

    def __init__(self, source: KafkaSource):
        import threading

        self.source = source
        self.values: list[bytes] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        source.stop_requested = self._stop.is_set
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for run in self.source.poll(0.2):
                    self.values.extend(run.values)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def wait(self, condition, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert self.error is None, repr(self.error)
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.source.close()


@pytest.mark.parametrize("group", ["continuity", None], ids=["group", "assigned"])
def test_a_missing_topic_is_warned_about_and_never_created_by_the_source(broker, topic_name, group, caplog):
    topic = topic_name()
    settings = KafkaSettings(broker.bootstrap, (topic,), group_id=group and f"{topic}-group", **SHORT_SESSION)
    source = KafkaSource(settings)
    caplog.set_level(logging.WARNING, logger="continuity.stream.kafka")
    poller = _Poller(source)
    try:
        poller.wait(lambda: any("does not exist" in r.getMessage() for r in caplog.records), "a warning")
        (warning,) = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
        assert repr(topic) in warning and "never creates topics" in warning
        assert source.state_note() == f"topic {topic!r} does not exist" and not source.ready
        time.sleep(2)  # a few more metadata requests for it
        assert topic not in _topics(broker.bootstrap)  # none of them asked the broker to create it
        # Created (by whoever owns it), it is read.
        create_topic(broker.bootstrap, topic, 1)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        producer.send(topic, b"first", partition=0)
        producer.flush()
        producer.close()
        poller.wait(lambda: poller.values == [b"first"], "the first record")
        assert source.ready and source.state_note() is None
    finally:
        poller.stop()
    assert poller.error is None


def _topics(bootstrap: str) -> set[str]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_an_empty_topic_is_warned_about(broker, topic_name, caplog):
    topic = topic_name()
    create_topic(broker.bootstrap, topic, 2)
    source = KafkaSource(KafkaSettings(broker.bootstrap, (topic,)))
    try:
        with caplog.at_level(logging.WARNING, logger="continuity.stream.kafka"):
            _read(source, seconds=3)
    finally:
        source.close()
    (warning,) = [r.getMessage() for r in caplog.records if "is empty" in r.getMessage()]
    assert repr(topic) in warning and "[0, 1]" in warning


def test_a_source_reading_until_the_end_of_a_missing_topic_gives_up_with_a_clear_error(broker, topic_name):
    topic = topic_name()
    source = KafkaSource(KafkaSettings(broker.bootstrap, (topic,)), until_end=True)
    source.until_end_topic_wait_s = 1.0
    with pytest.raises(KafkaSourceError, match="does it exist"):
        source.open()
    source.close()
    assert topic not in _topics(broker.bootstrap)


# ---- the decision, on a stand-in for kafka-python's metadata cache (Tansu cannot add partitions) ----


class _Cluster:
    def __init__(self, partitions: dict[str, int], ids: dict[str, str | None]):
        self._partitions, self._ids = partitions, ids

    def partitions_for_topic(self, topic):
        return set(range(self._partitions[topic])) if topic in self._partitions else None

    def topic_id(self, topic):
        return self._ids.get(topic)


class _Consumer:
    def __init__(self, partitions: int, topic_id: str | None):
        self._cluster = _Cluster({TOPIC: partitions}, {TOPIC: topic_id})
        self.paused: set = set()

    def assignment(self):
        from kafka import TopicPartition

        return {TopicPartition(TOPIC, p) for p in range(self._cluster._partitions[TOPIC])}

    def pause(self, *tps):
        self.paused |= set(tps)


def _judged(saved: TopicIdentity | None, now: _Consumer, held: dict[int, int]) -> list[LostPosition]:
    source = KafkaSource(
        KafkaSettings("127.0.0.1:1", (TOPIC,)), start=Positions({(TOPIC, p): o for p, o in held.items()})
    )
    if saved is not None:
        source.expect_topics({TOPIC: saved.to_json()})
    source._check_topics(now, [TOPIC])
    return [p for entries, _ in source._pending_lost for p in entries]


@pytest.mark.parametrize(
    "saved,now,lost_reason",
    [
        (TopicIdentity("a", 1), _Consumer(1, "a"), None),
        (TopicIdentity("a", 1), _Consumer(1, "b"), "the topic was recreated (its id was a, now b)"),
        (TopicIdentity("a", 1), _Consumer(4, "b"), "the topic was recreated (its id was a, now b)"),
        (TopicIdentity("a", 1), _Consumer(4, "a"), None),  # Kafka's own way to grow a topic
        (TopicIdentity(None, 1), _Consumer(4, None), "the topic has 4 partitions, not 1"),
        (TopicIdentity("a", 4), _Consumer(1, "a"), "the topic has 1 partitions, not 4"),
        (None, _Consumer(1, "a"), None),  # a checkpoint from before identities were kept, partition 0 exists
    ],
    ids=["same", "new-id", "new-id-and-size", "grown", "grown-without-ids", "shrunk", "no-identity-saved"],
)
def test_a_topic_is_judged_recreated_by_its_id_or_by_a_partition_count_no_grown_topic_explains(saved, now, lost_reason):
    lost = _judged(saved, now, {0: 7953})
    if lost_reason is None:
        assert lost == [] and not now.paused
    else:
        (only,) = lost
        assert only.reason.startswith(lost_reason) and (only.partition, only.offset) == (0, 7953)
        assert now.paused == now.assignment()  # nothing is read until poll acts on it


def test_saved_partitions_a_topic_no_longer_has_are_lost_even_without_a_saved_identity():
    lost = _judged(None, _Consumer(1, "a"), {0: 10, 2: 40})
    assert [(p.partition, p.offset) for p in lost] == [(0, 10), (2, 40)]
    assert "fewer than the saved positions imply" in lost[0].reason


class _KafkaSaysOutOfRange(_Consumer):
    """Apache Kafka's answer to a fetch below the log start (retention deleted the records):
    with auto_offset_reset = "none", kafka-python raises OffsetOutOfRangeError from poll."""

    def __init__(self):
        from types import SimpleNamespace

        super().__init__(1, "a")
        self._cluster.brokers = lambda: [SimpleNamespace(node_id=1)]
        self._client = SimpleNamespace(connected=lambda node_id: True)
        self._subscription = SimpleNamespace(assignment={})
        self.seeks: dict = {}

    def poll(self, timeout_ms):
        from kafka import TopicPartition
        from kafka.errors import OffsetOutOfRangeError

        raise OffsetOutOfRangeError({TopicPartition(TOPIC, 0): 7953})

    def beginning_offsets(self, tps, timeout_ms=None):
        return {tp: 8000 for tp in tps}

    def end_offsets(self, tps, timeout_ms=None):
        return {tp: 9000 for tp in tps}

    def seek(self, tp, offset):
        self.seeks[tp] = offset

    def resume(self, *tps):
        self.paused -= set(tps)


@pytest.mark.parametrize("policy", ["halt", "earliest"])
def test_kafkas_offset_out_of_range_is_a_lost_position_never_a_silent_reset(policy):
    source = KafkaSource(
        KafkaSettings("127.0.0.1:1", (TOPIC,), on_lost_positions=policy), start=Positions({(TOPIC, 0): 7953})
    )
    consumer = source._consumer = _KafkaSaysOutOfRange()
    reports = []
    source.on_lost_positions = lambda action, lost: reports.append((action, lost))
    if policy == "halt":
        with pytest.raises(LostPositionsError, match=r"digits/0 at offset 7,953 \(log 8,000..9,000\): out of the log"):
            source.poll()
        assert consumer.seeks == {}  # nothing moved
    else:
        assert source.poll() == []
        assert list(consumer.seeks.values()) == [8000]  # the log start: 47 deleted records are never read
    ((action, (lost,)),) = reports
    assert action == policy and (lost.offset, lost.log_start, lost.log_end) == (7953, 8000, 9000)
