"""Several processes training one model in lockstep: rounds of bounded polling and one agreement.

Every process of a multi-process mesh must make the same dispatches in the same order
(each contributes its rows of every global micro-batch), yet each reads its own partitions
(stream/shares.py), which deliver at their own pace. A host collective before every step
would tie the step rate to the slowest network round trip. Instead the processes move in
rounds: each polls its stream for at most `round_s` (or until it holds `max_dispatches`
stacks' worth of micro-batches), then ONE small all-gather of five numbers per process
(micro-batches ready, fresh rows, stream ended, stop asked, window closing) tells every process the same
thing: how many dispatches the round runs (enough for the fullest process), how many rows
the round trains over all processes, whether every stream has ended, whether any process
is stopping. A process with fewer micro-batches pads with masked ones; the step already
treats a masked row as absent, so the global micro-batch trains exactly the rows some
process contributed. No host collective runs per step beyond the round's one.

Decisions taken from the agreement are the same everywhere because the agreement is:
windows close on the global row count at a round's end, and a stop asked of one process
(SIGTERM) stops all of them at the same round.

A dead peer fails the next collective (the round's all-gather, or the step's own all-reduce
over the mesh) on every other process; `LockstepLoop.run` turns that failure into `PeerLost`
naming the peer, before anything more is saved (continuity/processes.py). A peer alive but
stuck, or stopped on its own, fails nothing: every wait on the others is watched instead
(`PeerWatch`, continuity/peerwatch.py), which ends it naming the peer.

The global micro-batches' composition depends on when records arrived, so a multi-process
run is exactly-once per partition but not bit-reproducible across runs (a one-process
replay of a recording is).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import numpy as np

from continuity.learner import Batch as TrainBatch
from continuity.learner import Learner
from continuity.loop import RunSummary, TrainingLoop, _Good, add_held_out, held_out_rows, join_held_out
from continuity.peerwatch import PeerWatch
from continuity.processes import PeerLost
from continuity.stream import NO_SEGMENT, Positions
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
    close: bool = False  # some process's clock closes the window (probe.every_seconds, a quiet stream)


class Lockstep:
    """Rounds for one of several processes: poll, agree, then the agreed number of dispatches.

    `watch`: what bounds each wait on the others (every collective here goes through `waiting`);
    None waits as long as the collective does."""

    def __init__(
        self,
        learner: Learner,
        *,
        round_s: float = ROUND_S,
        max_dispatches: int = MAX_DISPATCHES,
        gather: Callable[[np.ndarray], np.ndarray] = process_allgather,
        watch: PeerWatch | None = None,
    ):
        self.learner = learner
        self.round_s = round_s
        self.max_batches = max_dispatches * learner.steps_per_dispatch
        self._gather = gather
        self.watch = watch
        self.rounds = 0

    def waiting(self, what: str) -> AbstractContextManager:
        """Around a wait on every process (`what` names it for a peer that does not come)."""
        return nullcontext() if self.watch is None else self.watch.waiting(what)

    def busy(self, what: str) -> None:
        """Names this process's own work, for the others that wait on it meanwhile."""
        if self.watch is not None:
            self.watch.busy(what)

    def agree(self, batches: int, rows: int, *, ended: bool, stop: bool, close: bool = False) -> Agreement:
        """The round's one collective: this process's counts in, everyone's agreement out."""
        counts = np.array([batches, rows, int(ended), int(stop), int(close)], np.int64)
        with self.waiting(f"round {self.rounds + 1}'s agreement"):
            table = self._gather(counts).reshape(-1, 5)
        most = int(table[:, 0].max())
        k = self.learner.steps_per_dispatch
        self.rounds += 1
        return Agreement(
            dispatches=-(-most // k),
            rows=int(table[:, 1].sum()),
            ended=bool(table[:, 2].all()) and most == 0,
            stop=bool(table[:, 3].any()),
            close=bool(table[:, 4].any()),
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
        with self.waiting("the window's held-out rows"):
            counts = self._gather(np.array([count], np.int64)).reshape(-1)
            longest = int(counts.max())

            def gathered(leaf):
                leaf = np.asarray(leaf)
                padded = np.zeros((longest, *leaf.shape[1:]), leaf.dtype)
                padded[:count] = leaf
                table = self._gather(padded).reshape(len(counts), longest, *leaf.shape[1:])
                return np.concatenate([table[p, :n] for p, n in enumerate(counts)])

            return jax.tree.map(gathered, rows)

    def broadcast_bytes(self, data: bytes) -> bytes:
        """Process 0's `data` on every process (the others pass anything). Two broadcasts."""
        from jax.experimental import multihost_utils

        with self.waiting("process 0's restored checkpoint"):
            length = int(np.asarray(multihost_utils.broadcast_one_to_all(np.array([len(data)], np.int64)))[0])
            padded = np.zeros(length, np.uint8)
            if data:
                padded[: len(data)] = np.frombuffer(data, np.uint8)[:length]
            return np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes()

    @staticmethod
    def from_process_zero(tree):
        """Process 0's host values of `tree` on every process (the others pass a tree of the same
        shapes): what process 0 alone restored from its store (checkpoints/store.py), for every
        process to put on the mesh. One broadcast, at a restore only."""
        from jax.experimental import multihost_utils

        return multihost_utils.broadcast_one_to_all(tree)

    def gather_json(self, text: str, *, what: str) -> list[str]:
        """Every process's `text`, in process order (`what` it is, for the watch). Two small
        all-gathers (the lengths, then the padded bytes)."""
        data = np.frombuffer(text.encode(), np.uint8)
        with self.waiting(what):
            longest = int(self._gather(np.array([len(data)], np.int64)).max())
            padded = np.zeros(longest, np.uint8)
            padded[: len(data)] = data
            return [bytes(row).rstrip(b"\0").decode() for row in self._gather(padded).reshape(-1, longest)]

    def gather_positions(self, positions: Positions) -> Positions:
        """Every process's positions merged (each gives its own partitions'): what a checkpoint saves."""
        merged = Positions()
        for text in self.gather_json(json.dumps(positions.to_json()), what="the window's positions"):
            merged = merged.merged(Positions.from_json(text))
        return merged


# What a collective with a dead peer raises: gloo's lost connection (CPU), NCCL's or the
# coordination service's error (the message is all XLA gives; its type is a plain ValueError).
_PEER_FAILURES = ("Gloo", "Connection closed by peer", "Connection reset by peer", "NCCL", "coordination service")


def _peer_failure(error: BaseException) -> bool:
    return any(marker in str(error) for marker in _PEER_FAILURES)


def _peer_lost_message(error: BaseException) -> str:
    """One line naming the peer (with two processes, the other one) and what the collective said."""
    import jax

    me, count = jax.process_index(), jax.process_count()
    peer = f"process {1 - me}" if count == 2 else "another process"
    detail = " ".join(str(error).split())[:200]
    return (
        f"process {me} of {count}: lost {peer} ({detail}); stopping without saving: the last checkpoint is "
        "the resume point. Restart every process."
    )


def _zeros_like(x):
    if isinstance(x, dict):
        return {name: np.zeros_like(np.asarray(value)) for name, value in x.items()}
    return np.zeros_like(np.asarray(x))


def _zeros_of(inputs, rows: int):
    if isinstance(inputs, dict):
        return {name: np.zeros((rows, *spec.shape), spec.dtype) for name, spec in inputs.items()}
    return np.zeros((rows, *inputs.shape), inputs.dtype)


class LockstepLoop(TrainingLoop):
    """The training loop as one of several processes training one model (`[scale] num_processes`).

    Every process runs this loop over its share of the partitions (`share`), with its own
    checkpoint store, and takes every decision from what all processes agree on:
    - a window is trained in rounds (`Lockstep`) and closes at a round's end, when the rows
      trained over all processes reach `probe.every_examples`, or on any process's clock
      (`probe.every_seconds`), stop or the end of every stream;
    - at its close, the rows each process held out are gathered, so every probe holds the
      same rows; the guard judges the same replicated model on them and reaches the same
      verdict, and accepts, rolls back, retries, quarantines or halts everywhere at once;
    - the window's positions are every process's, gathered, so a checkpoint holds every
      partition (a restart with another process count resumes each);
    - process 0 checkpoints the replicated model (Orbax writes host arrays from process 0
      only; the others keep only their ledger), every accepted window (a clock-timed cadence
      would differ between processes), and at start hands what it restored to all;
    - a quarantine copies each process's own partitions' records of the window.
    Not run over processes (each needs what only one process holds): the window checks on
    the window's sampled rows (off), an excision or split of a regressed window (the whole
    window is retried or quarantined), the EWC Fisher from recent rows when replay is off,
    an operator's rollback (refused: `request`), and a halt on lost positions at one agreed
    round (the process that finds them stops alone, saying so: the others' watch stops them
    at their next collective).
    """

    def __init__(self, stream, learner: Learner, store, *, lockstep: Lockstep, share, guard, **kwargs):
        super().__init__(stream, learner, store, guard=replace(guard, window_sample=0), **kwargs)
        self.lockstep = lockstep
        self.share = share
        self._agreed_stop = False  # a stop some process asked for, agreed at a round

    def run(self) -> RunSummary:
        """The loop's run; a collective that failed because a peer died is `PeerLost` naming it. A
        stop of this process alone (lost positions, saves failing, an error) is said to the others
        first, who would wait for it at their next collective: they stop too, naming it."""
        watch = self.lockstep.watch
        try:
            summary = super().run()
        except PeerLost:
            raise
        except Exception as error:
            if not _peer_failure(error):
                self._say_stopped(f"{type(error).__name__}: {' '.join(str(error).split())[:150]}")
                raise
            raise PeerLost(_peer_lost_message(error)) from None
        finally:
            if watch is not None:
                watch.close()
        if summary.stopped_on_lost_positions:
            self._say_stopped("saved positions the broker no longer has, with stream.on_lost_positions = 'halt'")
        elif summary.unsaved:
            self._say_stopped(f"checkpoint saves kept failing: {summary.unsaved}"[:200])
        return summary

    def _say_stopped(self, why: str) -> None:
        if self.lockstep.watch is not None:
            self.lockstep.watch.stopped(why)  # published at once, closed watch or not

    def request(self, kind: str, *, timeout_s: float = 60.0, **args) -> dict:
        """Operator requests, on process 0 (the only one serving the admin endpoints): a checkpoint,
        pin or unpin touches process 0's store alone, as every save does; a rollback would move process
        0's model alone, so it is refused with what to do instead."""
        if kind == "rollback":
            raise ValueError(
                "a rollback over HTTP is not run by several processes (it would move process 0's model alone): "
                "stop every process, run `continuity rollback --dir <checkpoints.dir>` on process 0's store, "
                "then start them again"
            )
        return super().request(kind, timeout_s=timeout_s, **args)

    def stopping(self) -> bool:
        """Only what every process knows: a stop agreed at a round, or the examples limit (counted over
        all processes). A stop asked of this process alone goes into the next round's agreement."""
        limit = self.max_examples is not None and self.summary.examples_trained >= self.max_examples
        return self._agreed_stop or limit

    def _asked_to_stop(self) -> bool:
        return super().stopping()

    def _restore_or_start(self):
        """Process 0 restores its store's newest good checkpoint (or starts fresh) and hands what it
        restored to every other process, which builds the same state, probe and positions from it."""
        import jax

        self._restored = None
        if jax.process_index() == 0:
            self.lockstep.busy("restoring its store's newest good checkpoint")
            state, good = super()._restore_or_start()
            self.lockstep.broadcast_bytes(_pack(self._restored, state))
            return state, good
        payload = self.lockstep.broadcast_bytes(b"")
        if not payload:  # process 0 started fresh: so does every process (the same seed)
            return super()._restore_or_start()
        restored = _unpack(payload, self.learner.init(self.seed))
        state, good = self._from_restored(restored)
        self.summary.restored_from = self.summary.last_checkpoint = restored.number
        return state, good

    def _from_restored(self, restored):
        self._restored = restored
        return super()._from_restored(restored)

    def _checkpoint(self, good: _Good, *, quarantined: int = 0) -> None:
        """Process 0 saves the replicated model with every process's positions (Orbax writes host
        arrays from process 0 only); the others note it as saved, keeping their ledger of decisions."""
        import jax

        if jax.process_index() == 0:
            self.lockstep.busy("saving a checkpoint")
            super()._checkpoint(good, quarantined=quarantined)
            return
        if good is not self._saved:
            self._saved = self._finalized = good

    def _checkpoint_due(self, good: _Good) -> bool:
        return good is not self._saved

    def _own(self, positions: Positions) -> Positions:
        return Positions({k: v for k, v in positions.items() if self.share.owns(k.topic, k.partition)})

    def _quarantine(self, start: Positions, end: Positions, verdict) -> int:
        return super()._quarantine(self._own(start), self._own(end), verdict)

    def _train_window(self, state, reader, probe, good: _Good):
        lockstep = self.lockstep
        trained = 0
        ended = False
        started = time.monotonic()
        every_s = self.guard_config.every_seconds if self.stream.live else 0
        judge_idle_s = self.stream.judge_idle_s
        last_rows = started
        self._trace = []  # no excision over processes: a regressed window is retried or quarantined whole
        held: list[tuple] = []  # (x, y, segment ids) this process held out
        done_here = False
        while True:
            polled, done_now = ([], True) if done_here else lockstep.poll(reader.next, stop=self._asked_to_stop)
            done_here = done_here or done_now
            batches = []
            for batch in polled:
                if batch.held_out.any():
                    held.append(held_out_rows(batch))
                batches.append(TrainBatch(batch.x, batch.y, batch.train_mask))
            rows_here = sum(int(b.mask.sum()) for b in batches)
            now = time.monotonic()
            if rows_here:
                last_rows = now
            close = bool(trained) and (
                bool(every_s and now - started >= every_s)
                or (judge_idle_s is not None and not rows_here and now - last_rows > judge_idle_s)
            )
            agreement = lockstep.agree(
                len(batches), rows_here, ended=done_here, stop=self._asked_to_stop(), close=close
            )
            self._agreed_stop = self._agreed_stop or agreement.stop
            for stack in lockstep.stacks(batches, agreement):  # compiled and dispatched here: this process's work
                state = self._dispatch_stack(state, stack)
            trained += agreement.rows
            self.summary.examples_trained += agreement.rows  # over all processes: every one stops alike
            # A report reads the steps' results, which wait on every process's part of their all-reduces.
            with lockstep.waiting(f"round {lockstep.rounds}'s step results"):
                self._maybe_report(state, good)
            self._collect_save()  # process 0's save finished meanwhile (a quiet stream may have no next window)
            if agreement.ended:
                ended = True
                break
            if agreement.stop or agreement.close or trained >= self.guard_config.every_examples:
                break
        self._hold_out_everywhere(probe, reader.batcher.segment_names, held)
        positions = good.positions.merged(lockstep.gather_positions(self._own(reader.batcher.positions)))
        return state, positions, ended, None

    def _dispatch_stack(self, state, stack: TrainBatch):
        on_device = self.learner.put_stack(stack)
        state, metrics = self._train_stack(state, on_device)
        # The rows' segments differ between processes: the prequential figures count them unsegmented.
        segments = np.full(np.shape(metrics["row_trained"]), NO_SEGMENT, np.int32)
        self.prequential.record(metrics["row_outcomes"], metrics["row_trained"], segments, [])
        return state

    def _hold_out_everywhere(self, probe, segment_names: list, held: list[tuple]) -> None:
        """Every process's held-out rows of the window, added to every probe in process order."""
        import jax

        lockstep = self.lockstep
        names = [
            json.loads(text)
            for text in lockstep.gather_json(json.dumps(list(segment_names)), what="the window's segment names")
        ]
        if held:
            x, y, ids = join_held_out(held)
        else:
            x = _zeros_of(self.learner.inputs, 0)
            labels = self.learner.task.labels
            y, ids = np.zeros((0, *labels.shape), labels.dtype), np.zeros(0, np.int32)
        origin = np.full(len(ids), jax.process_index(), np.int32)
        rows = lockstep.gather_rows({"x": x, "y": y, "segment": ids, "process": origin})
        for process, process_names in enumerate(names):
            mine = rows["process"] == process
            segment = rows["segment"][mine]
            xs = jax.tree.map(lambda leaf, mine=mine: leaf[mine], rows["x"])
            add_held_out(probe, process_names, xs, rows["y"][mine], segment)


def _pack(restored, state) -> bytes:
    """A restored checkpoint as bytes (empty: none was restored): its state's host arrays in leaf
    order, its probe arrays and its metadata, in one .npz (no pickles)."""
    if restored is None:
        return b""
    import io

    import jax

    arrays = {f"state.{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state))}
    arrays.update({f"probe.{path}": value for path, value in _flat(restored.probe).items()})
    meta = {"number": restored.number, "metadata": restored.metadata, "verified": restored.verified}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    out = io.BytesIO()
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


def _unpack(payload: bytes, like):
    """What `_pack` packed, the state laid out as `like` (a fresh state on the mesh)."""
    import io

    import jax

    from continuity.checkpoints import Restored

    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        leaves, tree = jax.tree.flatten(like)
        host = [data[f"state.{i}"] for i in range(len(leaves))]
        probe = _nested({name.removeprefix("probe."): data[name] for name in data.files if name.startswith("probe.")})
    state = jax.tree.unflatten(tree, [_on_mesh(h, leaf.sharding) for h, leaf in zip(host, leaves)])
    return Restored(
        number=meta["number"], state=state, probe=probe, metadata=meta["metadata"], verified=meta["verified"]
    )


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays as {"a/b/c": array} (the probe item: segments of x and y)."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, path + "/"))
        else:
            out[path] = np.asarray(value)
    return out


def _nested(flat: dict[str, np.ndarray]) -> dict:
    """What `_flat` flattened."""
    out: dict = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = value
    return out


def _on_mesh(host: np.ndarray, sharding):
    """A host array, the same on every process, laid out as `sharding` over every process's devices."""
    import jax

    def shard(index):
        return host[index]

    return jax.make_array_from_callback(host.shape, sharding, shard)
