"""Sources of raw records: the Source contract, recorded Parquet files, synthetic scenarios.

A Source hands out `PartitionRecords` (columns of consecutive records of one partition)
in stream order. Contract:
- `open()` connects / opens files and seeks to the start Positions given at construction;
- `poll(timeout_s)` returns a list of PartitionRecords, empty when nothing is available now;
- `finished` is True once a finite source has handed out everything;
- `ownership` says which partitions it owns (a KafkaSource in a group changes it);
- `commit(positions)` records progress where the source can (Kafka groups; no-op here);
- `close()`.
A source whose start Positions can be lost (a Kafka topic recreated, a broker that lost
its log) also takes `expect_topics(identities)` (what the topics were when the positions
were saved, from the checkpoint), hands back `topic_identities()` for the next one, and
reports positions it can no longer resume from to `on_lost_positions(action, lost)`; under
the "halt" policy its `poll` then raises `LostPositionsError`. `ready` and `state_note()`
say whether it reads, for readiness checks and progress lines.
A Source is used from one thread (the ingest thread), except `commit`, `ready` and
`state_note`, which any thread may call.

Recorded-stream file (Parquet, written by `continuity record`), one row per record:
    topic string, partition int32, offset int64, timestamp_ms int64,
    key binary (nullable), value binary (nullable)
Rows are in the order the recorder consumed them, so a file replays one order always.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from continuity.stream.batcher import Ownership
from continuity.stream.codecs import Codec
from continuity.stream.records import PartitionKey, PartitionPosition, PartitionRecords, Positions

RECORDING_COLUMNS = ("topic", "partition", "offset", "timestamp_ms", "key", "value")  # a recording's Parquet columns


def offsets_go_back(path, topic: str, partition: int, before: int, after: int, *, row: int | None = None) -> str:
    """The one line for a recording whose offsets go back (FileSource finds it; `replay` before anything runs)."""
    where = f" at row {row}" if row is not None else ""
    return (
        f"recorded stream {str(path)!r}: {topic}/{partition} goes back from offset {before} to {after}{where}; "
        "a log's offsets only rise (a damaged or edited file?)"
    )


class SourceError(ValueError):
    """A source was configured wrongly or its input cannot be read."""


LOST_POSITION_ACTIONS = ("halt", "earliest", "latest")  # what a source does about a lost position


@dataclass(frozen=True)
class LostPosition:
    """A partition whose saved position the source can no longer resume from, and why.

    `offset` is the position held (None for a partition that appeared, which has none);
    `log_start`/`log_end` what the broker has now, where known; `resumed_at` where
    reading went on under the "earliest" or "latest" policy (None under "halt").
    """

    topic: str
    partition: int
    offset: int | None
    reason: str
    log_start: int | None = None
    log_end: int | None = None
    resumed_at: int | None = None

    def describe(self) -> str:
        """One phrase for logs: "digits/0 at offset 7953 (log 0..120): beyond the log end"."""
        held = "no saved position" if self.offset is None else f"offset {self.offset:,}"
        span = ""
        if self.log_start is not None or self.log_end is not None:
            span = f" (log {_or_unknown(self.log_start)}..{_or_unknown(self.log_end)})"
        resumed = "" if self.resumed_at is None else f"; resumed at {self.resumed_at:,}"
        return f"{self.topic}/{self.partition} at {held}{span}: {self.reason}{resumed}"

    def to_json(self) -> dict:
        return asdict(self)


def _or_unknown(offset: int | None) -> str:
    return "?" if offset is None else f"{offset:,}"


class LostPositionsError(SourceError):
    """Saved positions the broker no longer has, under the "halt" policy: an operator decides.

    Nothing was skipped or re-read: the source stopped before reading anything of the
    partitions named in `lost`.
    """

    def __init__(self, lost: Sequence[LostPosition]):
        self.lost = tuple(lost)
        super().__init__(
            "saved stream positions the broker no longer has: " + "; ".join(p.describe() for p in self.lost)
        )


def _ignore_lost(action: str, lost: tuple[LostPosition, ...]) -> None:
    pass


class Source:
    """Base class; see the module docstring for the contract."""

    def __init__(self, start: Positions | None = None):
        self.start = start or Positions()
        self.ownership = Ownership()
        self.stop_requested = lambda: False  # set by Ingest: lets a blocking open() give up
        # Set by whoever records decisions (the training loop): called on the polling thread.
        self.on_lost_positions: Callable[[str, tuple[LostPosition, ...]], None] = _ignore_lost

    def expect_topics(self, identities: Mapping[str, Mapping]) -> None:
        """What the topics were when the start Positions were saved (`topic_identities()` then)."""

    def topic_identities(self) -> dict[str, dict]:
        """What the topics are that the positions read now belong to (JSON); {} for files and scenarios."""
        return {}

    @property
    def ready(self) -> bool:
        """Whether it can read now (a Kafka source: broker reachable, partitions assigned)."""
        return True

    def state_note(self) -> str | None:
        """What keeps it from reading, for a progress line ("broker unreachable for 42 s"); None while it reads."""
        return None

    def open(self) -> None:
        pass

    def poll(self, timeout_s: float = 0.1) -> list[PartitionRecords]:
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        return False

    def commit(self, positions: Positions) -> None:
        pass

    def rewind(self, positions: Positions) -> bool:
        """Read on from `positions` without re-opening; False when this source cannot (re-open it).

        Call it only while nothing polls the source (its ingest thread stopped).
        """
        return False

    def close(self) -> None:
        pass

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc_info):
        self.close()


def _start_of(start: Positions, topic: str, partition: int) -> PartitionPosition | None:
    try:
        return start[(topic, partition)]
    except KeyError:
        return None


def split_runs(
    topics: list,
    partitions: np.ndarray,
    offsets: np.ndarray,
    timestamps: np.ndarray,
    keys: list,
    values: list,
    start: Positions,
    skipped: set,
) -> list[PartitionRecords]:
    """Rows (in order) to runs of one partition, dropping rows before the start Positions.

    `skipped` collects partitions whose within-record skip was already applied.
    """
    n = len(values)
    if n == 0:
        return []
    unique_topics, topic_codes = np.unique(np.asarray(topics, dtype=object), return_inverse=True)
    names = list(unique_topics)
    keep = np.ones(n, bool)
    for (topic, partition), position in start.items():
        if topic in names:
            rows = (topic_codes == names.index(topic)) & (partitions == partition)
            keep &= ~(rows & (offsets < position.offset))
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return []
    # Boundaries where the (topic, partition) changes between consecutive kept rows.
    part, codes = partitions[idx], topic_codes[idx]
    change = np.flatnonzero((np.diff(part) != 0) | (np.diff(codes) != 0)) + 1
    runs = []
    for lo, hi in zip(np.r_[0, change], np.r_[change, len(idx)]):
        rows = idx[lo:hi]
        topic, partition = topics[rows[0]], int(partitions[rows[0]])
        run = PartitionRecords(
            topic,
            partition,
            [values[i] for i in rows],
            [keys[i] for i in rows],
            offsets[rows],
            timestamps[rows],
        )
        key = PartitionKey(topic, partition)
        position = _start_of(start, topic, partition)
        if key not in skipped and position is not None and position.skip and run.offsets[0] == position.offset:
            run.skip_first = position.skip
        skipped.add(key)
        runs.append(run)
    return runs


def parquet_reason(error: BaseException) -> str:
    """pyarrow's error as one line: its lines joined, characters that do not print escaped (a
    damaged page's junk shows in its messages), without a final period."""
    text = " ".join(str(error).split())
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text).rstrip(".")


