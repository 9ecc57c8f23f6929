"""Ingest: poll a Source and decode on a background thread into a bounded queue of ExampleBlocks.

    ingest = Ingest(source, codec, dead_letters)
    batcher = Batcher(spec, 64, ownership=source.ownership, start=source.start)
    with ingest:
        for batch in batches(ingest, batcher):
            ...  # train; checkpoint batch.positions; source.commit(batch.positions)

The thread overlaps Kafka I/O and decoding with the caller's compute. It submits each
run of records to the codec (`Codec.submit`): decoded right there, or, by a decoder process
(stream/decoder_process.py), elsewhere while the thread polls on; `get` hands the blocks
out in poll order either way. The queue is bounded (`queue_blocks`), so a slow consumer
applies back-pressure instead of growing memory. Every block is stamped with the ownership
generation at poll time, so blocks of partitions revoked meanwhile are dropped by the
Batcher. Bad records go to the dead-letter sink (from `get`, before their block can be
trained) and are counted; they never stop the thread. An unexpected error in the thread or
in decoding is re-raised in the caller by `get`.

Threading: `get`, `batches` and `stop` are for one consumer thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import NamedTuple

from continuity.stream.batcher import Batch, Batcher
from continuity.stream.codecs import Codec
from continuity.stream.deadletters import DeadLetterSink, MemoryDeadLetters
from continuity.stream.examples import ExampleBlock
from continuity.stream.records import PartitionPosition
from continuity.stream.sources import Source, SourceError

log = logging.getLogger(__name__)

_END = object()


class _Decoding(NamedTuple):
    """A polled run on its way: its decoding (a future) and what the poll knew of it."""

    future: Future
    generation: int  # the ownership generation at poll time (stream.batcher.Ownership)
    end: PartitionPosition  # where to resume once the run is delivered: after its last record
    records: int


class IngestStats:
    """Counters: `polls` by the ingest thread; records, examples and dead letters as `get` hands them out."""

    def __init__(self):
        self.records = 0
        self.examples = 0
        self.dead_letters = 0
        self.polls = 0


class Ingest:
    """A background thread: Source.poll -> Codec.decode -> bounded queue of ExampleBlocks."""

    def __init__(
        self,
        source: Source,
        codec: Codec,
        dead_letters: DeadLetterSink | None = None,
        *,
        queue_blocks: int = 32,
        poll_timeout_s: float = 0.1,
    ):
        self.source = source
        self.codec = codec
        self.dead_letters = dead_letters if dead_letters is not None else MemoryDeadLetters()
        self.poll_timeout_s = poll_timeout_s
        self.stats = IngestStats()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_blocks)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._head: _Decoding | object | None = None  # taken from the queue, its decoding not yet done

    def start(self) -> Ingest:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="continuity-ingest", daemon=True)
            self._thread.start()
        return self

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        source = self.source
        try:
            source.stop_requested = self._stop.is_set
            source.open()
            while not self._stop.is_set():
                runs = source.poll(self.poll_timeout_s)
                generation = source.ownership.generation
                self.stats.polls += 1
                for run in runs:
                    # A decoder process returns at once: polling goes on while the run decodes.
                    decoding = _Decoding(
                        self.codec.submit(run), generation, PartitionPosition(int(run.offsets[-1]) + 1, 0), len(run)
                    )
                    if not self._put(decoding):
                        return
                if not runs and source.finished:
                    self._put(_END)
                    return
        except SourceError as error:
            # Said in words by the source (lost positions, which it also logged; a damaged
            # recording; a topic that is not there): the caller reports it, without a traceback.
            self._error = error
            self._put(_END)
        except BaseException as error:
            log.exception("ingest thread failed")
            self._error = error
            self._put(_END)

    def get(self, timeout_s: float | None = None) -> ExampleBlock | None:
        """The next block; None on timeout or once the source is finished (see `ended`).

        Its dead letters go to the sink here, before any of its examples can be trained (and
        their positions committed). A decoding error is raised here."""
        if self._thread is None:
            self.start()
        if self._ended:
            return None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self._head is None:
            try:
                self._head = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                return None
        if not isinstance(self._head, _Decoding):  # _END
            self._ended = True
            if self._error is not None:
                raise self._error
            return None
        decoding = self._head
        try:
            block, letters = decoding.future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return None
        self._head = None
        block.generation, block.end = decoding.generation, decoding.end
        for letter in letters:
            self.dead_letters.put(letter)
        self.stats.records += decoding.records
        self.stats.examples += len(block)
        self.stats.dead_letters += len(letters)
        return block

    @property
    def ended(self) -> bool:
        """True once a finite source is exhausted and every block was taken."""
        return self._ended

    def stop(self, *, close_source: bool = True) -> None:
        """Stops the thread; `close_source=False` leaves the source open for another Ingest."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if close_source:
            self.source.close()
        self.dead_letters.flush()

    def __enter__(self) -> Ingest:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


