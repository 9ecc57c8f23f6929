"""Dead letters: records that could not be decoded or validated, with the reason, kept and counted.

A dead letter never stops the consumer. Sinks:
- `JsonLinesDeadLetters(path)`: one JSON object per line
  `{"topic", "partition", "offset", "timestamp_ms", "key_b64", "value_b64", "reason"}`;
- `KafkaDeadLetters(bootstrap, ...)`: the original value and key to topic `<topic>.dlq`
  (same key), with headers `dlq.reason`, `dlq.topic`, `dlq.partition`, `dlq.offset`;
- `MemoryDeadLetters()`: kept in a list (tests, tools).
Every sink counts what it received, overall and per reason kind (`counts`). The quarantine
file is one of these sinks too, whose log lines call its records "quarantined record".

Threading: sinks are called from the decoding thread; `counts` and `letters` may be read
from another thread (a lock guards them).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from continuity.stream.records import Record

log = logging.getLogger(__name__)


SHOWN_CHARS = 60  # how much of a rejected value a reason quotes


def shown(value) -> str:
    """`value` as a reason quotes it: its repr, cut to SHOWN_CHARS characters with its length after.

    A reason is one line in the log, the dead-letter file and a Kafka header: a label sent as a
    10 MB string or a list of a million items is named by its start, not copied whole.
    """
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    if isinstance(value, list):
        size = f"a list of {len(value):,}"
    elif isinstance(value, dict):
        size = f"an object of {len(value):,} field{'' if len(value) == 1 else 's'}"
    else:
        size = f"{len(value if isinstance(value, str) else text):,} characters"
    return f"{text[:SHOWN_CHARS]}... ({size})"


class DeadLetter(NamedTuple):
    """A record that was rejected, and why (`reason` is one line, starting with its kind)."""

    record: Record
    reason: str

    @property
    def kind(self) -> str:
        """The reason's kind: the text before the first ':' (e.g. 'bad shape')."""
        return self.reason.split(":", 1)[0]


class DeadLetterSink:
    """Base sink: counts letters; subclasses store them in `_write`.

    `noun` is what its log lines call a letter: "dead letter" for records that could not be
    decoded or validated; the quarantine file (the same sink, for records of windows the
    guard quarantined, which decoded fine) passes "quarantined record".
    """

    def __init__(self, *, noun: str = "dead letter"):
        self.noun = noun
        self._lock = threading.Lock()
        self.total = 0
        self.counts: Counter = Counter()

    def put(self, letter: DeadLetter) -> None:
        if self._kept_already(letter):
            return
        with self._lock:
            self.total += 1
            self.counts[letter.kind] += 1
            seen = self.counts[letter.kind]
        # A few lines per kind, then one per thousand: a quarantined window or a broken producer
        # sends thousands, and the sink (not the log) is where each one is kept.
        if seen <= 10 or seen % 1000 == 0:
            position = letter.record.position
            log.warning(
                "%s %s/%d@%d (%s #%d): %s",
                self.noun,
                position.topic,
                position.partition,
                position.offset,
                letter.kind,
                seen,
                letter.reason,
            )
        self._write(letter)

    def _kept_already(self, letter: DeadLetter) -> bool:
        """Whether this sink holds `letter` from before (a record read again: the sink says)."""
        return False

    def _write(self, letter: DeadLetter) -> None:  # pragma: no cover - overridden
        pass

    def flush(self) -> None:
        pass

    def unwritten(self) -> str | None:
        """Why letters received are not yet kept where they go (held in memory while a full disk
        refuses them; a sink holding some tries writing them first), or None. A checkpoint waits
        while there is a reason: positions committed past a record kept only in memory would
        lose it at the next crash. Quick: it never waits on a network."""
        return None

    def close(self) -> None:
        self.flush()


class MemoryDeadLetters(DeadLetterSink):
    def __init__(self, *, noun: str = "dead letter"):
        super().__init__(noun=noun)
        self.letters: list[DeadLetter] = []

    def _write(self, letter: DeadLetter) -> None:
        with self._lock:
            self.letters.append(letter)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def letter_to_json(letter: DeadLetter) -> dict:
    record = letter.record
    return {
        "topic": record.position.topic,
        "partition": record.position.partition,
        "offset": record.position.offset,
        "timestamp_ms": record.timestamp_ms,
        "key_b64": _b64(record.key),
        "value_b64": _b64(record.value),
        "reason": letter.reason,
    }