class FileSource(Source):
    """Replays a recorded Parquet stream in recorded order, reading one row batch at a time.

    Memory is bounded by `read_rows` records. Rows before the start Positions of their
    partition are skipped; a partition without a start position is read from its first row.
    A partition's offsets must rise, as a log's do (`record` writes them so): one that goes
    back is a damaged or forged file, refused (SourceError), since positions saved from it
    would send the next replay back over records already trained.
    """

    def __init__(self, path: str | Path, *, start: Positions | None = None, read_rows: int = 4096):
        super().__init__(start)
        self.path = Path(path)
        self.read_rows = int(read_rows)
        # pyarrow has no type hints: a ParquetFile and its iterator of RecordBatches while open.
        self._file: Any = None
        self._batches: Iterator[Any] | None = None
        self._finished = False
        self._skipped: set = set()
        self._last: dict[tuple[str, int], int] = {}  # (topic, partition): the last offset read
        self._rows_read = 0  # the file's rows read so far, skipped ones included

    def open(self) -> None:
        import pyarrow.parquet as pq

        if not self.path.is_file():
            raise SourceError(f"recorded stream {str(self.path)!r} does not exist")
        try:
            # Pages written with a CRC (`continuity record` writes one) are checked as they are read.
            self._file = pq.ParquetFile(self.path, page_checksum_verification=True)
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a non-Parquet file
            raise SourceError(f"{str(self.path)!r} is not a Parquet recording: {error}") from None
        names = set(self._file.schema_arrow.names)
        missing = set(RECORDING_COLUMNS) - names
        if missing:
            raise SourceError(f"{str(self.path)!r} is not a continuity recording: missing columns {sorted(missing)}")
        self._batches = self._file.iter_batches(batch_size=self.read_rows, columns=list(RECORDING_COLUMNS))

    def poll(self, timeout_s: float = 0.1) -> list[PartitionRecords]:
        if self._batches is None:
            self.open()
        batches = self._batches
        if batches is None:
            raise SourceError(f"{str(self.path)!r} was opened but no row batches are being read")
        while not self._finished:
            try:
                batch = next(batches)
            except StopIteration:
                self._finished = True
                break
            except Exception as error:  # noqa: BLE001 - pyarrow's errors for a damaged page: OSError, ArrowInvalid, ...
                # A row group whose bytes were damaged (a bad disk, a partial copy): the rows before
                # it were read and are trained; the reader stops here, in words.
                raise SourceError(
                    f"recording {str(self.path)!r} is damaged after its first {self._rows_read:,} records: "
                    f"{parquet_reason(error)}"
                ) from None
            self._rows_read += batch.num_rows
            topics = batch.column("topic").to_pylist()
            runs = split_runs(
                topics,
                batch.column("partition").to_numpy(zero_copy_only=False).astype(np.int64),
                batch.column("offset").to_numpy(zero_copy_only=False).astype(np.int64),
                batch.column("timestamp_ms").to_numpy(zero_copy_only=False).astype(np.int64),
                batch.column("key").to_pylist(),
                batch.column("value").to_pylist(),
                self.start,
                self._skipped,
            )
            for run in runs:
                self._check_rising(run)
            if runs:
                return runs
        return []

    def _check_rising(self, run: PartitionRecords) -> None:
        key = (run.topic, run.partition)
        last = self._last.get(key)
        seen = run.offsets if last is None else np.concatenate([[last], run.offsets])
        back = np.flatnonzero(np.diff(seen) <= 0)
        if back.size:
            at = int(back[0])
            raise SourceError(offsets_go_back(self.path, run.topic, run.partition, int(seen[at]), int(seen[at + 1])))
        if len(seen):
            self._last[key] = int(seen[-1])

    @property
    def finished(self) -> bool:
        return self._finished

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._batches = None


