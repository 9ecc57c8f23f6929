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
import threading
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from continuity.stream.records import Record

log = logging.getLogger(__name__)


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

    def _write(self, letter: DeadLetter) -> None:  # pragma: no cover - overridden
        pass

    def flush(self) -> None:
        pass

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
    """Appends dead letters to a JSON-lines file (flushed after every letter: they are rare)."""

    def __init__(self, path: str | Path, *, noun: str = "dead letter"):
        super().__init__(noun=noun)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def _write(self, letter: DeadLetter) -> None:
        with self._lock:
            self._file.write(json.dumps(letter_to_json(letter)) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


def read_dead_letters(path: str | Path) -> list[dict]:
    """The entries of a JSON-lines dead-letter file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class KafkaDeadLetters(DeadLetterSink):
    """Sends dead letters to `<topic>.dlq` on the same cluster (asynchronous; `flush` waits)."""

    def __init__(self, bootstrap: str, *, suffix: str = ".dlq", **client_options):
        super().__init__()
        from kafka import KafkaProducer  # imported here: file sinks must not need a cluster

        self.suffix = suffix
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, **client_options)

    def _write(self, letter: DeadLetter) -> None:
        record = letter.record
        position = record.position
        headers = [
            ("dlq.reason", letter.reason.encode("utf-8")),
            ("dlq.topic", position.topic.encode("utf-8")),
            ("dlq.partition", str(position.partition).encode("ascii")),
            ("dlq.offset", str(position.offset).encode("ascii")),
        ]
        self._producer.send(position.topic + self.suffix, value=record.value or b"", key=record.key, headers=headers)

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self._producer.flush()
        self._producer.close()
