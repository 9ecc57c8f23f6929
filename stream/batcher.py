"""Examples to fixed-shape host batches (pad + mask), the Positions they reach, and the probe holdout.

`Batcher.add(block)` takes decoded `ExampleBlock`s in stream order; `next_batch()` returns
a `Batch` of exactly `batch_size` rows once enough examples are buffered (or, with
`flush=True`, whatever is left, padded). A `Holdout` marks a deterministic share of
examples for the continuity probe instead of training: the choice hashes the record key
(with the example's index inside a batched record), or, for records without a key, the
record's position, so the same stream always holds out the same examples. Marked rows
travel inside the batch they fall in (`Batch.held_out`), so what reaches the probe is
tied to the positions trained, never to how far a background reader has buffered ahead.

`Ownership` is shared between a KafkaSource (whose rebalance listener writes it) and the
Batcher (which reads it): examples of partitions this consumer no longer owns, or that
were polled before a revocation, are dropped instead of being batched. Emitting a batch
and revoking partitions are serialised by its lock, so the positions the listener
commits on revocation are exactly what was delivered.

Threading: a Batcher is NOT thread-safe; use it from one thread. Ownership is.
"""

from __future__ import annotations

import functools
import threading
import zlib
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from continuity.stream.codecs import FeatureSpec
from continuity.stream.examples import ExampleBlock, Features, map_features
from continuity.stream.records import PartitionKey, PartitionPosition, Positions

NO_SEGMENT = -1  # segment id of examples without a segment, and of padding rows


class Batch(NamedTuple):
    """A fixed-shape host batch; rows where `mask` is False are padding."""

    x: Features  # shape=(B, *feature_shape), dtype=float32 (or a dict of arrays, as decoded)
    y: np.ndarray  # shape=(B, *label_shape), dtype=int32 (classes) or float32 (numbers)
    mask: np.ndarray  # shape=(B,), dtype=bool
    segment: np.ndarray  # shape=(B,), dtype=int32; NO_SEGMENT for none / padding
    positions: Positions  # where to resume once this batch is trained
    size: int  # real rows (mask.sum())
    held_out: np.ndarray  # shape=(B,), dtype=bool: real rows for the probe, never to be trained on

    @property
    def train_mask(self) -> np.ndarray:
        """Rows to train on: real and not held out."""
        return self.mask & ~self.held_out


def _put_rows(batch: np.ndarray, given: np.ndarray, *, start: int, rows: slice) -> None:
    batch[start : start + rows.stop - rows.start] = given[rows]


def _read_only_rows(array: np.ndarray, *, rows: slice) -> np.ndarray:
    """`array[rows]`, as a read-only view."""
    view = array[rows]
    view.flags.writeable = False
    return view


def _padding(like: ExampleBlock, rows: int) -> tuple[Features, np.ndarray, np.ndarray, np.ndarray]:
    """x, y, segment and held_out of `rows` padding rows, shaped and typed as `like`'s examples (as decoded)."""
    x = map_features(lambda a: np.zeros((rows, *a.shape[1:]), a.dtype), like.x)
    y = np.zeros((rows, *like.y.shape[1:]), like.y.dtype)
    return x, y, np.full((rows,), NO_SEGMENT, np.int32), np.zeros((rows,), bool)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (Steele et al. 2014), vectorised on uint64; wraps by design."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