class ScenarioSource(Source):
    """A synthetic scenario's training stream as records of one partition, in segment order.

    Each segment's examples are encoded with `codec`, `examples_per_record` to a record
    (1: single-example records), tagged with the segment's name. Offsets count records
    from 0; the topic is `topic` (default `scenario.<name>`). Deterministic: same
    scenario, seed and options give the same records.
    """

    def __init__(
        self,
        scenario,
        codec: Codec,
        *,
        topic: str | None = None,
        examples_per_record: int = 1,
        start: Positions | None = None,
        poll_records: int = 1024,
    ):
        super().__init__(start)
        if examples_per_record < 1:
            raise SourceError(f"`examples_per_record` must be >= 1. Got {examples_per_record!r}")
        if examples_per_record > 1 and codec.name != "binary":
            raise SourceError("only the binary codec carries several examples per record")
        self.scenario = scenario
        self.codec = codec
        self.topic = topic or f"scenario.{scenario.name}"
        self.examples_per_record = int(examples_per_record)
        self.poll_records = int(poll_records)
        # (segment index, first example) of every record, in order.
        plan: list[tuple[int, int]] = []
        for s, segment in enumerate(scenario.segments):
            n = len(segment.train_y)
            plan.extend((s, i) for i in range(0, n, self.examples_per_record))
        self._plan = plan
        first = _start_of(self.start, self.topic, 0)
        self._next = 0 if first is None else min(first.offset, len(plan))
        self._skip = 0 if first is None else first.skip

    def __len__(self) -> int:
        """Records in the stream."""
        return len(self._plan)

    def encode_record(self, record_index: int) -> tuple[bytes, bytes]:
        """(key, value) of record `record_index`."""
        s, i = self._plan[record_index]
        segment = self.scenario.segments[s]
        j = min(i + self.examples_per_record, len(segment.train_y))
        if self.examples_per_record == 1:
            x, y = segment.train_x[i], segment.train_y[i]
        else:
            x, y = segment.train_x[i:j], segment.train_y[i:j]
        key = f"{segment.name}/{i}".encode()
        return key, self.codec.encode(x, y, segment=segment.name)

    def poll(self, timeout_s: float = 0.1) -> list[PartitionRecords]:
        if self._next >= len(self._plan):
            return []
        lo, hi = self._next, min(self._next + self.poll_records, len(self._plan))
        keys, values = [], []
        for r in range(lo, hi):
            key, value = self.encode_record(r)
            keys.append(key)
            values.append(value)
        offsets = np.arange(lo, hi, dtype=np.int64)
        run = PartitionRecords(self.topic, 0, values, keys, offsets, offsets.copy())
        if self._skip and lo == self._next:
            run.skip_first, self._skip = self._skip, 0
        self._next = hi
        return [run]

    @property
    def finished(self) -> bool:
        return self._next >= len(self._plan)