IDLE = object()  # BatchStream.next(): nothing arrived within the wait; the stream goes on


class BatchStream:
    """Batches from an Ingest in stream order, one `next()` at a time.

    `next()` returns a Batch, `IDLE` when no record arrived within `max_wait_s` (so a
    caller can do other work on a quiet live stream), or None once the stream has ended:
    a finite source exhausted (the last batch padded) or, with `idle_timeout_s`, that long
    without any block since the source first could read (a consumer-group join takes seconds,
    more on a loaded machine: it is not idleness). With `flush_idle`, a partial batch is emitted (padded) whenever no
    block arrived within `max_wait_s`, so a slow stream still trains promptly.
    Threading: one consumer thread.
    """

    def __init__(
        self,
        ingest: Ingest,
        batcher: Batcher,
        *,
        idle_timeout_s: float | None = None,
        flush_idle: bool = False,
        max_wait_s: float = 0.5,
    ):
        self.ingest = ingest
        self.batcher = batcher
        self.idle_timeout_s = idle_timeout_s
        self.flush_idle = flush_idle
        self.max_wait_s = max_wait_s
        self._last_block = time.monotonic()
        self._reading = False  # the source has been ready once: the idle clock runs
        self._draining = False

    def next(self):
        batcher = self.batcher
        while True:
            if self._draining:
                return _drained(batcher)
            batch = batcher.next_batch()
            if batch is not None:
                return batch
            block = self.ingest.get(timeout_s=self.max_wait_s)
            if block is not None:
                batcher.add(block)
                self._last_block = time.monotonic()
                continue
            if not self._reading and self.ingest.source.ready:
                self._reading, self._last_block = True, time.monotonic()
            if self.ingest.ended or (
                self.idle_timeout_s is not None
                and self._reading
                and time.monotonic() - self._last_block > self.idle_timeout_s
            ):
                self._draining = True
                continue
            if self.flush_idle and len(batcher):
                batch = _drained(batcher)
                if batch is not None:
                    return batch
            return IDLE


def batches(
    ingest: Ingest,
    batcher: Batcher,
    *,
    idle_timeout_s: float | None = None,
    flush_idle: bool = False,
    max_wait_s: float = 0.5,
    stop: Callable[[], bool] | None = None,
) -> Iterator[Batch]:
    """Batches from an Ingest, in stream order, until the stream ends (see BatchStream).

    `stop` is checked between blocks: once it returns True the generator ends, leaving what
    is buffered untrained (positions stay exact).
    """
    stream = BatchStream(ingest, batcher, idle_timeout_s=idle_timeout_s, flush_idle=flush_idle, max_wait_s=max_wait_s)
    while not (stop is not None and stop()):
        batch = stream.next()
        if batch is None:
            return
        if batch is not IDLE:
            yield batch


def _drained(batcher: Batcher) -> Batch | None:
    """The next (padded) batch of what is buffered, or None when nothing is left.

    Batches of size 0 only move positions past trailing dead letters; they are skipped.
    """
    while (batch := batcher.next_batch(flush=True)) is not None:
        if batch.size:
            return batch
    return None