class Holdout:
    """Selects a deterministic `fraction` of examples for the probe.

    Hash inputs: crc32 of the record key when it has one, else crc32 of the topic with
    the partition and offset; mixed with the example's index within its record and
    `salt`. Stable across processes and platforms (never Python's `hash()`).
    """

    def __init__(self, fraction: float, *, salt: int = 0):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"`holdout fraction` must be in [0, 1). Got {fraction!r}")
        self.fraction = float(fraction)
        self.salt = int(salt)
        self._threshold = np.uint64(int(self.fraction * 2.0**64)) if fraction > 0 else None

    def select(self, block: ExampleBlock) -> np.ndarray:
        """Boolean mask, shape=(n,): True for examples that go to the probe."""
        if self._threshold is None or len(block) == 0:
            return np.zeros(len(block), bool)
        topic_hash = zlib.crc32(block.topic.encode("utf-8"))
        base = np.empty(len(block.offsets), np.uint64)
        keyed = [i for i, key in enumerate(block.keys) if key is not None]
        unkeyed = np.ones(len(block.offsets), bool)
        if keyed:
            base[keyed] = [zlib.crc32(block.keys[i]) for i in keyed]
            unkeyed[keyed] = False
        with np.errstate(over="ignore"):
            by_position = _mix64(
                block.offsets.astype(np.uint64)
                ^ (np.uint64(block.partition) << np.uint64(40))
                ^ (np.uint64(topic_hash) << np.uint64(20))
            )
            base[unkeyed] = by_position[unkeyed]
            h = _mix64(
                base[block.record]
                + block.index.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                + np.uint64(self.salt)
            )
        return h < self._threshold


class Ownership:
    """Which partitions this consumer owns, by generation; what it has delivered.

    `owned` None means everything is owned (files, scenarios, explicit assignment).
    """

    def __init__(self, owned: Iterable | None = None):
        self.lock = threading.RLock()
        self.generation = 0
        self._owned: dict[PartitionKey, int] | None = None if owned is None else {PartitionKey(*p): 0 for p in owned}
        self.delivered: dict[PartitionKey, PartitionPosition] = {}

    def owned(self) -> frozenset | None:
        with self.lock:
            return None if self._owned is None else frozenset(self._owned)

    def assign(self, partitions: Iterable) -> None:
        with self.lock:
            if self._owned is None:
                self._owned = {}
            for p in partitions:
                self._owned[PartitionKey(*p)] = self.generation

    def revoke(self, partitions: Iterable) -> dict[PartitionKey, PartitionPosition]:
        """Take partitions away; returns what was delivered of them (to commit)."""
        with self.lock:
            self.generation += 1
            revoked = {PartitionKey(*p) for p in partitions}
            if self._owned is not None:
                for p in revoked:
                    self._owned.pop(p, None)
            return {p: self.delivered[p] for p in revoked if p in self.delivered}

    def accepts(self, topic: str, partition: int, generation: int) -> bool:
        if self._owned is None:
            return True
        since = self._owned.get(PartitionKey(topic, partition))
        return since is not None and generation >= since


