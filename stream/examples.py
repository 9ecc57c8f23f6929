"""Decoded examples: one `Example`, or an `ExampleBlock` of many from one partition, as arrays.

A block keeps per-example arrays (x, y, which record, index within that record) and
per-record columns (offset, example count, segment, key). Slicing a block and finding
the Positions reached after any example are vectorised; nothing loops per example.

An example's features are one array or a dict of named arrays (`Features`), each with
the examples along its first axis; a label may have a shape of its own (a multi-hot
vector).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from continuity.stream.records import PartitionPosition, Position

Features = np.ndarray | dict[str, np.ndarray]  # one array, or named arrays; examples on axis 0


def map_features(f: Callable[..., Any], x: Features, *more: Features) -> Any:
    """`f` applied to each feature array of `x` (and the same feature of each of `more`)."""
    if isinstance(x, dict):
        return {name: f(array, *(other[name] for other in more)) for name, array in x.items()}
    return f(x, *more)


class Example(NamedTuple):
    """One decoded, validated example and where it came from."""

    x: Features  # one example's features: shape=feature shape, dtype=float32 (or a dict of arrays)
    y: int | float | np.ndarray  # a class, a number, or a label array (a multi-hot vector)
    segment: str | None
    key: bytes | None
    position: Position
    # The example's index within its record (0 for single-example records). The name matches
    # ExampleBlock.index; it hides tuple.index, which nothing calls on an Example.
    index: int  # type: ignore[assignment]  # a NamedTuple field may shadow a tuple method


@dataclass
class ExampleBlock:
    """Consecutive decoded examples of one partition, in stream order."""

    topic: str
    partition: int
    x: Features  # shape=(n, *feature_shape), dtype=float32 (or a dict of such arrays, each its own dtype)
    y: np.ndarray  # shape=(n, *label_shape), dtype=int32 (classes) or float32 (numbers)
    record: np.ndarray  # shape=(n,), dtype=int32: row in the per-record columns below
    index: np.ndarray  # shape=(n,), dtype=int32: index of the example within its record
    # Per record (r rows): only records that decoded and validated.
    offsets: np.ndarray  # shape=(r,), dtype=int64
    counts: np.ndarray  # shape=(r,), dtype=int32: examples the record carries in total
    segments: list  # r entries of str | None
    keys: list  # r entries of bytes | None
    generation: int = 0  # ownership generation when polled (see stream.batcher.Ownership)
    # Where to resume once every example here is delivered: after the last record the
    # source handed over, including trailing dead letters. None: after the last example.
    end: PartitionPosition | None = None

    def __len__(self) -> int:
        return len(self.y)

    def slice(self, start: int, stop: int) -> ExampleBlock:
        """Examples [start, stop) of this block (shares the per-record columns)."""
        return ExampleBlock(
            self.topic,
            self.partition,
            map_features(lambda a: a[start:stop], self.x),
            self.y[start:stop],
            self.record[start:stop],
            self.index[start:stop],
            self.offsets,
            self.counts,
            self.segments,
            self.keys,
            self.generation,
            self.end if stop >= len(self) else None,
        )

    def position_after(self, i: int) -> PartitionPosition:
        """Where to resume after example i has been delivered."""
        if i == len(self) - 1 and self.end is not None:
            return self.end
        row = self.record[i]
        index = int(self.index[i])
        offset = int(self.offsets[row])
        if index + 1 >= int(self.counts[row]):
            return PartitionPosition(offset + 1, 0)
        return PartitionPosition(offset, index + 1)

    def examples(self) -> Iterator[Example]:
        """Examples one at a time (convenience; not for the hot path)."""
        for i in range(len(self)):
            row = int(self.record[i])
            y = self.y[i]
            yield Example(
                map_features(lambda a: a[i], self.x),  # noqa: B023 - used at once, within the iteration
                y if y.ndim else int(y) if self.y.dtype.kind == "i" else float(y),
                self.segments[row],
                self.keys[row],
                Position(self.topic, self.partition, int(self.offsets[row])),
                int(self.index[i]),
            )

    def position_at_end(self) -> PartitionPosition | None:
        """Where to resume once this whole block is delivered (None: empty block with no end)."""
        if self.end is not None:
            return self.end
        return self.position_after(len(self) - 1) if len(self) else None

    @staticmethod
    def concatenate(blocks: list[ExampleBlock]) -> ExampleBlock:
        """Blocks of one partition joined in order (per-record rows renumbered)."""
        if len(blocks) == 1:
            return blocks[0]
        first = blocks[0]
        shift = np.cumsum([0] + [len(b.offsets) for b in blocks[:-1]])
        return ExampleBlock(
            first.topic,
            first.partition,
            map_features(lambda *parts: np.concatenate(parts), *(b.x for b in blocks)),
            np.concatenate([b.y for b in blocks]),
            np.concatenate([b.record + s for b, s in zip(blocks, shift)]).astype(np.int32),
            np.concatenate([b.index for b in blocks]),
            np.concatenate([b.offsets for b in blocks]),
            np.concatenate([b.counts for b in blocks]),
            [s for b in blocks for s in b.segments],
            [k for b in blocks for k in b.keys],
            max(b.generation for b in blocks),
            blocks[-1].end,
        )
