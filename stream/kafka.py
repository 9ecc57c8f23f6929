"""Kafka ingestion with kafka-python: settings, KafkaSource, topic creation, a scenario producer.

KafkaSource never auto-commits. It either joins a consumer group (`group_id`, partitions
assigned by the group) or reads explicit partitions (`partitions`, or every partition of
the topics when `group_id` is None). On the first assignment of a partition it seeks to
the saved start Position; partitions without one follow `auto_offset_reset`.

Its rebalance listener keeps the shared `Ownership` current: a revoked partition's
buffered and queued examples are dropped by the Batcher, and the positions actually
delivered for it are committed to the group, so the next owner resumes exactly there.
(Kafka's commit holds offsets only, and Tansu drops commit metadata: a batched record cut
in half by a rebalance is re-delivered whole to the next owner. Checkpointed Positions
keep the within-record `skip`, so restarts from a checkpoint are exact.)

A broker that cannot be reached is retried with exponential backoff (logged); kafka-python
resumes fetching from its in-memory positions, so nothing is lost or repeated.

Security options (`security_protocol`, `sasl_*`, `ssl_*`) pass straight to kafka-python;
`KafkaSettings` never prints secret values (repr and logs show `***`).

Threading: KafkaSource.poll and open run on one thread (the ingest thread); `commit` may
be called from any thread: it queues the positions and the polling thread commits them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from continuity.stream.broker import SHORT_HEARTBEAT_INTERVAL_MS, SHORT_SESSION_TIMEOUT_MS
from continuity.stream.records import PartitionKey, PartitionPosition, PartitionRecords, Positions
from continuity.stream.sources import Source, SourceError

if TYPE_CHECKING:
    from kafka import KafkaConsumer

log = logging.getLogger(__name__)

SECURITY_OPTIONS = frozenset(
    {
        "security_protocol",
        "sasl_mechanism",
        "sasl_plain_username",
        "sasl_plain_password",
        "sasl_kerberos_service_name",
        "sasl_kerberos_domain_name",
        "sasl_oauth_token_provider",
        "ssl_context",
        "ssl_check_hostname",
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_password",
        "ssl_crlfile",
        "ssl_ciphers",
    }
)
_SECRET_OPTIONS = frozenset({"sasl_plain_password", "ssl_password", "sasl_oauth_token_provider", "ssl_context"})


class KafkaSourceError(SourceError):
    """Kafka settings are invalid (the message names the field)."""


def redact(options: dict) -> dict:
    """A copy of client options safe to log: secret values replaced by '***'."""
    return {k: ("***" if k in _SECRET_OPTIONS and v is not None else v) for k, v in options.items()}


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach and read Kafka. `security` holds SASL/SSL options for kafka-python."""

    bootstrap: str
    topics: tuple = ()
    group_id: str | None = None
    partitions: tuple | None = None  # explicit partition numbers (of every topic), no group
    auto_offset_reset: str = "earliest"
    session_timeout_ms: int = SHORT_SESSION_TIMEOUT_MS
    heartbeat_interval_ms: int = SHORT_HEARTBEAT_INTERVAL_MS
    request_timeout_ms: int = 20000
    max_poll_records: int = 2000
    fetch_max_wait_ms: int = 200
    max_partition_fetch_bytes: int = 8 * 1024 * 1024  # batched records are large: fewer round trips
    reconnect_backoff_max_ms: int = 2000
    bootstrap_timeout_ms: int = 10000  # per connection attempt; open() retries with backoff
    client_id: str = "continuity"
    security: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.bootstrap or not isinstance(self.bootstrap, str):
            raise KafkaSourceError(f"`bootstrap` must be 'host:port'. Got {self.bootstrap!r}")
        topics = (self.topics,) if isinstance(self.topics, str) else tuple(self.topics)
        object.__setattr__(self, "topics", topics)
        if self.auto_offset_reset not in ("earliest", "latest"):
            raise KafkaSourceError(
                f"`auto_offset_reset` must be 'earliest' or 'latest'. Got {self.auto_offset_reset!r}"
            )
        if self.group_id is not None and self.partitions is not None:
            raise KafkaSourceError("give either `group_id` (group assignment) or `partitions` (explicit), not both")
        unknown = set(self.security) - SECURITY_OPTIONS
        if unknown:
            raise KafkaSourceError(f"unknown security option(s) {sorted(unknown)}; allowed: {sorted(SECURITY_OPTIONS)}")
        if self.partitions is not None:
            object.__setattr__(self, "partitions", tuple(int(p) for p in self.partitions))

    def __repr__(self) -> str:
        return (
            f"KafkaSettings(bootstrap={self.bootstrap!r}, topics={self.topics!r}, group_id={self.group_id!r}, "
            f"partitions={self.partitions!r}, security={redact(self.security)!r})"
        )

    def client_options(self) -> dict:
        """Options common to consumers, producers and admin clients."""
        return {"bootstrap_servers": self.bootstrap, "client_id": self.client_id, **self.security}