class Batcher:
    """Turns ExampleBlocks into fixed-shape Batches; marks the holdout share for the probe."""

    def __init__(
        self,
        spec: FeatureSpec,
        batch_size: int,
        *,
        holdout: Holdout | None = None,
        ownership: Ownership | None = None,
        start: Positions | None = None,
        segment_names: Iterable[str] = (),
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer. Got {batch_size!r}")
        self.spec = spec
        self.batch_size = batch_size
        self.holdout = holdout
        self.ownership = ownership or Ownership()
        self._positions: dict[PartitionKey, PartitionPosition] = dict(
            (PartitionKey(*k), v) for k, v in (start or Positions()).items()
        )
        self._segment_ids: dict[str, int] = {}
        for name in segment_names:
            self.segment_id(name)
        # (block, segment ids per record, held-out flag per example)
        self._buffer: deque[tuple[ExampleBlock, np.ndarray, np.ndarray]] = deque()
        # Examples of the first buffered block already batched: a block that fills several
        # batches (a batched record, a large poll) is read from here on, not sliced per batch.
        self._start = 0
        self._buffered = 0
        self._seen_generation = self.ownership.generation
        self.examples_in = 0
        self.examples_held_out = 0
        self.examples_dropped = 0

    # -- segments
    def segment_id(self, name: str | None) -> int:
        """Stable int id of a segment name (first-seen order; NO_SEGMENT for None)."""
        if name is None:
            return NO_SEGMENT
        found = self._segment_ids.get(name)
        if found is None:
            found = self._segment_ids[name] = len(self._segment_ids)
        return found

    @property
    def segment_names(self) -> list[str]:
        """Names by id: `segment_names[i]` has id i. Pass back as `segment_names=` to keep ids."""
        return list(self._segment_ids)

    # -- positions
    @property
    def positions(self) -> Positions:
        """Where to resume: everything before these positions was delivered or accounted for."""
        return Positions.of_checked(self._positions)

    def __len__(self) -> int:
        """Examples buffered (not yet batched)."""
        return self._buffered

    # -- input
    def add(self, block: ExampleBlock) -> None:
        if not self.ownership.accepts(block.topic, block.partition, block.generation):
            self.examples_dropped += len(block)
            return
        self.examples_in += len(block)
        if self.holdout is not None and len(block):
            chosen = self.holdout.select(block)
        else:
            chosen = np.zeros(len(block), bool)
        self.examples_held_out += int(chosen.sum())
        ids = np.fromiter((self.segment_id(s) for s in block.segments), np.int32, len(block.segments))
        self._buffer.append((block, ids, chosen))
        self._buffered += len(block)

    def _drop_not_owned(self) -> None:
        kept: deque[tuple[ExampleBlock, np.ndarray, np.ndarray]] = deque()
        for i, (block, ids, chosen) in enumerate(self._buffer):
            if self.ownership.accepts(block.topic, block.partition, block.generation):
                kept.append((block, ids, chosen))
            else:
                unbatched = len(block) - (self._start if i == 0 else 0)  # the first is read from _start on
                self._buffered -= unbatched
                self.examples_dropped += unbatched
                if i == 0:
                    self._start = 0  # the block after it is read from its beginning
        self._buffer = kept
        self._seen_generation = self.ownership.generation

    def ready(self) -> bool:
        return self._buffered >= self.batch_size

    # -- output
    def next_batch(self, *, flush: bool = False) -> Batch | None:
        """A full batch if enough examples are buffered; with flush, the rest padded (None if empty)."""
        with self.ownership.lock:
            if self.ownership.generation != self._seen_generation:
                self._drop_not_owned()
            if self._buffered < self.batch_size and not (flush and self._buffer):
                return None
            batch = self._take()
            self.ownership.delivered.update(self._positions)
            return batch

    def _take(self) -> Batch:
        B = self.batch_size  # noqa: N806 - the batch dimension, as in the shapes below
        block, ids, chosen = self._buffer[0]
        start = self._start
        if len(block) - start >= B:
            # One block fills the batch (a batched record, a large poll): its rows as views, not
            # copies. Every consumer of a batch copies what it keeps (the stack of K, the probe's
            # rows, the window sample); the views are read-only, so one that wrote would fail
            # loudly instead of changing rows of the block a later batch takes.
            rows = slice(start, start + B)
            view = functools.partial(_read_only_rows, rows=rows)
            x, y = map_features(view, block.x), view(block.y)
            segment, held_out = ids[block.record[rows]], view(chosen)
            filled = B
            self._advance(B)
        else:  # rows copied in from one block or more, the rest padding
            x, y, segment, held_out = _padding(block, B)
            filled = 0
        while self._buffer and (filled < B or len(self._buffer[0][0]) == self._start):
            block, ids, chosen = self._buffer[0]
            start = self._start
            n = min(B - filled, len(block) - start)
            if n:
                rows = slice(start, start + n)
                map_features(functools.partial(_put_rows, start=filled, rows=rows), x, block.x)
                y[filled : filled + n] = block.y[rows]
                segment[filled : filled + n] = ids[block.record[rows]]
                held_out[filled : filled + n] = chosen[rows]
                filled += n
            self._advance(n)
        mask = np.zeros((B,), bool)
        mask[:filled] = True
        return Batch(x, y, mask, segment, Positions.of_checked(self._positions), filled, held_out)

    def _advance(self, n: int) -> None:
        """The first buffered block's next `n` examples are batched: move past them and its position."""
        block = self._buffer[0][0]
        key = PartitionKey(block.topic, block.partition)
        stop = self._start + n
        if stop == len(block):
            self._buffer.popleft()
            self._start = 0
            end = block.position_at_end()
            if end is not None:
                self._positions[key] = end
        else:
            self._positions[key] = block.position_after(stop - 1)
            self._start = stop
        self._buffered -= n
