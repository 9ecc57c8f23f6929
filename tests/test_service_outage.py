"""The whole service through a broker outage: keep training what is buffered, reconnect, go on.

The Service (what `continuity serve` runs) reads a one-partition topic through a TCP proxy
in front of the embedded broker (Tansu keeps topics in memory only, so the outage is a
cut proxy, not a stopped broker). Only the service's consumer is cut off: the stream goes
on meanwhile, and a second group member takes the partition over, as a real broker's
eviction of a member gone past its session timeout would (Tansu does not evict). When the
proxy is restored the service rejoins with its partitions lost, the hard case.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import SHORT_SESSION_SET, accepted_chain
from kafka import KafkaConsumer

from continuity.benchmarks.tcp_proxy import TcpProxy
from continuity.config import load_config
from continuity.service import Service
from continuity.stream import (
    EmbeddedBroker,
    FeatureSpec,
    Holdout,
    PartitionRecords,
    Positions,
    ScenarioSource,
    create_topic,
    free_port,
    make_codec,
    produce_records,
)
from continuity.stream.scenarios import make_scenario

pytestmark = pytest.mark.slow  # serve through a broker outage

SPEC = FeatureSpec((8, 8, 1), "float32", 10)
EXAMPLES_PER_RECORD = 10


class _ServiceThread:
    """`Service.run()` on a thread; keeps its summary or the exception it raised."""

    def __init__(self, service: Service):
        self.service = service
        self.summary = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="service-under-test", daemon=True)

    def _run(self):
        try:
            self.summary = self.service.run()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def check_running(self, what: str) -> None:
        if not self.thread.is_alive():
            raise AssertionError(f"the service exited ({self.error!r}) while {what}")

    def stop(self, timeout_s: float) -> float:
        started = time.monotonic()
        self.service.stop_event.set()
        self.thread.join(timeout_s)
        return time.monotonic() - started


def _wait(condition, timeout_s: float, what: str, running: _ServiceThread):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running.check_running(f"waiting for {what}")
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _accepted_up_to(ledger: list[dict], topic: str) -> int:
    """The furthest offset an accepted window reached (0 before the first)."""
    ends = [Positions.from_json(e["positions"]).offset(topic, 0) or 0 for e in ledger if e["event"] == "accept"]
    return max(ends, default=0)


def _fetched_up_to(service: Service, topic: str) -> int:
    """The offset after the last record the service's current reader fetched from partition 0."""
    reader = service.loop.reader
    start = reader.source.start.get((topic, 0))
    return (0 if start is None else start.offset) + reader.ingest.stats.records


def _take_over_the_group(bootstrap: str, group: str, topic: str, session_timeout_ms: int) -> None:
    """Join the group as a second member, get its partitions, and leave without committing.

    A real Kafka broker evicts a member that stays away past its session timeout; Tansu does
    not (a member cut off for 30 s keeps its generation), so this does it: when the service
    comes back, its generation is gone and its partitions are lost, not revoked.
    """
    member = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        client_id="outage-test-member",
        enable_auto_commit=False,
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=1000,
        max_poll_records=1,
    )
    try:
        deadline = time.monotonic() + 30
        while not member.assignment():
            assert time.monotonic() < deadline, "the second member did not get the partition within 30 s"
            member.poll(timeout_ms=200)
    finally:
        member.close(autocommit=False)


def _examples_to_train(records: list[tuple[bytes, bytes]], topic: str, codec, holdout: Holdout) -> int:
    """Examples in `records` (offsets 0..n-1 of partition 0) that are not held out for the probe."""
    n = len(records)
    run = PartitionRecords(
        topic, 0, [v for _, v in records], [k for k, _ in records], np.arange(n, dtype=np.int64), np.zeros(n, np.int64)
    )
    block, letters = codec.decode(run)
    assert not letters
    return len(block) - int(holdout.select(block).sum())