class JsonLinesDeadLetters(DeadLetterSink):
    """Appends dead letters to a JSON-lines file (written as each comes: they are rare).

    Each letter is kept once. Records after the last checkpoint are read again after a restart
    (or a rollback), and with them their dead letters; a partition's letter at or before the
    newest one the file holds for it, by offset and timestamp, is one it has. (A topic recreated
    starts its offsets again, at later timestamps: its letters are new.)

    A full disk does not stop the service: what the file system refuses is held in memory, in
    order (a line it took part of goes on where it stopped), and written before the next letter
    once it takes writes again; one error is logged per spell. Meanwhile `unwritten` says so
    and checkpoints wait (the loop's saves fail and retry), so no position is committed past a
    letter not on disk. Beyond `MAX_HELD_BYTES` held, the next letter raises the OSError.
    """

    MAX_HELD_BYTES = 256 * 2**20

    def __init__(self, path: str | Path, *, noun: str = "dead letter"):
        super().__init__(noun=noun)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._newest: dict[tuple[str, int], tuple[int, int]] = {}  # (topic, partition): (offset, timestamp_ms)
        if self.path.is_file():
            for kept in read_dead_letters(self.path):
                self._note(kept.get("topic"), kept.get("partition"), kept.get("offset"), kept.get("timestamp_ms"))
        torn = self.path.is_file() and self.path.stat().st_size > 0 and not _ends_a_line(self.path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # After a line torn by a crash, the next letter starts a line of its own.
        self._held = bytearray(b"\n" if torn else b"")  # bytes the file system has not taken yet, in order
        self._refused: OSError | None = None  # the spell's first refusal, while there is one

    def _note(self, topic, partition, offset, timestamp_ms) -> None:
        if not (isinstance(topic, str) and all(isinstance(v, int) for v in (partition, offset, timestamp_ms))):
            return  # a line of another shape: nothing to go by
        key = (topic, partition)
        offset_was, timestamp_was = self._newest.get(key, (-1, -1))
        self._newest[key] = (max(offset, offset_was), max(timestamp_ms, timestamp_was))

    def _kept_already(self, letter: DeadLetter) -> bool:
        position = letter.record.position
        with self._lock:
            newest = self._newest.get((position.topic, position.partition))
        return newest is not None and position.offset <= newest[0] and letter.record.timestamp_ms <= newest[1]

    def _write(self, letter: DeadLetter) -> None:
        record = letter.record
        line = (json.dumps(letter_to_json(letter)) + "\n").encode("utf-8")
        with self._lock:
            if self._fd is None:  # closed: a letter held now would be lost, not kept
                at = record.position
                raise ValueError(
                    f"{self.path} is closed: {self.noun} {at.topic}/{at.partition}@{at.offset} cannot be kept"
                )
            if self._refused is not None and len(self._held) + len(line) > self.MAX_HELD_BYTES:
                raise OSError(
                    f"{self.path}: cannot write {self.noun}s ({self._refused.strerror or self._refused}) and "
                    f"{len(self._held):,} bytes of them are held in memory already"
                )
            self._held += line
            self._note(record.position.topic, record.position.partition, record.position.offset, record.timestamp_ms)
            self._write_held()

    def _write_held(self) -> None:
        """Write what is held, in order, as far as the file system takes it (the caller holds the lock)."""
        if self._fd is None:
            return
        try:
            while self._held:
                del self._held[: os.write(self._fd, self._held)]
        except OSError as error:
            if self._refused is None:  # the first refusal of a spell: say so once
                log.error("%s: cannot write (%s); holding %ss in memory until it can", self.path, error, self.noun)
                self._refused = error
            return
        if self._refused is not None:
            log.warning("%s: writable again; wrote the %ss held", self.path, self.noun)
            self._refused = None

    def flush(self) -> None:
        with self._lock:
            self._write_held()

    def unwritten(self) -> str | None:
        with self._lock:
            self._write_held()
            if not self._held:
                return None
            refused = self._refused
        why = f" ({refused.strerror or refused})" if refused is not None else ""
        return f"{self.noun}s not yet written to {self.path}{why} are held in memory"

    def close(self) -> None:
        with self._lock:
            self._write_held()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_dead_letters(path: str | Path) -> list[dict]:
    """The entries of a JSON-lines dead-letter file (a line torn by a crash mid-write is left out)."""
    entries = []
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def _ends_a_line(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


class KafkaDeadLetters(DeadLetterSink):
    """Sends dead letters to `<topic>.dlq` on the same cluster (asynchronous; `flush` waits).

    A letter counts as kept once the broker acknowledged it. Until then `unwritten` says so (it
    waits `ack_wait_s` at most) and checkpoints wait, so no position is committed past a letter
    a crash would lose; a send that failed (the producer's own retries given up) is sent again.
    """

    def __init__(self, bootstrap: str, *, suffix: str = ".dlq", ack_wait_s: float = 0.5, **client_options):
        super().__init__()
        from kafka import KafkaProducer  # imported here: file sinks must not need a cluster

        self.suffix = suffix
        self.bootstrap = bootstrap
        self.ack_wait_s = ack_wait_s
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, **client_options)
        self._sent: list[tuple[DeadLetter, Any]] = []  # letters not yet acknowledged, with their send's future

    def _write(self, letter: DeadLetter) -> None:
        future = self._send(letter)
        with self._lock:
            self._sent.append((letter, future))

    def _send(self, letter: DeadLetter):
        record = letter.record
        position = record.position
        headers = [
            ("dlq.reason", letter.reason.encode("utf-8")),
            ("dlq.topic", position.topic.encode("utf-8")),
            ("dlq.partition", str(position.partition).encode("ascii")),
            ("dlq.offset", str(position.offset).encode("ascii")),
        ]
        return self._producer.send(
            position.topic + self.suffix, value=record.value or b"", key=record.key, headers=headers
        )

    def flush(self) -> None:
        self._producer.flush()

    def unwritten(self) -> str | None:
        from kafka.errors import KafkaTimeoutError

        with self._lock:
            sent, self._sent = self._sent, []
        if not sent:
            return None
        try:
            self._producer.flush(timeout=self.ack_wait_s)
        except KafkaTimeoutError:
            pass
        waiting: list[tuple[DeadLetter, Any]] = []
        failed: list[BaseException] = []
        for letter, future in sent:
            if not future.is_done:
                waiting.append((letter, future))
            elif future.failed():
                failed.append(future.exception)
                waiting.append((letter, self._send(letter)))  # kept: sent again
        with self._lock:
            self._sent[:0] = waiting
        if not waiting:
            return None
        why = f" (the last send failed: {failed[-1]!r}; sent again)" if failed else ""
        count = (
            f"1 {self.noun} sent to {self.bootstrap} is"
            if len(waiting) == 1
            else f"{len(waiting)} {self.noun}s sent to {self.bootstrap} are"
        )
        return f"{count} not acknowledged yet{why}"

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()
