"""Kafka ingestion with kafka-python: settings, KafkaSource, topic creation, a scenario producer.

KafkaSource never auto-commits. It either joins a consumer group (`group_id`, partitions
assigned by the group) or reads explicit partitions (`partitions`, or every partition of
the topics when `group_id` is None), of which it takes its `share` (stream/shares.py: all,
or one process's p % N == i). On the first assignment of a partition it seeks to the saved
start Position; partitions without one follow `auto_offset_reset`.

Its rebalance listener keeps the shared `Ownership` current: a revoked partition's
buffered and queued examples are dropped by the Batcher, and the positions actually
delivered for it are committed to the group, so the next owner resumes exactly there.
(Kafka's commit holds offsets only, and Tansu drops commit metadata: a batched record cut
in half by a rebalance is re-delivered whole to the next owner. Checkpointed Positions
keep the within-record `skip`, so restarts from a checkpoint are exact.)

A broker that cannot be reached is retried with exponential backoff; kafka-python
resumes fetching from its in-memory positions, so nothing is lost or repeated. While no
broker connection is up, fetching is paused, and it resumes only after fresh metadata
shows the same topics: a broker that comes back empty, or as another cluster, is caught
before a record of it is read (see below). kafka-python's own log lines repeat on every
reconnect attempt; `KafkaLogLimit` keeps them to a few a minute.

Lost positions. The source never creates a topic: it sends `allow_auto_topic_creation =
false` with its metadata requests, and waits (warning each minute) for a topic that does
not exist. A position it holds (from a checkpoint, or read since) that the broker no
longer has is never skipped or re-read silently. It is lost when:
- the topic was recreated: its topic id changed (brokers since Kafka 2.8 and Tansu
  report ids), or its partition count changed against the count saved with the
  positions (partitions added to the same topic id are only a warning: Kafka's own way
  to grow a topic; without ids a grown count cannot be told from a recreation);
- a saved partition no longer exists;
- the position is beyond the log end (the fetch response's highwater: Tansu answers such
  a fetch empty where Kafka says OFFSET_OUT_OF_RANGE), or below the log start (records
  deleted), or kafka-python reports the log truncated (KIP-320).
kafka-python runs with `auto_offset_reset = "none"`, so it never moves a partition on its
own; partitions without any position are started here, at `auto_offset_reset`. Lost
positions are logged as an error naming partitions and offsets, reported to
`on_lost_positions`, and handled by `on_lost_positions` in the settings: "halt" (pause
everything, commit nothing more, raise `LostPositionsError` from `poll`), "earliest" (go
on from the log start: records may be trained twice if the log was not really lost) or
"latest" (go on from the log end: the records in between are never trained).

Security options (`security_protocol`, `sasl_*`, `ssl_*`) pass straight to kafka-python;
`KafkaSettings` never prints secret values (repr and logs show `***`).

kafka-python internals used (pinned to 3.0.x in pyproject.toml): the coordinator's commit
and committed-offset coroutines (rebalance listener), the cluster metadata cache (topic ids,
partition counts; and its config, because 3.0.12 accepts `allow_auto_create_topics` but
never hands it to the cluster), the connection table, a metadata refresh with a timeout
(`KafkaConsumer.topics()` waits forever), and a partition's fetch position and highwater.

Threading: KafkaSource.poll and open run on one thread (the ingest thread); `commit` may
be called from any thread: it queues the positions and the polling thread commits them.
`ready` and `state_note` may be read from any thread.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from continuity.stream.records import PartitionKey, PartitionPosition, PartitionRecords, Positions
from continuity.stream.shares import EVERY_PARTITION, EveryPartition, PartitionShare
from continuity.stream.sources import LOST_POSITION_ACTIONS, LostPosition, LostPositionsError, Source, SourceError

if TYPE_CHECKING:
    from kafka import KafkaConsumer, TopicPartition

log = logging.getLogger(__name__)

# Apache Kafka's consumer defaults (KIP-735: 45 s since Kafka 3.0). The embedded broker wants
# a much shorter session (see continuity.stream.broker.SHORT_SESSION_TIMEOUT_MS).
KAFKA_SESSION_TIMEOUT_MS = 45000
KAFKA_HEARTBEAT_INTERVAL_MS = 3000

REMIND_EVERY_S = 60.0  # a condition that lasts (a missing topic, an unreachable broker) is logged again this often
UNREACHABLE_AFTER_S = 1.0  # no broker connection for this long: the broker is unreachable (not a reconnect blip)
# kafka-python 3.0.12's poll can miss a fetch response that lands while it starts: its
# fetcher drains the buffer, then finds the fetch already done and dropped from the ones it
# waits on, calls itself idle, and sleeps `retry_backoff_ms` (100 ms) with the records
# buffered (`Fetcher.fetch_records`). While records flow (the last poll returned some),
# KafkaSource polls it in slices this long, so such a stall ends after one slice and the
# next slice returns the records. A quiet stream is polled in one piece (a slice costs
# ~0.4 ms of CPU: slicing a quiet stream's polls took an idle source from ~1.5% to ~5% of a core).
POLL_SLICE_S = 0.01

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


_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def topic_name_problem(name: str) -> str | None:
    """What makes `name` no Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -, not "." or ".."), or None.
    Checked where a name comes in: some brokers accept others on produce, yet no consumer can read them."""
    if _TOPIC_NAME.fullmatch(name) and name not in (".", ".."):
        return None
    return f"{name!r} is not a Kafka topic name: 1 to 249 characters of a-z A-Z 0-9 . _ - (not '.' or '..')"


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
    auto_offset_reset: str = "earliest"  # partitions without any position (never one that has a saved one)
    on_lost_positions: str = "halt"  # a held position the broker no longer has: "halt", "earliest" or "latest"
    session_timeout_ms: int = KAFKA_SESSION_TIMEOUT_MS
    heartbeat_interval_ms: int = KAFKA_HEARTBEAT_INTERVAL_MS
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
        if self.on_lost_positions not in LOST_POSITION_ACTIONS:
            raise KafkaSourceError(
                f"`on_lost_positions` must be one of {', '.join(map(repr, LOST_POSITION_ACTIONS))}. "
                f"Got {self.on_lost_positions!r}"
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


@dataclass(frozen=True)
class TopicIdentity:
    """What a topic was when positions in it were read: its id (None where the broker reports none) and size."""

    id: str | None
    partitions: int

    def to_json(self) -> dict:
        return {"id": self.id, "partitions": self.partitions}

    @classmethod
    def from_json(cls, data: Mapping) -> TopicIdentity:
        topic_id = data.get("id")
        return cls(None if topic_id is None else str(topic_id), int(data["partitions"]))


class KafkaLogLimit(logging.Filter):
    """Lets at most `per_window` records of the `kafka` loggers through a handler every `window_s` seconds.

    kafka-python logs every failed reconnect and metadata refresh (about 1,300 lines in 10
    minutes without a broker). The records held back are counted, and the first record
    let through in the next window says how many there were. Attach it to a handler (a
    logger's filters do not see its children's records); other loggers pass untouched.
    Thread-safe.
    """

    def __init__(self, per_window: int = 5, window_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.per_window, self.window_s, self.clock = per_window, window_s, clock
        self._lock = threading.Lock()
        self._window_started = -float("inf")
        self._passed = 0
        self.held_back = 0  # records held back in the current window
        self._held_back_before = 0  # ... and in the previous one, to say so once

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == "kafka" or record.name.startswith("kafka.")):
            return True
        with self._lock:
            now = self.clock()
            if now - self._window_started >= self.window_s:
                self._window_started, self._passed = now, 0
                self._held_back_before, self.held_back = self.held_back, 0
            if self._passed >= self.per_window:
                self.held_back += 1
                return False
            self._passed += 1
            if self._held_back_before:
                record.msg = (
                    f"{record.getMessage()} [{self._held_back_before} more kafka-python log lines were "
                    f"held back in the previous {self.window_s:.0f} s]"
                )
                record.args = ()
                self._held_back_before = 0
            return True


class KafkaSlowStepNote(logging.Filter):
    """Rewords kafka-python's "Task ... ran for 0.25s (>0.100s threshold). It is blocking the
    event loop -- likely a tight sync loop inside a coroutine" warning, which sends an
    operator looking for a bug that is not there.

    kafka-python's network thread times each step of its coroutines. In this service such a
    step runs long because it waits for the interpreter lock: it reads a fetch 4 KB a `recv`,
    and takes the lock back after each one from the threads training and decoding. (Those
    steps took 0.25-0.30 s with the interpreter's 5 ms switch interval, 0.14-0.17 s with 1
    ms: BENCHMARKS.md, "Ingest".) The record stays a warning with what was measured; it
    matters only as it nears the consumer's session timeout, which is when the group would
    count this consumer as gone. Attach it to a handler, as `KafkaLogLimit`."""

    _STEP = re.compile(r"ran for ([0-9.]+)s \(>([0-9.]+)s threshold\)\. It is blocking the event loop")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "kafka.net.selector":
            return True
        found = self._STEP.search(record.getMessage())
        if found is not None:
            record.msg = (
                f"kafka-python's network thread took {float(found[1]):.2f} s over one step (its threshold "
                f"{float(found[2]):g} s), most likely waiting for the interpreter lock while training and "
                "decoding hold it; harmless unless it nears the consumer's session timeout"
            )
            record.args = ()
        return True


# ---- kafka-python internals (see the module docstring) ------------------------------------------


def _forbid_topic_creation(consumer) -> None:
    """Make the consumer's metadata requests say `allow_auto_topic_creation = false`.

    KafkaConsumer(allow_auto_create_topics=False) is not enough in kafka-python 3.0.12: the
    option never reaches the ClusterMetadata that builds the requests, so a consumer asks
    the broker to create every topic it names (Tansu does; so does Kafka with
    auto.create.topics.enable).
    """
    config = getattr(getattr(consumer, "_cluster", None), "config", None)
    if not isinstance(config, dict) or "allow_auto_create_topics" not in config:
        raise KafkaSourceError(
            "this kafka-python has no ClusterMetadata.config['allow_auto_create_topics']: the consumer "
            "could create topics; install the kafka-python version pyproject.toml allows"
        )
    config["allow_auto_create_topics"] = False


def _broker_connected(consumer) -> bool:
    """Whether any broker connection is up (connections only: no network call)."""
    client = consumer._client
    return any(client.connected(broker.node_id) for broker in consumer._cluster.brokers())


def _refresh_metadata(consumer, timeout_ms: int, *, all_topics: bool = False) -> bool:
    """Fresh cluster metadata (the consumer's topics, or every topic); False when none came within the timeout.

    KafkaConsumer._fetch_all_topic_metadata with a timeout: `topics()` waits forever on a
    broker that is down. A broker that answers for one topic it does not have (asked for
    the consumer's topics, one of them) fails kafka-python's future with that topic's error
    after the metadata was updated: an answer all the same, so the cache is fresh (it lacks
    that topic), and a broker that came back without the topic is not taken for one still down.
    """
    from kafka.errors import KafkaError, UnknownTopicOrPartitionError

    cluster = consumer._cluster
    stash = cluster.need_all_topic_metadata
    try:
        cluster.need_all_topic_metadata = all_topics or stash
        future = cluster.request_update()
        consumer._net.run(consumer._manager.wait_for, future, timeout_ms)
        return bool(future.succeeded() or isinstance(future.exception, UnknownTopicOrPartitionError))
    except UnknownTopicOrPartitionError:
        return True
    except KafkaError:
        return False
    finally:
        cluster.need_all_topic_metadata = stash


def _identity(consumer, topic: str) -> TopicIdentity | None:
    """The topic as the cached metadata describes it; None when the cache does not know it."""
    numbers = consumer._cluster.partitions_for_topic(topic)
    if not numbers:
        return None
    topic_id = consumer._cluster.topic_id(topic)
    return TopicIdentity(None if topic_id is None else str(topic_id), len(numbers))


def _fetch_position(consumer, tp) -> int | None:
    """The offset kafka-python fetches next for `tp` (None: no position yet, or not assigned); no network call."""
    state = consumer._subscription.assignment.get(tp)
    position = None if state is None else state.position
    return None if position is None else int(position.offset)


def _highwater(consumer, tp) -> int | None:
    """The log end the last fetch of `tp` reported (None: none yet, or not assigned); no network call.

    KafkaConsumer.highwater raises for a partition a rebalance just took away.
    """
    state = consumer._subscription.assignment.get(tp)
    return None if state is None or state.highwater is None else int(state.highwater)


def _seek(consumer, tp, offset: int) -> None:
    """Seek, forgetting the highwater of the fetches before: the next fetch says where this log ends."""
    consumer.seek(tp, offset)
    state = consumer._subscription.assignment.get(tp)
    if state is not None:
        state.highwater = None


class _Stopped(Exception):
    """A stop was requested while open() waited for the broker or a topic."""


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

    until_end_topic_wait_s = 10.0  # how long a source reading `until_end` waits for a missing topic

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        start: Positions | None = None,
        until_end: bool = False,
        stop_requested: Callable[[], bool] | None = None,
        share: PartitionShare = EVERY_PARTITION,
    ):
        super().__init__(start)
        if not settings.topics:
            raise KafkaSourceError("`topics` must name at least one topic")
        if settings.group_id is not None and not isinstance(share, EveryPartition):
            raise KafkaSourceError(
                f"a share of the partitions ({share.describe()}) is read by assignment: give no `group_id`"
            )
        self.settings = settings
        self.share = share  # which of each topic's partitions it reads (without a group)
        self.until_end = until_end
        self.stop_requested = stop_requested or (lambda: False)
        self._consumer: KafkaConsumer | None = None
        self._closed = False
        self._open_lock = threading.Lock()
        self._first_assignment_done: set = set()
        # Partitions first assigned without a saved position: kafka-python starts them at the
        # group's committed offset if it has one (told once, `_note_group_starts`), else we do.
        self._unpositioned_first: set[PartitionKey] = set()
        self._pending_skip: dict[PartitionKey, PartitionPosition] = {}
        self._end_offsets: dict[PartitionKey, int] | None = None
        self._commit_lock = threading.Lock()
        self._pending_commit: Positions | None = None
        self._backoff = _Backoff()
        self._positions: dict[PartitionKey, int] = {}  # next offset after what poll returned
        self.ownership.assign(())  # nothing owned until assigned
        self.errors = 0
        # Lost positions: what the topics were when the held positions were read (checkpoint,
        # then first sight); what the rebalance listener found for poll to act on; partitions
        # seeked to a held offset whose log start is not checked yet; the halt, once decided.
        self._expected: dict[str, TopicIdentity] = {}
        self._state_lock = threading.Lock()  # the listener (kafka-python's IO thread) and poll share these
        self._pending_lost: list[tuple[list[LostPosition], dict[str, TopicIdentity]]] = []
        self._unverified: set[PartitionKey] = set()
        # Topics holding positions that the metadata did not show when they were to be checked
        # (a replaced broker's topic before it is recreated): paused until a check can be made.
        self._unchecked: set[str] = set()
        # Fetch positions of partitions lost with the group membership (an outage): still what
        # this process read up to, so a topic recreated meanwhile is still found out.
        self._lost_held: dict[PartitionKey, int] = {}
        self._halt: LostPositionsError | None = None
        # Reachability: since when no broker connection is up (None: up); whether fetching
        # is paused until fresh metadata shows the same topics; missing and empty topics.
        self._disconnected_since: float | None = None
        self._connected_once = False  # this consumer has had a broker connection up (see _watch_connection)
        self._flowing = False  # the last poll returned records: poll in slices (POLL_SLICE_S)
        self._unreachable_since: float | None = None
        self._unreachable_logged = 0.0
        self._recheck = False
        self._recheck_after = 0.0
        self._missing: set[str] = set()
        self._missing_logged = 0.0
        self._empty_checked: set[str] = set()

    # -- lost positions: the Source hooks
    def expect_topics(self, identities: Mapping[str, Mapping]) -> None:
        self._expected = {t: TopicIdentity.from_json(i) for t, i in identities.items() if t in self.settings.topics}

    def topic_identities(self) -> dict[str, dict]:
        return {topic: identity.to_json() for topic, identity in dict(self._expected).items()}

    # -- readiness
    @property
    def opened(self) -> bool:
        """`open` made a consumer (it may have lost its broker since: `ready` says)."""
        return self._consumer is not None

    @property
    def ready(self) -> bool:
        """Connected, no broker outage, no halt, and at least one partition assigned."""
        owned = self.ownership.owned()
        return (
            self._consumer is not None
            and self._halt is None
            and self._unreachable_since is None
            and bool(owned)
            and not self._recheck
            and not self._unchecked
        )

    def state_note(self) -> str | None:
        if self._halt is not None:
            return "stopped: saved positions lost"
        since = self._unreachable_since
        if since is not None:
            return f"broker unreachable for {time.monotonic() - since:,.0f} s"
        missing = sorted(self._missing)
        if missing:
            return f"topic {', '.join(map(repr, missing))} does not exist"
        if self._consumer is None:
            return "connecting"
        if not self.ownership.owned():
            return "no partitions assigned"
        unchecked = sorted(self._unchecked)
        if unchecked:
            return f"topic {', '.join(map(repr, unchecked))} not in the broker's metadata: positions not checked yet"
        return None

    # -- connection
    def _make_consumer(self):
        from kafka import KafkaConsumer

        s = self.settings
        consumer = KafkaConsumer(
            **s.client_options(),
            group_id=s.group_id,
            enable_auto_commit=False,
            # kafka-python never moves a partition by itself: one without any position is
            # started here (`_start_unpositioned`), one whose position is lost is reported.
            auto_offset_reset="none",
            allow_auto_create_topics=False,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            request_timeout_ms=s.request_timeout_ms,
            max_poll_records=s.max_poll_records,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            max_partition_fetch_bytes=s.max_partition_fetch_bytes,
            reconnect_backoff_max_ms=s.reconnect_backoff_max_ms,
            bootstrap_timeout_ms=s.bootstrap_timeout_ms,
        )
        try:
            _forbid_topic_creation(consumer)
        except KafkaSourceError:
            consumer.close(autocommit=False)
            raise
        return consumer

    def open(self) -> None:
        """Connect, retrying with backoff until the broker answers; gives up quietly once a stop is requested."""
        from kafka.errors import KafkaError

        while self._consumer is None and not self._closed:
            try:
                consumer = self._make_consumer()
            except (KafkaError, OSError) as error:
                self.errors += 1
                delay = self._backoff.next_delay()
                self._cannot_connect(error, delay)
                if self.stop_requested():
                    return  # shutting down: poll() reads nothing more
                time.sleep(delay)
                continue
            try:
                self._attach(consumer)
            except (_Stopped, KafkaError, OSError, KafkaSourceError) as error:
                consumer.close(autocommit=False)
                if isinstance(error, _Stopped):
                    return
                if isinstance(error, KafkaSourceError):
                    raise
                self.errors += 1
                delay = self._backoff.next_delay()
                self._cannot_connect(error, delay)
                if self.stop_requested():
                    return
                time.sleep(delay)
                continue
            with self._open_lock:
                if self._closed:
                    # close() ran while this consumer was being made: it must not live on
                    # as a group member nobody polls (it would hold its partitions).
                    consumer.close(autocommit=False)
                    return
                self._consumer = consumer
                self._connected_once = False
            self._backoff.reset()
            if self._unreachable_since is not None:
                log.warning(
                    "kafka: connected to %s after %.0f s",
                    self.settings.bootstrap,
                    time.monotonic() - self._unreachable_since,
                )
                self._unreachable_since = None

    def _cannot_connect(self, error: BaseException, delay: float) -> None:
        """Log a failed connection attempt: the first at once, then one line a minute."""
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = self._unreachable_logged = now
            log.warning(
                "kafka: cannot connect to %s (%s); retry %d in %.1f s",
                self.settings.bootstrap,
                type(error).__name__,
                self._backoff.attempt,
                delay,
            )
        elif now - self._unreachable_logged >= REMIND_EVERY_S:
            self._unreachable_logged = now
            log.warning(
                "kafka: still cannot connect to %s after %.0f s (%s); retrying",
                self.settings.bootstrap,
                now - self._unreachable_since,
                type(error).__name__,
            )

    def _attach(self, consumer) -> None:
        from kafka import TopicPartition

        s = self.settings
        if s.group_id is not None:
            source = self
            self._warn_missing(consumer, initial=True)

            # kafka-python 3 runs listeners on its IO loop, where a blocking commit raises;
            # the async form awaits the commit while heartbeats keep running.
            from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener

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
            tps.extend(TopicPartition(topic, p) for p in self.share.select(topic, numbers))
        if not tps:
            log.warning("kafka: %s: none of %s has such a partition; nothing to read", self.share.describe(), s.topics)
        consumer.assign(tps)
        self._on_assigned(consumer, tps)

    def _wait_for_partitions(self, consumer, topic: str) -> list[int]:
        """The partitions of `topic`, waiting (and warning each minute) while it does not exist.

        A source reading `until_end` gives up after `until_end_topic_wait_s`: a topic that does
        not exist has no end.
        """
        started = time.monotonic()
        while True:
            if _refresh_metadata(consumer, 5000, all_topics=True):
                found = consumer._cluster.partitions_for_topic(topic)
                if found:
                    if topic in self._missing:
                        self._missing.discard(topic)
                        log.warning("kafka: topic %r exists now (%d partitions)", topic, len(found))
                    return sorted(found)
                self._note_missing({topic})
            if self.until_end and time.monotonic() - started > self.until_end_topic_wait_s:
                raise KafkaSourceError(
                    f"topic {topic!r} has no partitions on {self.settings.bootstrap} (does it exist?)"
                )
            if self.stop_requested() or self._closed:
                raise _Stopped
            time.sleep(1.0)

    def _warn_missing(self, consumer, *, initial: bool = False) -> None:
        """Warn about subscribed topics the broker does not have (the consumer never creates them)."""
        if initial:
            if not _refresh_metadata(consumer, 5000, all_topics=True):
                return  # no answer in time: the next check says
        existing = consumer._cluster.topics()
        appeared = self._missing & existing
        for topic in sorted(appeared):
            log.warning("kafka: topic %r exists now", topic)
        self._missing -= appeared
        self._note_missing(set(self.settings.topics) - existing)

    def _note_missing(self, missing: set[str]) -> None:
        now = time.monotonic()
        new = missing - self._missing
        self._missing |= missing
        if new or (self._missing and now - self._missing_logged >= REMIND_EVERY_S):
            self._missing_logged = now
            log.warning(
                "kafka: topic %s does not exist on %s; waiting for it (Continuity never creates topics: "
                "create it with the partition count you want, or check the name)",
                ", ".join(map(repr, sorted(self._missing))),
                self.settings.bootstrap,
            )

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
            saved = self.start.get(key)
            if saved is None:
                with self._state_lock:
                    self._unpositioned_first.add(key)
                continue
            _seek(consumer, tp, saved.offset)
            self._positions[key] = saved.offset
            if saved.skip:
                self._pending_skip[key] = saved
            with self._state_lock:
                self._unverified.add(key)
        if self.until_end and self._end_offsets is None:
            ends = consumer.end_offsets(list(assigned))
            self._end_offsets = {PartitionKey(tp.topic, tp.partition): off for tp, off in ends.items()}
        self.ownership.assign(keys)
        self._missing -= {key.topic for key in keys}
        self._empty_checked -= {key.topic for key in keys}
        self._check_topics(consumer, {key.topic for key in keys})
        if self._recheck or self._halt is not None:
            consumer.pause(*assigned)  # nothing is read until the topics are checked again
        else:
            with self._state_lock:
                unchecked = set(self._unchecked)
            consumer.pause(*[tp for tp in assigned if tp.topic in unchecked])
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
                _seek(consumer, tp, ours.offset)
                self._positions[key] = ours.offset
                if ours.skip:
                    self._pending_skip[key] = ours
            elif found is not None and found.offset >= 0:
                _seek(consumer, tp, found.offset)
                self._positions[key] = found.offset
            else:
                self._start_unpositioned(consumer, [tp])
                continue
            with self._state_lock:
                self._unverified.add(key)

    def rewind(self, positions: Positions) -> bool:
        """Seek the live consumer to `positions` (a rollback or a retried window).

        Re-opening would close a group member and make a new one, and a member closed
        while it is still joining lingers in the group until the broker's rebalance
        timeout, holding the partitions. False (re-open instead) when the consumer is not
        open or an assigned partition has no position to go to.
        """
        consumer = self._consumer
        if consumer is None or self._closed or self._halt is not None:
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
            _seek(consumer, tp, saved.offset)
            if saved.skip:
                self._pending_skip[key] = saved
            self._positions[key] = saved.offset
            with self._state_lock:
                self._unverified.add(key)
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
        if self._halt is not None:
            return Positions()  # stopped on lost positions: nothing more is committed
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
        for tp in lost:
            key = PartitionKey(tp.topic, tp.partition)
            offset = self._positions.pop(key, None)
            if offset is not None:
                self._lost_held[key] = offset
        log.warning("kafka: lost partitions %s", sorted(f"{tp.topic}/{tp.partition}" for tp in lost))

    # -- lost positions: detection
    def _held(self, topic: str) -> dict[int, int]:
        """{partition: offset} of every position held in `topic`: saved, delivered or fetched up to."""
        held = {key.partition: position.offset for key, position in self.start.items() if key.topic == topic}
        with self.ownership.lock:
            held.update({k.partition: p.offset for k, p in self.ownership.delivered.items() if k.topic == topic})
        held.update({k.partition: offset for k, offset in dict(self._lost_held).items() if k.topic == topic})
        held.update({k.partition: offset for k, offset in dict(self._positions).items() if k.topic == topic})
        return held

    def _check_topics(self, consumer, topics: Iterable[str]) -> None:
        """Compare topics (cached metadata) with what the held positions were read from; queue what was lost.

        Runs on either thread (the rebalance listener, or poll); `_act_on_lost` acts on the
        queue from poll. The affected partitions are paused until then.
        """
        with self._state_lock:
            queued = {p.topic for entries, _ in self._pending_lost for p in entries}
        for topic in sorted(set(topics) - queued):
            now = _identity(consumer, topic)
            held = self._held(topic)
            with self._state_lock:
                if now is None and held:
                    # Not known now (a replaced broker without it yet): nothing of it is read
                    # until a check can be made (`_check_unchecked`), whatever is assigned meanwhile.
                    self._unchecked.add(topic)
                else:
                    self._unchecked.discard(topic)
            if now is None:
                if held:
                    consumer.pause(*[tp for tp in consumer.assignment() if tp.topic == topic])
                continue
            for key in [k for k in self._lost_held if k.topic == topic]:
                del self._lost_held[key]  # checked now: what was lost is queued below, or still good
            before = self._expected.get(topic)
            if before is None:  # positions saved without the topic's identity: what they imply
                if all(p < now.partitions for p in held):
                    self._expected[topic] = now
                    continue
                # Kafka never takes partitions away: a topic with fewer was recreated.
                reason = f"the topic has {now.partitions} partitions, fewer than the saved positions imply (recreated)"
            elif before.id is not None and now.id is not None and before.id != now.id:
                reason = f"the topic was recreated (its id was {before.id}, now {now.id})"
            elif now.partitions != before.partitions:
                if now.id is not None and now.id == before.id and now.partitions > before.partitions:
                    log.warning(
                        "kafka: partitions were added to %r (%d -> %d); the new ones start at %s",
                        topic,
                        before.partitions,
                        now.partitions,
                        self.settings.auto_offset_reset,
                    )
                    self._expected[topic] = now
                    continue
                reason = f"the topic has {now.partitions} partitions, not {before.partitions}" + (
                    " (a recreated topic, as far as a broker without topic ids can tell)" if now.id is None else ""
                )
            else:
                continue
            lost = [LostPosition(topic, p, offset, reason) for p, offset in sorted(held.items())]
            if not lost:  # nothing held in it: nothing to lose
                self._expected[topic] = now
                continue
            self._queue_lost(consumer, lost, now)

    def _queue_lost(self, consumer, lost: list[LostPosition], identity: TopicIdentity) -> None:
        """Hold the topic's partitions back (paused) until poll acts on `lost` (see `_act_on_lost`)."""
        topic = lost[0].topic
        consumer.pause(*[tp for tp in consumer.assignment() if tp.topic == topic])
        with self._state_lock:
            self._pending_lost.append((lost, {topic: identity}))

    def _check_log_ranges(self, consumer) -> list[LostPosition]:
        """Assigned partitions whose fetch position lies beyond the log end or below its start."""
        from kafka.errors import KafkaError

        assigned = consumer.assignment()
        with self._state_lock:
            unverified, self._unverified = self._unverified, set()
        starts: dict = {}
        check_start = [tp for tp in assigned if PartitionKey(tp.topic, tp.partition) in unverified]
        if check_start:
            try:
                starts = consumer.beginning_offsets(check_start, timeout_ms=self.settings.request_timeout_ms)
            except KafkaError:
                with self._state_lock:
                    self._unverified |= {PartitionKey(tp.topic, tp.partition) for tp in check_start}
        lost = []
        for tp in assigned:
            position = _fetch_position(consumer, tp)
            if position is None:
                continue
            end = _highwater(consumer, tp)
            start = starts.get(tp)
            if end is not None and end < position:
                lost.append(
                    LostPosition(tp.topic, tp.partition, position, "beyond the log end", log_start=start, log_end=end)
                )
            elif start is not None and start > position:
                lost.append(
                    LostPosition(tp.topic, tp.partition, position, "below the log start (records deleted)", start, end)
                )
        return lost

    def _log_range(self, consumer, tps: list) -> tuple[dict, dict]:
        """({tp: first offset}, {tp: end offset}) from the broker (ListOffsets); {} where it does not answer.

        Tansu's end offset can fall short of the readable end (its last batch's first offset
        + 1): "latest" then re-reads that batch. The highwater of earlier fetches cannot stand
        in: after a recreation it describes the old log.
        """
        from kafka.errors import KafkaError

        if not tps:
            return {}, {}
        try:
            starts = consumer.beginning_offsets(tps, timeout_ms=self.settings.request_timeout_ms)
            ends = consumer.end_offsets(tps, timeout_ms=self.settings.request_timeout_ms)
        except KafkaError:
            return {}, {}
        return starts, ends

    # -- lost positions: action
    def _act_on_lost(self, consumer, found: list[LostPosition]) -> set[PartitionKey]:
        """Handle what was found or queued; returns the partitions moved (their polled records are stale)."""
        with self._state_lock:
            queued, self._pending_lost = self._pending_lost, []
        identities: dict[str, TopicIdentity] = {}
        lost: list[LostPosition] = []
        for entries, identity in queued:
            lost.extend(entries)
            identities.update(identity)
        lost.extend(found)
        if not lost:
            return set()
        lost = list({(p.topic, p.partition): p for p in reversed(lost)}.values())[::-1]  # first finding wins
        from kafka import TopicPartition

        policy = self.settings.on_lost_positions
        # The partitions of a changed topic go on at the policy's edge, held positions or not.
        assigned = consumer.assignment()
        tps = {TopicPartition(p.topic, p.partition) for p in lost} & assigned
        moved_tps = sorted(tps | {tp for tp in assigned if tp.topic in identities})
        starts, ends = self._log_range(consumer, moved_tps)
        lost = [
            replace(
                p,
                log_start=p.log_start if p.log_start is not None else starts.get(TopicPartition(p.topic, p.partition)),
                log_end=p.log_end if p.log_end is not None else ends.get(TopicPartition(p.topic, p.partition)),
            )
            for p in lost
        ]
        if policy == "halt":
            consumer.pause(*consumer.assignment())
            with self._commit_lock:
                self._pending_commit = None
            self._halt = LostPositionsError(lost)
            log.error(
                "kafka: %s. Nothing of these partitions was read; the service stops so that an operator "
                'decides (stream.on_lost_positions: "earliest" re-reads from the log start, "latest" '
                "skips to the end)",
                self._halt,
            )
            self.on_lost_positions("halt", self._halt.lost)
            raise self._halt
        edge = starts if policy == "earliest" else ends
        moved: set[PartitionKey] = set()
        resumed = {}
        for tp in moved_tps:
            offset = edge.get(tp)
            if offset is None:  # the broker did not say: let kafka-python find the edge
                (consumer.seek_to_beginning if policy == "earliest" else consumer.seek_to_end)(tp)
            else:
                _seek(consumer, tp, offset)
            key = PartitionKey(tp.topic, tp.partition)
            self._go_on_at(key, offset)
            moved.add(key)
            resumed[key] = offset
        gone = {PartitionKey(p.topic, p.partition) for p in lost} - moved
        self.start = Positions({k: v for k, v in self.start.items() if k not in gone})
        self._expected.update(identities)
        reported = tuple(replace(p, resumed_at=resumed.get(PartitionKey(p.topic, p.partition))) for p in lost)
        log.error(
            "kafka: saved stream positions the broker no longer has: %s. stream.on_lost_positions = %r: read on "
            "from the log %s%s",
            "; ".join(p.describe() for p in reported),
            policy,
            "start" if policy == "earliest" else "end",
            " (records may be trained twice)"
            if policy == "earliest"
            else " (the records in between are never trained)",
        )
        self.on_lost_positions(policy, reported)
        if not self._recheck:
            consumer.resume(*moved_tps)
        return moved

    def _go_on_at(self, key: PartitionKey, offset: int | None) -> None:
        """Forget what was held for `key`: reading goes on at `offset` (None: kafka-python finds it)."""
        self._pending_skip.pop(key, None)
        with self.ownership.lock:
            if offset is None:
                self.ownership.delivered.pop(key, None)
            else:
                self.ownership.delivered[key] = PartitionPosition(offset, 0)
        if offset is None:
            self._positions.pop(key, None)
            self.start = Positions({k: v for k, v in self.start.items() if k != key})
        else:
            self._positions[key] = offset
            self.start = self.start.merged({key: PartitionPosition(offset, 0)})

    def _start_unpositioned(self, consumer, tps) -> None:
        """Partitions without any position (no checkpoint, no group commit) start at `auto_offset_reset`."""
        tps = list(tps)
        if not tps:  # kafka-python's seek_to_*() without partitions means every assigned one
            return
        with self._state_lock:
            self._unpositioned_first -= {PartitionKey(tp.topic, tp.partition) for tp in tps}
        if self.settings.auto_offset_reset == "earliest":
            consumer.seek_to_beginning(*tps)
        else:
            consumer.seek_to_end(*tps)
        log.info(
            "kafka: %s have no saved position; starting at the %s",
            sorted(f"{tp.topic}/{tp.partition}" for tp in tps),
            "log start" if self.settings.auto_offset_reset == "earliest" else "log end",
        )

    def _note_group_starts(self, consumer, fetched: dict) -> None:
        """Say where kafka-python started a partition without a saved position: at the consumer group's
        committed offset. That is progress this model did not make (another member's, or a model whose
        checkpoints are gone): the records before it are never trained by this one, so it is said loudly."""
        from kafka import TopicPartition

        started, gone = {}, set()
        with self._state_lock:
            waiting = sorted(self._unpositioned_first)
        for key in waiting:
            tp = TopicPartition(key.topic, key.partition)
            state = consumer._subscription.assignment.get(tp)
            if state is None:  # revoked before it was read
                gone.add(key)
            elif fetched.get(tp):  # the poll read on already: where it started
                started[key] = fetched[tp][0].offset
            elif consumer._subscription.has_valid_position(tp):
                started[key] = state.position.offset
        with self._state_lock:
            self._unpositioned_first -= gone | set(started)
        if started:
            log.warning(
                "kafka: %s have no saved position; starting where the consumer group %r committed, at %s: what "
                "another member or an earlier model reached. This model never trains the records before them "
                "(another stream.group, or none, starts at stream.auto_offset_reset = %r)",
                sorted(f"{k.topic}/{k.partition}" for k in started),
                self.settings.group_id,
                {f"{k.topic}/{k.partition}": offset for k, offset in started.items()},
                self.settings.auto_offset_reset,
            )

    # -- reachability
    def _watch_connection(self, consumer) -> None:
        """Pause fetching while no broker connection is up; resume once fresh metadata shows the same topics.

        A broker that comes back could be another one (replaced, empty): nothing is read from
        it before its topics are compared with what the held positions were read from.
        """
        now = time.monotonic()
        if not _broker_connected(consumer):
            if self._disconnected_since is None:
                self._disconnected_since = now
            # kafka-python connects to the partition leader at the first fetch: until then a new
            # consumer is connecting, not cut off, and its topics were checked on the metadata it
            # was made with (`_on_assigned`). A connection lost, or none made within
            # UNREACHABLE_AFTER_S, is an outage. (Taking the first for one cost every start a
            # metadata request held back by kafka-python's retry backoff: ~0.1 s.)
            outage = self._connected_once or now - self._disconnected_since >= UNREACHABLE_AFTER_S
            if outage and not self._recheck:
                self._recheck = True
                consumer.pause(*consumer.assignment())
            if self._unreachable_since is None and now - self._disconnected_since >= UNREACHABLE_AFTER_S:
                self._unreachable_since = self._unreachable_logged = self._disconnected_since
                log.warning(
                    "kafka: broker %s unreachable; fetching paused until it is back and its topics are checked",
                    self.settings.bootstrap,
                )
            elif self._unreachable_since is not None and now - self._unreachable_logged >= REMIND_EVERY_S:
                self._unreachable_logged = now
                log.warning(
                    "kafka: broker %s unreachable for %.0f s", self.settings.bootstrap, now - self._unreachable_since
                )
        else:
            self._disconnected_since = None
            self._connected_once = True
        if not self._recheck and self._unchecked and now >= self._recheck_after:
            self._check_unchecked(consumer)
        if not self._recheck or now < self._recheck_after:
            return
        if not _refresh_metadata(consumer, 1000):
            self._recheck_after = time.monotonic() + 0.5
            return
        if self._unreachable_since is not None:
            log.warning(
                "kafka: broker %s reachable again after %.0f s; reading on once its topics are checked",
                self.settings.bootstrap,
                time.monotonic() - self._unreachable_since,
            )
        self._unreachable_since = self._disconnected_since = None
        self._recheck = False
        # A broker back without a topic (an empty one on the old one's address) is reachable,
        # and the topic is missing: said as such, not as an outage or an empty assignment.
        self._warn_missing(consumer)
        # Every subscribed topic, not only those assigned now: a consumer that lost its group
        # membership in the outage holds no assignment yet, and its rejoin must not hand it a
        # recreated topic's partitions before they were checked.
        self._check_topics(consumer, {tp.topic for tp in consumer.assignment()} | set(self.settings.topics))
        self._resume_checked(consumer)

    def _check_unchecked(self, consumer) -> None:
        """Check the topics the metadata did not show before, once fresh metadata shows them."""
        self._recheck_after = time.monotonic() + 0.5
        if not _refresh_metadata(consumer, 1000):
            return
        with self._state_lock:
            unchecked = set(self._unchecked)
        self._check_topics(consumer, unchecked)
        self._resume_checked(consumer)

    def _resume_checked(self, consumer) -> None:
        """Resume every assigned partition except those of topics held back (lost, or not checked yet)."""
        with self._state_lock:
            held_back = {p.topic for entries, _ in self._pending_lost for p in entries} | self._unchecked
        consumer.resume(*[tp for tp in consumer.assignment() if tp.topic not in held_back])

    def _warn_if_empty(self, consumer) -> None:
        """Once per assignment, warn about a topic whose assigned partitions hold no records."""
        by_topic: dict[str, list] = {}
        for tp in consumer.assignment():
            if tp.topic not in self._empty_checked:
                by_topic.setdefault(tp.topic, []).append(tp)
        for topic, tps in by_topic.items():
            ends = [_highwater(consumer, tp) for tp in tps]
            if any(end is None for end in ends):
                continue  # not fetched yet
            self._empty_checked.add(topic)
            if not any(ends):
                log.warning(
                    "kafka: topic %r is empty: partitions %s assigned here have no records yet",
                    topic,
                    sorted(tp.partition for tp in tps),
                )

    # -- commits
    def commit(self, positions: Positions) -> None:
        """Queue `positions` to be committed to the group by the polling thread."""
        if self.settings.group_id is None or self._halt is not None:
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
        from kafka.errors import KafkaError, LogTruncationError, NoOffsetForPartitionError, OffsetOutOfRangeError

        if self._halt is not None:
            raise self._halt
        if self._consumer is None:
            self.open()
        consumer = self._consumer
        if consumer is None:  # open() gave up: close() ran meanwhile
            return []
        try:
            self._watch_connection(consumer)
            self._act_on_lost(consumer, [])  # what the listener or the reconnect check found
            self._flush_commit()
            fetched = self._poll_consumer(consumer, timeout_s)
            if not self._connected_once and _broker_connected(consumer):
                self._connected_once = True  # from now on a lost connection is an outage at once
            if self._unpositioned_first:
                self._note_group_starts(consumer, fetched)
        except NoOffsetForPartitionError as error:
            self._start_unpositioned(consumer, error.args[0] if error.args else ())
            return []
        except OffsetOutOfRangeError as error:
            offsets = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
            reason = "out of the log's range (the broker answered OFFSET_OUT_OF_RANGE)"
            self._act_on_lost(consumer, [LostPosition(tp.topic, tp.partition, o, reason) for tp, o in offsets.items()])
            return []
        except LogTruncationError as error:
            reason = "the log was truncated below it (KIP-320 validation)"
            self._act_on_lost(
                consumer,
                [
                    LostPosition(tp.topic, tp.partition, _fetch_position(consumer, tp), reason)
                    for tp in error.divergent_offsets
                ],
            )
            return []
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
        # Records of a topic found changed, or of a partition found out of its log's range,
        # are dropped here: they were read at a position that is no longer the one to trust.
        self._check_topics(consumer, {tp.topic for tp in consumer.assignment()})
        moved = self._act_on_lost(consumer, self._check_log_ranges(consumer))
        if self._missing:
            self._warn_missing(consumer)
        self._warn_if_empty(consumer)
        runs = []
        for tp, messages in fetched.items():
            key = PartitionKey(tp.topic, tp.partition)
            if not messages or key in moved:
                continue
            run = PartitionRecords(
                tp.topic,
                tp.partition,
                [m.value for m in messages],
                [m.key for m in messages],
                np.fromiter((m.offset for m in messages), np.int64, len(messages)),
                np.fromiter((m.timestamp for m in messages), np.int64, len(messages)),
            )
            pending = self._pending_skip.pop(key, None)
            if pending is not None and run.offsets[0] == pending.offset:
                run.skip_first = pending.skip
            self._positions[key] = int(run.offsets[-1]) + 1
            runs.append(run)
        return runs

    def _poll_consumer(self, consumer, timeout_s: float) -> dict:
        """`consumer.poll` for up to `timeout_s`: in slices of `POLL_SLICE_S` while records flow
        (see there), in one piece on a quiet stream. What the first call that fetched anything
        returned, or {} once the time is up."""
        if not self._flowing:
            fetched = consumer.poll(timeout_ms=int(timeout_s * 1000))
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                remaining = deadline - time.monotonic()
                fetched = consumer.poll(timeout_ms=max(0, int(min(remaining, POLL_SLICE_S) * 1000)))
                if fetched or remaining <= POLL_SLICE_S or self.stop_requested():
                    break
        self._flowing = bool(fetched)
        return fetched

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
            mark = _highwater(consumer, TopicPartition(key.topic, key.partition))
            if mark is not None:
                marks[PartitionKey(key.topic, key.partition)] = int(mark)
        return marks

    def close(self) -> None:
        with self._open_lock:
            self._closed = True
            consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                if self._halt is None:  # stopped on lost positions: nothing more is committed
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
            # A minute at most per sleep: a rate of one record a century waits as asked, where one
            # sleep that long is beyond what time.sleep takes (OverflowError).
            while rate and (ahead := sent / rate - (time.monotonic() - started)) > 0:
                time.sleep(min(ahead, 60.0))
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