def test_serve_rides_out_a_broker_outage_and_trains_every_record_once(topic_name, tmp_path, caplog):
    caplog.set_level("INFO", logger="continuity.stream.kafka")
    topic = topic_name()
    codec = make_codec("binary", SPEC)
    scenario = ScenarioSource(
        make_scenario("permuted-digits", segments=2, seed=3),
        codec,
        topic=topic,
        examples_per_record=EXAMPLES_PER_RECORD,
    )
    records = [scenario.encode_record(i) for i in range(len(scenario))]
    before = len(records) // 2  # produced before the outage; the rest after it
    proxy_port = free_port()
    with EmbeddedBroker(advertised_port=proxy_port) as broker:
        proxy = TcpProxy(proxy_port, broker.port).start()  # every client, the service's too, goes through it
        running = None
        try:
            create_topic(broker.bootstrap, topic, 1)
            produce_records(broker.bootstrap, topic, records[:before])
            config = load_config(
                None,
                [
                    f'stream.bootstrap="{broker.bootstrap}"',
                    f'stream.topics=["{topic}"]',
                    f'stream.group="{topic}-group"',
                    SHORT_SESSION_SET,
                    f'checkpoints.dir="{tmp_path / "run"}"',
                    "model.hidden=[64]",
                    "replay.capacity=256",
                    "probe.every_examples=500",
                    "service.progress_every_s=1.0",
                ],
            )
            service = Service(config, http=False)
            running = _ServiceThread(service)
            running.thread.start()
            ledger = service.store.ledger

            _wait(lambda: service.status()["examples_trained"] > 0, 120, "the first trained examples", running)
            proxy.cut(config.stream.kafka_settings().client_id)  # the service's consumer only
            outage_started = time.monotonic()
            trained_at_cut = service.status()["examples_trained"]

            # While cut: alive but not ready (/readyz 503), the progress line says so, and whatever
            # was fetched before the cut is trained, judged and checkpointed (the loop closes a
            # quiet window after judge_idle_s).
            _wait(lambda: not service.ready(), 30, "readiness to go with the broker", running)
            _wait(
                lambda: "broker unreachable for" in (service.stream_note() or ""),
                30,
                "the stream's state to say the broker is unreachable",
                running,
            )

            def buffered_checkpointed():
                running.check_running("the broker was unreachable")
                return _fetched_up_to(service, topic) == _accepted_up_to(ledger.read(), topic) > 0

            _wait(buffered_checkpointed, 30, "a checkpoint of everything fetched before the cut", running)
            fetched_before_cut = _fetched_up_to(service, topic)
            # The stream goes on while the service is away, and the group moves on without it.
            produce_records(broker.bootstrap, topic, records[before:])
            _take_over_the_group(broker.bootstrap, config.stream.group, topic, config.stream.session_timeout_ms)
            running.check_running("the broker was unreachable")
            assert not service.ready(), "the service was ready while its broker was unreachable"
            trained_in_outage = service.status()["examples_trained"] - trained_at_cut
            outage_seconds = time.monotonic() - outage_started

            proxy.restore()
            _wait(service.ready, 60, "readiness once the broker is back and partitions are assigned", running)
            _wait(
                lambda: _accepted_up_to(ledger.read(), topic) >= len(records),
                90,
                "every record trained after the broker came back",
                running,
            )
            seconds_to_stop = running.stop(30)
            assert not running.thread.is_alive(), "the service did not stop within 30 s of the stop request"
        finally:
            if running is not None and running.thread.is_alive():
                running.stop(30)
            proxy.cut()

    assert running.error is None, repr(running.error)
    assert any("lost partitions" in r.getMessage() for r in caplog.records), (
        "the service was never evicted from its group: the test did not reach the case it is for"
    )
    summary = running.summary
    assert summary.stopped and not summary.halted
    assert summary.dead_letters == 0 and summary.skipped_updates == 0
    print(
        f"\nfetched before the cut {fetched_before_cut} of {before} records; {trained_in_outage} examples "
        f"trained in a {outage_seconds:.1f} s outage; stopped in {seconds_to_stop:.1f} s; {summary.rollbacks} rollbacks"
    )

    # The surviving lineage: accepted windows chained by parent, contiguous from 0 to the end.
    store = service.store
    events = store.ledger.read()
    chain = accepted_chain(events, store.last_good())
    assert Positions.from_json(chain[0]["from"]).offset(topic, 0) in (None, 0)
    for earlier, later in zip(chain, chain[1:]):
        assert later["from"] == earlier["positions"]
        assert Positions.from_json(later["positions"]).offset(topic, 0) >= Positions.from_json(
            earlier["positions"]
        ).offset(topic, 0)
    # The final checkpoint is good, stands at the topic's end, and every record was trained
    # exactly once in its lineage: a record trained twice (or lost) changes the example count.
    final = store.info(store.last_good()).metadata
    assert final["status"] == "good"
    assert Positions.from_json(final["positions"]) == Positions({(topic, 0): len(records)})
    expected = _examples_to_train(
        records, topic, codec, Holdout(config.probe.holdout_fraction, salt=config.service.seed)
    )
    assert final["lineage_examples"] == expected
    if summary.rollbacks == 0:  # no window retrained after a regression: this run trained each example once
        assert summary.examples_trained == expected
    stop = [e for e in events if e["event"] == "stop"][-1]
    assert stop["positions"] == final["positions"]
