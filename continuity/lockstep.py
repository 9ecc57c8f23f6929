"""Several processes training one model in lockstep: rounds of bounded polling and one agreement.

Every process of a multi-process mesh must make the same dispatches in the same order
(each contributes its rows of every global micro-batch), yet each reads its own partitions
(stream/shares.py), which deliver at their own pace. A host collective before every step
would tie the step rate to the slowest network round trip. Instead the processes move in
rounds: each polls its stream for at most `round_s` (or until it holds `max_dispatches`
stacks' worth of micro-batches), then ONE small all-gather of four numbers per process
(micro-batches ready, fresh rows, stream ended, stop asked) tells every process the same
thing: how many dispatches the round runs (enough for the fullest process), how many rows
the round trains over all processes, whether every stream has ended, whether any process
is stopping. A process with fewer micro-batches pads with masked ones; the step already
treats a masked row as absent, so the global micro-batch trains exactly the rows some
process contributed. No host collective runs per step beyond the round's one.

Decisions taken from the agreement are the same everywhere because the agreement is:
windows close on the global row count at a round's end, and a stop asked of one process
(SIGTERM) stops all of them at the same round.

The global micro-batches' composition depends on when records arrived, so a multi-process
run is exactly-once per partition but not bit-reproducible across runs (a one-process
replay of a recording is).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from continuity.learner import Batch as TrainBatch
from continuity.learner import Learner
from continuity.stream import Positions
from continuity.stream.ingest import IDLE

ROUND_S = 0.5  # how long a process polls before the round's agreement
MAX_DISPATCHES = 8  # stacks a round runs at most, so a fast partition cannot starve the agreement


def process_allgather(values: np.ndarray) -> np.ndarray:
    """Every process's `values` (the same shape on each), stacked in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


@dataclass(frozen=True)
class Agreement:
    """What every process learns from one round's all-gather, the same on each."""

    dispatches: int  # stacks every process dispatches this round (the fullest process's, rounded up)
    rows: int  # fresh rows the round trains, over all processes
    ended: bool  # every process's stream has ended and none has anything left
    stop: bool  # some process was asked to stop


class Lockstep:
    """Rounds for one of several processes: poll, agree, then the agreed number of dispatches."""

    def __init__(
        self,
        learner: Learner,
        *,
        round_s: float = ROUND_S,
        max_dispatches: int = MAX_DISPATCHES,
        gather: Callable[[np.ndarray], np.ndarray] = process_allgather,
    ):
        self.learner = learner
        self.round_s = round_s
        self.max_batches = max_dispatches * learner.steps_per_dispatch
        self._gather = gather
        self.rounds = 0

    def agree(self, batches: int, rows: int, *, ended: bool, stop: bool) -> Agreement:
        """The round's one collective: this process's counts in, everyone's agreement out."""
        table = self._gather(np.array([batches, rows, int(ended), int(stop)], np.int64)).reshape(-1, 4)
        most = int(table[:, 0].max())
        k = self.learner.steps_per_dispatch
        self.rounds += 1
        return Agreement(
            dispatches=-(-most // k),
            rows=int(table[:, 1].sum()),
            ended=bool(table[:, 2].all()) and most == 0,
            stop=bool(table[:, 3].any()),
        )

    def poll(self, next_batch: Callable, *, stop: Callable[[], bool] = lambda: False) -> tuple[list, bool]:
        """This process's micro-batches for one round: up to `round_s` of polling `next_batch`
        (a Batch, IDLE, or None at the stream's end); with whether its stream ended."""
        batches: list = []
        deadline = time.monotonic() + self.round_s
        while len(batches) < self.max_batches and time.monotonic() < deadline and not stop():
            batch = next_batch()
            if batch is None:
                return batches, True
            if batch is not IDLE:
                batches.append(batch)
        return batches, False

    def stacks(self, batches: list[TrainBatch], agreement: Agreement) -> list[TrainBatch]:
        """The host stacks this process dispatches: its micro-batches, then masked ones, in
        `agreement.dispatches` stacks of K."""
        k = self.learner.steps_per_dispatch
        padded = list(batches) + [self._blank(batches)] * (agreement.dispatches * k - len(batches))
        return [self.learner.stack(padded[i : i + k]) for i in range(0, len(padded), k)]

    def _blank(self, batches: list[TrainBatch]) -> TrainBatch:
        """A micro-batch of this process's rows, all masked: what a process short of rows sends."""
        rows, learner = self.learner.process_rows, self.learner
        if batches:
            like = batches[0]
            x = _zeros_like(like.x)
            return TrainBatch(x, np.zeros_like(np.asarray(like.y)), np.zeros(rows, bool))
        x = _zeros_of(learner.inputs, rows)
        labels = learner.task.labels
        return TrainBatch(x, np.zeros((rows, *labels.shape), labels.dtype), np.zeros(rows, bool))

    def gather_rows(self, rows):
        """Every process's rows (a PyTree of arrays with one leading length), concatenated in process
        order: the held-out rows each process took this window, so every process's probe holds the
        same rows and the guard, judging the same replicated model on them, reaches the same verdict.
        Three all-gathers (the lengths, then the rows padded to the longest), at window close only."""
        import jax

        leaves = jax.tree.leaves(rows)
        count = len(leaves[0]) if leaves else 0
        counts = self._gather(np.array([count], np.int64)).reshape(-1)
        longest = int(counts.max())

        def gathered(leaf):
            leaf = np.asarray(leaf)
            padded = np.zeros((longest, *leaf.shape[1:]), leaf.dtype)
            padded[:count] = leaf
            table = self._gather(padded).reshape(len(counts), longest, *leaf.shape[1:])
            return np.concatenate([table[p, :n] for p, n in enumerate(counts)])

        return jax.tree.map(gathered, rows)

    @staticmethod
    def from_process_zero(tree):
        """Process 0's host values of `tree` on every process (the others pass a tree of the same
        shapes): what process 0 alone restored from its store (checkpoints/store.py), for every
        process to put on the mesh. One broadcast, at a restore only."""
        from jax.experimental import multihost_utils

        return multihost_utils.broadcast_one_to_all(tree)

    def gather_positions(self, positions: Positions) -> Positions:
        """Every process's positions merged (each holds its own partitions'): what a checkpoint saves.
        Two small all-gathers (the lengths, then the padded JSON), at checkpoints only."""
        text = np.frombuffer(json.dumps(positions.to_json()).encode(), np.uint8)
        longest = int(self._gather(np.array([len(text)], np.int64)).max())
        padded = np.zeros(longest, np.uint8)
        padded[: len(text)] = text
        merged = Positions()
        for row in self._gather(padded).reshape(-1, longest):
            merged = merged.merged(Positions.from_json(bytes(row).rstrip(b"\0").decode()))
        return merged


def _zeros_like(x):
    if isinstance(x, dict):
        return {name: np.zeros_like(np.asarray(value)) for name, value in x.items()}
    return np.zeros_like(np.asarray(x))


def _zeros_of(inputs, rows: int):
    if isinstance(inputs, dict):
        return {name: np.zeros((rows, *spec.shape), spec.dtype) for name, spec in inputs.items()}
    return np.zeros((rows, *inputs.shape), inputs.dtype)