def create_topic(settings: KafkaSettings | str, topic: str, partitions: int = 1, *, timeout_s: float = 30.0) -> bool:
    """Create `topic` with `partitions` partitions; False if it already existed."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    options = settings.client_options() if isinstance(settings, KafkaSettings) else {"bootstrap_servers": settings}
    admin = KafkaAdminClient(**options, request_timeout_ms=int(timeout_s * 1000))
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)], timeout_ms=int(timeout_s * 1000))
        return True
    except TopicAlreadyExistsError:
        return False
    finally:
        admin.close()


class _Backoff:
    """Exponential backoff: 0.1 s doubling to `cap_s`; reset after a success."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0):
        self.first_s, self.cap_s = first_s, cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.first_s * (2**self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class KafkaSource(Source):
    """Raw records from Kafka topics; see the module docstring."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        start: Positions | None = None,
        until_end: bool = False,
        stop_requested: Callable[[], bool] | None = None,
    ):
        super().__init__(start)
        if not settings.topics:
            raise KafkaSourceError("`topics` must name at least one topic")
        self.settings = settings
        self.until_end = until_end
        self.stop_requested = stop_requested or (lambda: False)
        self._consumer: KafkaConsumer | None = None
        self._closed = False
        self._open_lock = threading.Lock()
        self._first_assignment_done: set = set()
        self._pending_skip: dict[PartitionKey, PartitionPosition] = {}
        self._end_offsets: dict[PartitionKey, int] | None = None
        self._commit_lock = threading.Lock()
        self._pending_commit: Positions | None = None
        self._backoff = _Backoff()
        self._positions: dict[PartitionKey, int] = {}  # next offset after what poll returned
        self.ownership.assign(())  # nothing owned until assigned
        self.errors = 0

    # -- connection
    def _make_consumer(self):
        from kafka import KafkaConsumer

        s = self.settings
        return KafkaConsumer(
            **s.client_options(),
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            request_timeout_ms=s.request_timeout_ms,
            max_poll_records=s.max_poll_records,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes,
            reconnect_backoff_max_ms=s.reconnect_backoff_max_ms,
            bootstrap_timeout_ms=s.bootstrap_timeout_ms,
        )

    def open(self) -> None:
        """Connect, retrying with backoff until the broker answers (or a stop is requested)."""
        from kafka.errors import KafkaError

        while self._consumer is None and not self._closed:
            try:
                consumer = self._make_consumer()
                self._attach(consumer)
                with self._open_lock:
                    if self._closed:
                        # close() ran while this consumer was being made: it must not live on
                        # as a group member nobody polls (it would hold its partitions).
                        consumer.close(autocommit=False)
                        return
                    self._consumer = consumer
                self._backoff.reset()
            except (KafkaError, OSError) as error:
                self.errors += 1
                delay = self._backoff.next_delay()
                log.warning(
                    "kafka: cannot connect to %s (%s); retry %d in %.1f s",
                    self.settings.bootstrap,
                    type(error).__name__,
                    self._backoff.attempt,
                    delay,
                )
                if self.stop_requested():
                    raise
                time.sleep(delay)

    def _attach(self, consumer) -> None:
        from kafka import TopicPartition
        from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener

        s = self.settings
        if s.group_id is not None:
            source = self

            # kafka-python 3 runs listeners on its IO loop, where a blocking commit raises;
            # the async form awaits the commit while heartbeats keep running.
            class Listener(AsyncConsumerRebalanceListener):
                async def on_partitions_revoked(self, revoked):
                    delivered = source._on_revoked(revoked)
                    if delivered:
                        await source._commit_on_loop(consumer, delivered)

                async def on_partitions_assigned(self, assigned):
                    later = source._on_assigned(consumer, assigned)
                    if later:
                        await source._resume_from_committed(consumer, later)

                async def on_partitions_lost(self, lost):
                    source._on_lost(lost)

            consumer.subscribe(list(s.topics), listener=Listener())
            return
        tps: list[TopicPartition] = []
        for topic in s.topics:
            numbers: Iterable[int]
            if s.partitions is not None:
                numbers = s.partitions
            else:
                numbers = self._wait_for_partitions(consumer, topic)
            tps.extend(TopicPartition(topic, p) for p in numbers)
        consumer.assign(tps)
        self._on_assigned(consumer, tps)

    def _wait_for_partitions(self, consumer, topic: str, timeout_s: float = 10.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = consumer.partitions_for_topic(topic)
            if found:
                return sorted(found)
            if time.monotonic() > deadline:
                raise KafkaSourceError(
                    f"topic {topic!r} has no partitions on {self.settings.bootstrap} (does it exist?)"
                )
            time.sleep(0.1)

    # -- rebalance (called on kafka-python's thread inside poll)
    def _on_assigned(self, consumer, assigned) -> list:
        """Seek first assignments to the start Positions; returns partitions assigned again."""
        keys = [PartitionKey(tp.topic, tp.partition) for tp in assigned]
        later = []
        for tp, key in zip(assigned, keys):
            if key in self._first_assignment_done:
                later.append(tp)
                continue
            self._first_assignment_done.add(key)
            try:
                saved = self.start[key]
            except KeyError:
                continue
            consumer.seek(tp, saved.offset)
            if saved.skip:
                self._pending_skip[key] = saved
        if self.until_end and self._end_offsets is None:
            ends = consumer.end_offsets(list(assigned))
            self._end_offsets = {PartitionKey(tp.topic, tp.partition): off for tp, off in ends.items()}
        self.ownership.assign(keys)
        log.info("kafka: assigned %s", sorted(f"{k.topic}/{k.partition}" for k in keys))
        return later

    async def _resume_from_committed(self, consumer, partitions) -> None:
        """A partition assigned again resumes where this member's delivery stopped, or at the
        group's committed offset when that is further on (another member read on meanwhile).

        kafka-python keeps the fetch position of a partition that comes back to the same
        member after an eager rebalance; the records fetched past the delivered position
        were dropped with the revocation, so that position would skip them. The committed
        offset alone can lag what was delivered: a member evicted during a broker outage
        loses its partitions without committing, and the loop commits only checkpointed
        positions, so resuming there would deliver records a second time.
        """
        try:
            committed = await consumer._coordinator.fetch_committed_offsets_async(set(partitions))
        except Exception as error:  # noqa: BLE001 - fall back to the reset policy below
            log.warning("kafka: cannot fetch committed offsets (%s); following auto_offset_reset", type(error).__name__)
            committed = {}
        for tp in partitions:
            key = PartitionKey(tp.topic, tp.partition)
            self._pending_skip.pop(key, None)
            found = committed.get(tp)
            with self.ownership.lock:
                ours = self.ownership.delivered.get(key, self.start.get(key))
            if ours is not None and (found is None or found.offset < 0 or found.offset <= ours.offset):
                consumer.seek(tp, ours.offset)
                if ours.skip:
                    self._pending_skip[key] = ours
            elif found is not None and found.offset >= 0:
                consumer.seek(tp, found.offset)
            elif self.settings.auto_offset_reset == "earliest":
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek_to_end(tp)

    def rewind(self, positions: Positions) -> bool:
        """Seek the live consumer to `positions` (a rollback or a retried window).

        Re-opening would close a group member and make a new one, and a member closed
        while it is still joining lingers in the group until the broker's rebalance
        timeout, holding the partitions. False (re-open instead) when the consumer is not
        open or an assigned partition has no position to go to.
        """
        consumer = self._consumer
        if consumer is None or self._closed:
            return False
        assigned = {PartitionKey(tp.topic, tp.partition): tp for tp in consumer.assignment()}
        targets = dict(positions.items())
        if any(key not in targets for key in assigned):
            return False
        self.start = positions
        self._pending_skip.clear()
        with self.ownership.lock:
            # A partition assigned again later resumes at what was delivered (see
            # _resume_from_committed): that is now `positions`, not what was read before.
            self.ownership.delivered = {PartitionKey(*key): position for key, position in targets.items()}
        for key, tp in assigned.items():
            saved = targets[key]
            consumer.seek(tp, saved.offset)
            if saved.skip:
                self._pending_skip[key] = saved
            self._positions[key] = saved.offset
        log.info("kafka: rewound to %s", positions)
        return True

    def _on_revoked(self, revoked) -> Positions:
        """Drop revoked partitions from ownership; returns their delivered positions (to commit)."""
        delivered = Positions(self.ownership.revoke([(tp.topic, tp.partition) for tp in revoked]))
        for tp in revoked:
            self._positions.pop(PartitionKey(tp.topic, tp.partition), None)
        if revoked:
            log.info(
                "kafka: revoked %s (delivered %s)", sorted(f"{tp.topic}/{tp.partition}" for tp in revoked), delivered
            )
        return delivered

    async def _commit_on_loop(self, consumer, positions: Positions) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        offsets = {
            TopicPartition(k.topic, k.partition): OffsetAndMetadata(p.offset, "", -1) for k, p in positions.items()
        }
        try:
            # The coroutine kafka-python itself awaits for its pre-rebalance auto-commit.
            await consumer._coordinator._commit_offsets_sync_async(offsets)
        except Exception as error:  # noqa: BLE001 - a failed commit means duplicates, never a crash
            log.warning(
                "kafka: commit on revocation failed (%s); the next owner may re-read %s",
                type(error).__name__,
                positions,
            )

    def _on_lost(self, lost) -> None:
        # Membership already gone: the partitions belong to someone else; commit nothing.
        self.ownership.revoke([(tp.topic, tp.partition) for tp in lost])
        log.warning("kafka: lost partitions %s", sorted(f"{tp.topic}/{tp.partition}" for tp in lost))

    # -- commits
    def commit(self, positions: Positions) -> None:
        """Queue `positions` to be committed to the group by the polling thread."""
        if self.settings.group_id is None:
            return
        with self._commit_lock:
            self._pending_commit = positions if self._pending_commit is None else self._pending_commit.merged(positions)

    def _commit_now(self, consumer, positions: Positions) -> bool:
        from kafka import TopicPartition
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        offsets = {
            TopicPartition(k.topic, k.partition): OffsetAndMetadata(p.offset, "", -1) for k, p in positions.items()
        }
        if not offsets:
            return True
        try:
            consumer.commit(offsets)
            return True
        except KafkaError as error:
            log.warning(
                "kafka: commit of %s failed (%s); will retry with the next commit", positions, type(error).__name__
            )
            return False

    def _flush_commit(self) -> None:
        with self._commit_lock:
            pending, self._pending_commit = self._pending_commit, None
        if pending is None:
            return
        owned = self.ownership.owned()
        if owned is not None:
            pending = pending.only(owned)
        if pending and not self._commit_now(self._consumer, pending):
            with self._commit_lock:
                self._pending_commit = pending if self._pending_commit is None else pending.merged(self._pending_commit)

    # -- reading
    def poll(self, timeout_s: float = 0.1) -> list[PartitionRecords]:
        from kafka.errors import KafkaError

        if self._consumer is None:
            self.open()
        consumer = self._consumer
        if consumer is None:  # open() gave up: close() ran meanwhile
            return []
        try:
            self._flush_commit()
            fetched = consumer.poll(timeout_ms=int(timeout_s * 1000))
        except KafkaError as error:
            self.errors += 1
            delay = self._backoff.next_delay()
            log.warning(
                "kafka: poll failed (%s: %s); retry %d in %.1f s",
                type(error).__name__,
                error,
                self._backoff.attempt,
                delay,
            )
            time.sleep(delay)
            return []
        self._backoff.reset()
        runs = []
        for tp, messages in fetched.items():
            if not messages:
                continue
            run = PartitionRecords(
                tp.topic,
                tp.partition,
                [m.value for m in messages],
                [m.key for m in messages],
                np.fromiter((m.offset for m in messages), np.int64, len(messages)),
                np.fromiter((m.timestamp for m in messages), np.int64, len(messages)),
            )
            key = PartitionKey(tp.topic, tp.partition)
            pending = self._pending_skip.pop(key, None)
            if pending is not None and run.offsets[0] == pending.offset:
                run.skip_first = pending.skip
            self._positions[key] = int(run.offsets[-1]) + 1
            runs.append(run)
        return runs

    @property
    def generation(self) -> int:
        return self.ownership.generation

    @property
    def finished(self) -> bool:
        """With `until_end`: every assigned partition reached the end offsets seen at assignment."""
        if not self.until_end or self._end_offsets is None:
            return False
        return all(self._reached(key, end) for key, end in self._end_offsets.items())

    def _reached(self, key: PartitionKey, end: int) -> bool:
        if end == 0:
            return True
        if key in self._positions:
            return self._positions[key] >= end
        consumer = self._consumer
        if consumer is None:  # not connected (or closed): no position to read
            return False
        try:
            from kafka import TopicPartition

            return consumer.position(TopicPartition(*key)) >= end
        except Exception:  # noqa: BLE001 - position unknown yet: not reached
            return False

    def highwater(self) -> dict[PartitionKey, int]:
        """Last known end offset of each owned partition, from fetch responses (no network call).

        Safe to call from another thread than the poller: it only reads kafka-python's cached
        highwater marks. Partitions not fetched yet are absent.
        """
        consumer = self._consumer
        owned = self.ownership.owned()
        if consumer is None:
            return {}
        from kafka import TopicPartition

        marks = {}
        for key in owned if owned is not None else ():
            mark = consumer.highwater(TopicPartition(key.topic, key.partition))
            if mark is not None:
                marks[PartitionKey(key.topic, key.partition)] = int(mark)
        return marks

    def close(self) -> None:
        with self._open_lock:
            self._closed = True
            consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                self._flush_commit_on(consumer)
            finally:
                consumer.close(autocommit=False)

    def _flush_commit_on(self, consumer) -> None:
        with self._commit_lock:
            pending, self._pending_commit = self._pending_commit, None
        if pending:
            self._commit_now(consumer, pending)


def produce_records(
    bootstrap: str | KafkaSettings,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
    *,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    progress_every: int = 1000,
    partition: int | None = None,
) -> int:
    """Send (key, value) pairs to `topic`, at most `rate` records per second; returns how many."""
    from kafka import KafkaProducer

    options = bootstrap.client_options() if isinstance(bootstrap, KafkaSettings) else {"bootstrap_servers": bootstrap}
    producer = KafkaProducer(**options, linger_ms=5, batch_size=256 * 1024, max_request_size=16 * 1024 * 1024)
    sent = 0
    started = time.monotonic()
    try:
        for key, value in records:
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            producer.send(topic, value=value, key=key, partition=partition)
            sent += 1
            if progress is not None and sent % progress_every == 0:
                progress(sent)
        producer.flush()
    finally:
        producer.close()
    if progress is not None:
        progress(sent)
    return sent
