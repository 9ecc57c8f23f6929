"""The training loop that `serve` and `replay` share: ingest -> train -> guard -> checkpoint -> commit.

One run:
1. Restore what a restart should restore (the rollback head, else the newest good
   checkpoint): learner state, probe store, stream positions, segment names. Or start
   fresh.
2. Read batches from the stream at those positions. Held-out rows go to the probe;
   the rest are trained, up to `learner.steps_per_dispatch` batches per jitted dispatch.
3. Every `guard.every_examples` trained examples (a window), judge the candidate
   against the last good model on the probe.
   - Accept: consolidate EWC, decay lambda; it is the new last good model. Save it as a
     checkpoint (async) when `checkpoint_every_s` has passed since the last one; once a
     save is finalized, commit its positions to the source.
   - Regress: go back to the last good state from its device copy, with the probe store
     and positions that belong to it. Then retry the window (lambda boosted), or
     quarantine its records, or halt. A quarantine takes what did the damage: when the
     window checks (or the rows resembling the regressed probe segments) locate it in part
     of the window, the window is read and trained again without that span (an
     excision); when nothing locates it, its first half is trained alone (a split).
     After `sustained_windows` regressions in a row, `on_sustained_regression` may accept
     the window as a new baseline, or halt.
4. At the end of a finite stream, or when `stop()` turns true, judge the last partial
   window the same way, checkpoint the last good model if it is not saved yet, wait
   for the save, commit, and return.
5. When the source finds that a position it holds is gone from the broker (topic
   recreated, log lost or truncated), it records that (ledger event `lost_positions`,
   counted in `Progress.lost_positions`) and acts by `stream.on_lost_positions`. Under
   "halt" it stops before reading anything of those partitions; the loop then drops the
   window in progress unjudged (its records may come from either log), saves the last
   accepted model if it is not saved yet, as any stop does, commits nothing, and returns
   with `RunSummary.stopped_on_lost_positions`. No position is moved: an operator decides.

A save that fails (a full disk) costs no training: the failure is logged in one line
and counted, offsets stay committed at the last finalized checkpoint, and the save is
tried again with backoff (1 s, doubling to 60 s) while the loop trains and judges on.
Only when saves have failed for `max_unsaved_s` in a row does the run stop, with
`RunSummary.unsaved` saying so (`serve` exits 5).

A store whose checkpoints all fail to restore is not a reason to start over: that
would retrain from the stream's start and silently abandon the lineage.
NoUsableCheckpointError stops the run before anything is read, unless `start_fresh`.

Judging and checkpointing are decoupled on purpose: every window is judged (and EWC
consolidated), which is what decides the model, while checkpoints, which only decide
how much a crash re-trains, are written at most every `checkpoint_every_s`. The state
never depends on when saves happened, so determinism and exactly-once hold for any
interval: a checkpoint always sits on a window boundary of the surviving lineage.

Exactly-once training effect: positions are saved inside each checkpoint (with what the
topics were then: ids and partition counts, so a recreated topic is told from the one
the positions belong to) and the source is re-opened at them on restart, so in the
surviving lineage every record is trained once. The ledger records each accepted or quarantined window with its
positions; chained together, they cover the stream without gaps or overlaps.

Threading: `run` blocks the calling thread; `stop` may be set from another one (a
signal handler, an HTTP endpoint).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import jax
import numpy as np

from continuity.checkpoints import CheckpointSaveError, CheckpointStore, CorruptCheckpointError
from continuity.detectors import WindowSample
from continuity.errors import UsageError
from continuity.guard import Guard, GuardConfig
from continuity.learner import Batch as TrainBatch
from continuity.learner import Learner, StepTotals, tree_bytes
from continuity.learner.learner import feature_rows
from continuity.memory import byte_size
from continuity.prequential import PrequentialFigures, PrequentialTracker
from continuity.probe import ProbeConfig, ProbeStore, load_golden
from continuity.regression import Verdict
from continuity.serving import AcceptedModel
from continuity.stream import (
    NO_SEGMENT,
    Batcher,
    Codec,
    DeadLetter,
    DeadLetterSink,
    Holdout,
    Ingest,
    LostPosition,
    LostPositionsError,
    PartitionKey,
    Positions,
    Source,
    SourceError,
)
from continuity.stream.ingest import IDLE, BatchStream

log = logging.getLogger(__name__)

REGRESSION_STREAK = 3  # windows regressed in a row before the first warning
MAX_RETRAINS = 3  # times a regressed window is cut and trained again before all of it is quarantined

SAVE_RETRY_S = (1.0, 60.0)  # first wait after a failed save, and the most it doubles to


class NoUsableCheckpointError(UsageError):
    """The store holds checkpoints but none can be restored; starting over needs the operator's word."""


@dataclass
class StreamInput:
    """Where records come from and where the ones that are not trained go."""

    open_source: Callable[[Positions], Source]  # a source that starts at the given positions
    codec: Codec
    dead_letters: DeadLetterSink  # undecodable / invalid records
    quarantine: DeadLetterSink  # records of windows the guard quarantined
    # Re-reads a range for quarantine. Defaults to open_source; a Kafka group consumer
    # should pass an assign-mode reader so the copy does not rebalance the group.
    open_reader: Callable[[Positions], Source] | None = None
    idle_timeout_s: float | None = None  # end the run after this long without records
    flush_idle: bool = False  # train a partial batch when the stream goes quiet (live streams)
    # A live stream that goes quiet closes its window after this long, so what was trained is
    # judged, checkpointed and committed instead of waiting for the next record. None: never.
    judge_idle_s: float | None = None
    # Records arrive in real time (Kafka): a window also closes after `probe.every_seconds`.
    # False for recorded streams, whose windows close by count only (replays are bit-identical).
    live: bool = False


@dataclass
class RunSummary:
    """What a run did; also what `replay` prints at the end."""

    examples_trained: int = 0  # this run, including windows later rolled back
    windows: int = 0
    accepted: int = 0
    rollbacks: int = 0
    retries: int = 0
    quarantined_records: int = 0
    dead_letters: int = 0
    skipped_updates: int = 0
    nonfinite_rows: int = 0  # rows masked out of a step for a non-finite loss or input; this run, like examples
    halted: bool = False
    stopped: bool = False
    # Positions the broker no longer had (each with the action taken), and whether the run
    # stopped on them (on_lost_positions = "halt"): see the module docstring.
    lost_positions: list = field(default_factory=list)
    stopped_on_lost_positions: bool = False
    checkpoint_failures: int = 0  # saves that failed (a full disk); each is retried
    unsaved: str | None = None  # why the run ended with its last good model not checkpointed (saves kept failing)
    restored_from: int | None = None
    last_checkpoint: int | None = None
    positions: dict = field(default_factory=dict)
    probe_accuracy: float | None = None
    probe_loss: float | None = None  # tasks judged on losses: the probe's mean loss, in place of accuracy
    # Test-then-train (continuity/prequential.py): each trained record predicted before its update,
    # over the surviving lineage since the stream's start (a restored checkpoint's count goes on).
    prequential_accuracy: float | None = None
    prequential_loss: float | None = None  # tasks judged on losses: the mean loss, in place of accuracy
    prequential_examples: int = 0
    prequential_segments: dict = field(default_factory=dict)
    ewc_strength: float | None = None
    wall_seconds: float = 0.0
    guard_seconds: float = 0.0  # judging, consolidating, rolling back and starting saves: the guard's cost

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Progress:
    """A snapshot for progress lines and metrics, taken every `progress_every_s` seconds."""

    examples_trained: int
    examples_per_second: float
    lineage_examples: int
    rollbacks: int
    dead_letters: int
    quarantined_records: int
    probe_accuracy: float | None
    probe_segments: dict
    ewc_strength: float | None
    checkpoint: int | None
    positions: Positions
    step_seconds: list  # wall time per train dispatch since the last snapshot (host view)
    probe_loss: float | None = None  # tasks judged on losses: probe mean loss; probe_segments then hold losses
    regressions_in_a_row: int = 0  # windows judged regressed since the last accepted one
    lost_positions: int = 0  # partitions whose held position the broker no longer had, this run
    stream_note: str | None = None  # what keeps the source from reading ("broker unreachable for 42 s"); None: reading
    checkpoint_failures: int = 0  # saves that failed so far (running total)
    nonfinite_rows: int = 0  # rows masked out of a step for a non-finite loss or input, counted per window
    # The train steps since the last snapshot, as the device summed them (StepTotals): None
    # when no step updated (or no row was trained) since.
    train_loss: float | None = None  # mean total loss (fresh + replayed + EWC penalty) of the steps that updated
    grad_norm: float | None = None  # mean global gradient norm of those steps
    replay_share: float | None = None  # replayed rows / all rows in the losses
    skipped_updates: int = 0  # steps skipped as non-finite in this run, including windows later rolled back
    prequential: PrequentialFigures | None = None  # test-then-train figures of the lineage, this window's included


class _StepFigures:
    """The train steps' figures between progress snapshots, without a host sync per step.

    The jitted step adds to running totals in the state (LearnerState.totals); they are
    read at progress time, and taken out of the state (zeroed) before each judgement, so
    every copy the guard keeps or checkpoints holds zeros and a rollback cannot count a
    step twice.
    """

    def __init__(self):
        self._pending = np.zeros(len(StepTotals._fields))  # taken at judgements since the last snapshot
        self._read = np.zeros(len(StepTotals._fields))  # the state's totals at the last read
        self.skipped = 0  # steps skipped in this run

    @staticmethod
    def _host(totals: StepTotals) -> np.ndarray:
        return np.array([float(v) for v in jax.device_get(totals)])

    def taken(self, totals: StepTotals) -> None:
        """Totals just taken out of the state, which now holds zeros."""
        self._pending += self._host(totals) - self._read
        self._read[:] = 0

    def snapshot(self, totals: StepTotals) -> dict:
        """Progress fields for the steps since the last snapshot; `totals`: the state's now."""
        now = self._host(totals)
        interval = StepTotals(*(self._pending + now - self._read))
        self._pending[:] = 0
        self._read = now
        self.skipped += int(interval.skipped)
        updated = interval.steps - interval.skipped
        rows = interval.fresh_rows + interval.replayed_rows
        return {
            "train_loss": interval.loss / updated if updated else None,
            "grad_norm": interval.grad_norm / updated if updated else None,
            "replay_share": interval.replayed_rows / rows if rows else None,
            "skipped_updates": self.skipped,
        }


@dataclass
class _Good:
    """Everything that belongs to the last good model, to return to on a regression."""

    number: int | None  # its checkpoint; None while it is not saved yet
    probe: ProbeStore
    positions: Positions
    segment_names: list
    lineage_examples: int
    report: dict = field(default_factory=dict)  # its probe figures, for its checkpoint
    verdict: Verdict | None = None  # the verdict that accepted it
    topics: dict = field(default_factory=dict)  # what the topics of `positions` were (Source.topic_identities)
    codec_state: dict | None = None  # the codec's state at `positions` (Codec.state; None: a stateless codec)
    prequential: dict | None = None  # the prequential totals up to `positions` (PrequentialTracker.snapshot)


@dataclass
class _Excision:
    """A regressed window to train again up to `end`, without the span [start, end).

    The span is what the window checks found damaged; its records are quarantined once
    the window, trained without them, is accepted (or with the whole window, if it still
    regresses). An empty span (start == end) is a split: the window's first half is
    trained alone, and its second half is read again as the next window.
    """

    start: Positions
    end: Positions
    verdict: Verdict  # the verdict that found the span: the quarantine's reason
    depth: int = 1  # times this window has been cut

    @property
    def split(self) -> bool:
        return self.start == self.end

    def covers(self, before: Positions, after: Positions) -> bool:
        """True when a batch that moved the stream from `before` to `after` lies inside the span."""
        return _reached(before, self.start) and _reached(self.end, after)


def _reached(positions: Positions, target: Positions) -> bool:
    """True when every partition of `target` is at or past its position there in `positions`."""
    for key in target:
        if key not in positions:
            return False
        here, there = positions[key], target[key]
        if (here.offset, here.skip) < (there.offset, there.skip):
            return False
    return True


def config_digest(*configs) -> str:
    """A short stable digest of the configs (dataclasses or JSON-able dicts) that shape training,
    saved in every checkpoint."""
    text = json.dumps([c if isinstance(c, dict) else asdict(c) for c in configs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Reader:
    """A source opened at given positions, with its ingest thread and batcher."""

    def __init__(
        self,
        stream: StreamInput,
        batch_size: int,
        holdout: Holdout,
        positions: Positions,
        segment_names: list,
        *,
        topics: dict,
        on_lost_positions: Callable[[str, tuple[LostPosition, ...]], None],
    ):
        self.stream, self.batch_size, self.holdout = stream, batch_size, holdout
        self.source = stream.open_source(positions)
        self.source.expect_topics(topics)
        self.source.on_lost_positions = on_lost_positions
        self._start(positions, segment_names)

    def _start(self, positions: Positions, segment_names: list) -> None:
        stream = self.stream
        self.ingest = Ingest(self.source, stream.codec, stream.dead_letters).start()
        self.batcher = Batcher(
            stream.codec.spec,
            self.batch_size,
            holdout=self.holdout,
            ownership=self.source.ownership,
            start=positions,
            segment_names=segment_names,
        )
        self.batches = BatchStream(
            self.ingest,
            self.batcher,
            idle_timeout_s=stream.idle_timeout_s,
            flush_idle=stream.flush_idle,
            max_wait_s=0.2,
        )

    def rewind(self, positions: Positions, segment_names: list) -> bool:
        """Read again from `positions` on the same source (see Source.rewind); False: closed, re-open it."""
        self.ingest.stop(close_source=False)  # what it buffered belongs to the abandoned reading
        if not self.source.rewind(positions):
            self.source.close()
            return False
        self._start(positions, segment_names)
        return True

    def next(self):
        """A Batch, IDLE on a quiet live stream, or None at the end."""
        return self.batches.next()

    def close(self) -> None:
        self.ingest.stop()


class _Request:
    """An operator request (rollback, checkpoint) handed from another thread to the loop's thread."""

    def __init__(self, kind: str, **args):
        self.kind, self.args = kind, args
        self.done = threading.Event()
        self.result: dict | None = None
        self.error: BaseException | None = None

    def finish(self, result: dict | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class TrainingLoop:
    """One run of the loop; see the module docstring. Build it, then call `run()` once."""

    def __init__(
        self,
        stream: StreamInput,
        learner: Learner,
        store: CheckpointStore,
        *,
        probe: ProbeConfig = ProbeConfig(),
        guard: GuardConfig = GuardConfig(),
        seed: int = 0,
        stop: Callable[[], bool] = lambda: False,
        on_progress: Callable[[Progress], None] | None = None,
        progress_every_s: float = 5.0,
        max_examples: int | None = None,
        checkpoint_every_s: float = 0.0,
        max_unsaved_s: float = 0.0,
        start_fresh: bool = False,
        save_retry_s: tuple[float, float] = SAVE_RETRY_S,
        digest: str | None = None,
        on_accepted: Callable[[AcceptedModel], None] | None = None,
    ):
        """`digest`: of the configuration the learner was built from, saved in every checkpoint
        (restoring one saved under another digest is logged); by default, of the learner's
        description (Learner.describe) and the probe and guard configs.

        `on_accepted`: called on the loop's thread with each model that becomes the one to
        serve: the last good model once its checkpoint is finalized, a restored checkpoint at
        start, and the checkpoint an operator rolled back to. Never a candidate mid-window.
        Its params are the guard's copy, which no step donates; keep them, do not mutate them."""
        self.stream = stream
        self.learner = learner
        self.store = store
        self.probe_config = probe
        self.guard_config = guard
        self.seed = seed
        self._stop = stop
        self.on_progress = on_progress
        self.progress_every_s = progress_every_s
        self.max_examples = max_examples
        self.checkpoint_every_s = checkpoint_every_s  # 0: checkpoint every accepted window
        self.max_unsaved_s = max_unsaved_s  # saves failing this long in a row stop the run; 0: never
        self.start_fresh = start_fresh  # start a new model even when the store's checkpoints cannot be restored
        self.save_retry_s = save_retry_s
        self.guard = Guard(learner, guard)
        self.window_sample = WindowSample(max(guard.window_sample, 1))  # the rows the window checks test
        self.holdout = Holdout(probe.holdout_fraction, salt=seed)
        # What is only reported (the prequential window) is left out, as Config.digest leaves it.
        judging = {k: v for k, v in asdict(probe).items() if k != "prequential_window"}
        self.digest = digest or config_digest(learner.describe(), judging, guard)
        self.ledger = store.ledger
        self.summary = RunSummary()
        self._last_report: dict = {}
        self._step_seconds: list[float] = []
        self._stepped = False  # the run's first dispatch waited for (`_train_stack`)
        self._requests: queue.Queue[_Request] = queue.Queue()
        self.ready = threading.Event()  # set once restored and reading
        self.reader: _Reader | None = None
        self._saved: _Good | None = None  # the good model last handed to the store (or restored): lineage parent
        self._finalized: _Good | None = None  # the good model last known to be on disk (or restored)
        self._pending: _Good | None = None  # handed to the store, not yet known to be finalized
        self._pending_params: Any = None  # the params of `_pending` (the guard's copy when it was saved)
        self.on_accepted = on_accepted
        self._last_save = time.monotonic()
        self._failing_since: float | None = None  # when saves started failing (None: the last one worked)
        self._retry_at = 0.0  # no save is started before this (monotonic) time after a failure
        self._retry_wait_s = save_retry_s[0]
        self._regressions_in_a_row = 0  # windows judged regressed since the last accepted one
        self._step_figures = _StepFigures()
        self._excision: _Excision | None = None  # a window to train again without its damaged span
        self._trace: list[tuple[int, Positions, Positions]] = []  # the window's trained batches (see _train_window)
        self.prequential = PrequentialTracker(
            learner.task.outcome, window=probe.prequential_window, max_segments=probe.max_segments
        )

    def request(self, kind: str, *, timeout_s: float = 60.0, **args) -> dict:
        """Ask the loop, from another thread, to `rollback` (to=N | None) or `checkpoint` now; waits for it.

        Handled between batches. Raises what handling raised (ValueError for a bad step,
        TimeoutError when the loop did not get to it in time).
        """
        request = _Request(kind, **args)
        self._requests.put(request)
        if not request.done.wait(timeout_s):
            raise TimeoutError(f"the training loop did not handle the {kind} request within {timeout_s:.0f} s")
        if request.error is not None:
            raise request.error
        if request.result is None:  # finish() hands back a result or an error, never neither
            raise RuntimeError(f"the {kind} request finished without a result")
        return request.result

    # ---- public ----------------------------------------------------------------------------

    @property
    def good_number(self) -> int | None:
        """The newest good checkpoint: what a restart restores (read from other threads too)."""
        return None if self._saved is None else self._saved.number

    def stopping(self) -> bool:
        return self._stop() or (self.max_examples is not None and self.summary.examples_trained >= self.max_examples)

    def run(self) -> RunSummary:
        started = time.perf_counter()
        state, good = self._restore_or_start()
        self._saved = self._finalized = good
        probe = good.probe.copy()
        self.prequential.restore(good.prequential)
        self.guard.mark_good(state, trained=good.lineage_examples > 0)
        self._announce(good.number)
        reader = self.reader = self._open(good)
        self.ready.set()
        retries = 0
        self._progress_clock = (time.monotonic(), 0)  # (when, examples trained) of the last report
        try:
            while True:
                window_start_examples = self.summary.examples_trained
                # The state's counter rolls back with the state; the run's total counts every window once.
                window_start_nonfinite = int(state.nonfinite_rows)
                state, positions, ended, recent = self._train_window(state, reader, probe, good)
                self._ready(state)
                self.summary.nonfinite_rows += int(state.nonfinite_rows) - window_start_nonfinite
                trained = self.summary.examples_trained - window_start_examples
                if not trained and self._excision is not None and (ended or _reached(positions, self._excision.end)):
                    good = self._finish_excision(good, positions, list(reader.batcher.segment_names))
                if trained:
                    state, good, probe, reader, retries, halt = self._judge_window(
                        state, good, probe, reader, positions, trained, recent, retries
                    )
                    if halt:
                        break
                if not self._requests.empty():
                    state, good, probe, reader = self._handle_requests(state, good, probe, reader)
                if self._checkpoint_due(good):  # a quiet stream: what was accepted is saved all the same
                    self._checkpoint(good)
                self._collect_save()
                self._maybe_report(state, good)
                if self._unsaved_too_long():
                    break
                if (ended and self._excision is None) or self.stopping():
                    break
            self._checkpoint(good)  # the last good model, if accepted since the last checkpoint
        except SourceError as error:
            # The source stopped in words: positions the broker no longer has (it logged and recorded
            # them, and read nothing of those partitions), a damaged recording, a topic gone. The
            # window in progress is dropped unjudged (its state was donated to it: use the good copy).
            lost = isinstance(error, LostPositionsError)
            self.summary.stopped_on_lost_positions = lost
            if self.guard.last_good is not None:  # run() marks the starting model good first
                state = self.guard.last_good
            self.prequential.restore(good.prequential)
            self._checkpoint(good)  # the last accepted model, as any stop saves it; no position moves
            if self.on_progress is not None:  # the metrics see the stop before the service ends
                self.on_progress(self._progress(state, good, self.summary.examples_trained, 1.0))
            if not lost:  # the caller reports it, once `finally` below has finalized the save
                self.ledger.append("source_failed", error=str(error), positions=good.positions.to_json())
                raise
        finally:
            self._collect_save(wait=True)  # the last save is finalized (or failed) before anything is committed
            reader.close()
            self._fail_pending_requests()
        self.summary.last_checkpoint = self.good_number  # not a save that failed
        if good is not self._finalized and self.summary.unsaved is None:
            failures = self.summary.checkpoint_failures
            self.summary.unsaved = (
                f"the last good model (positions {good.positions.to_json()}) is not checkpointed: saving failed "
                f"{'once' if failures == 1 else f'{failures} times'}; a restart resumes from {self._resume_point()}"
            )
        self.summary.stopped = self._stop()
        self.summary.dead_letters = self.stream.dead_letters.total
        self.summary.skipped_updates = int(state.skipped_updates)
        self.summary.positions = {f"{k.topic}/{k.partition}": v.offset for k, v in good.positions.items()}
        self.summary.probe_accuracy = self._last_report.get("accuracy")
        self.summary.probe_loss = self._last_report.get("loss")
        self._summarize_prequential()
        self.summary.ewc_strength = float(state.ewc.strength)
        self.summary.wall_seconds = time.perf_counter() - started
        self.ledger.append(
            "stop",
            **{k: v for k, v in self.summary.to_json().items() if k != "positions"},
            positions=good.positions.to_json(),
        )
        self.final_state = state
        return self.summary

    def _summarize_prequential(self) -> None:
        figures = self.prequential.figures()
        if figures.figure == "accuracy":
            self.summary.prequential_accuracy = figures.total
        else:
            self.summary.prequential_loss = figures.total
        self.summary.prequential_examples = figures.examples
        self.summary.prequential_segments = figures.segments

    def _judge_window(
        self,
        state,
        good: _Good,
        probe: ProbeStore,
        reader: _Reader,
        positions: Positions,
        trained: int,
        recent,
        retries: int,
    ):
        """Judge the candidate after a window, then accept, retry, quarantine or halt."""
        self.summary.windows += 1
        # The steps' totals leave the state before it is judged: copies the guard keeps hold zeros.
        totals, state = self.learner.take_totals(state)
        self._step_figures.taken(totals)
        # Train steps are dispatched asynchronously: wait for them here, so the time they take
        # is not counted as the guard's (judging reads results back and would wait for them).
        jax.block_until_ready(state)
        guard_started = time.perf_counter()
        verdict, report = self.guard.judge(state, probe, self.window_sample)
        self.ledger.append(
            "probe",
            window=self.summary.windows,
            learner_step=int(state.step),
            **{"from": good.positions.to_json()},
            to=positions.to_json(),
            examples=trained,
            verdict=verdict.to_json(),
            probe=report,
            prequential={
                **self.prequential.figures().to_json(),
                "judged_window": self.prequential.mean_since(good.prequential),
            },
            ewc_strength=float(state.ewc.strength),
        )
        halt = False
        sustained = verdict.regressed and self._regressions_in_a_row + 1 >= self.guard_config.sustained_windows
        on_sustained = self.guard_config.on_sustained_regression if sustained else None
        # A regression that persists may be accepted as a new baseline, never past the golden constraint.
        new_baseline = on_sustained == "accept" and "golden" not in verdict.regressed_scopes
        if new_baseline:
            self.ledger.append(
                "sustained",
                window=self.summary.windows,
                action="accept",
                regressions_in_a_row=self._regressions_in_a_row + 1,
                scopes=verdict.regressed_scopes,
                fired=verdict.fired(),
            )
        if not verdict.regressed or new_baseline:
            self._last_report = report  # the good model's figures: what progress and status show
            state = self.guard.accept(state, recent, new_baseline=new_baseline)
            excised = self._quarantine_excision()
            good = _Good(
                None,
                probe.copy(),
                positions,
                list(reader.batcher.segment_names),
                good.lineage_examples + trained,
                report,
                verdict,
                topics={**good.topics, **reader.source.topic_identities()},
                codec_state=self.stream.codec.state(positions),
                prequential=self.prequential.snapshot(),
            )
            if excised:
                self._checkpoint(good, quarantined=excised)  # skipped records are accounted for at once
            elif self._checkpoint_due(good):
                self._checkpoint(good)
            self.summary.accepted += 1
            self._regressions_in_a_row = retries = 0
        else:
            self.summary.rollbacks += 1
            self._warn_of_a_streak(verdict)
            policy = "halt" if on_sustained == "halt" else self.guard_config.on_regression
            retry = policy == "retry" and retries < self.guard_config.max_retries
            # Lambda is boosted only to train the same records again (a retry): the records of a
            # quarantined or excised span are never trained, and a boost would only slow the learning
            # of the clean records after them.
            state = self.guard.roll_back(boost=retry)
            probe = good.probe.copy()
            self.prequential.restore(good.prequential)  # the window's records count when trained for good
            self.ledger.append(
                "rollback",
                window=self.summary.windows,
                to_checkpoint=good.number,
                scopes=verdict.regressed_scopes,
                fired=verdict.fired(),
                ewc_strength=float(state.ewc.strength),
                positions=good.positions.to_json(),
            )
            if policy == "halt":
                self._checkpoint(good)  # the last good model is the newest checkpoint
                self.ledger.append("halt", checkpoint=good.number, positions=good.positions.to_json())
                self.summary.halted = True
                halt = True
            elif policy == "quarantine" and (excision := self._excision_of(verdict, trained)) is not None:
                # Train part of the window again: without the span the window checks found damaged, or,
                # when nothing located the damage, its first half alone (the rest is judged after it).
                self._excision = excision
                self.ledger.append(
                    "retrain",
                    window=self.summary.windows,
                    **{"from": good.positions.to_json()},
                    until=excision.end.to_json(),
                    excise=None if excision.split else {"from": excision.start.to_json(), "to": excision.end.to_json()},
                    scopes=verdict.regressed_scopes,
                )
                reader = self.reader = self._reopen(reader, good)
            elif retry:
                retries += 1
                self.summary.retries += 1
                self.ledger.append(
                    "retry", attempt=retries, **{"from": good.positions.to_json()}, to=positions.to_json()
                )
                reader = self.reader = self._reopen(reader, good)
            else:
                self._excision = None  # a window trained without its excised span regressed: all of it goes
                copied = self._quarantine(good.positions, positions, verdict)
                retries = 0
                # The quarantined window is accounted for: the last good model, checkpointed at once
                # at the positions after it, so a restart does not read the quarantined records again.
                good = _Good(
                    None,
                    good.probe,
                    positions,
                    list(reader.batcher.segment_names),
                    good.lineage_examples,
                    good.report,
                    topics={**good.topics, **reader.source.topic_identities()},
                    codec_state=self.stream.codec.state(positions),
                    prequential=good.prequential,
                )
                self._checkpoint(good, quarantined=copied)
        jax.block_until_ready(state)
        self.summary.guard_seconds += time.perf_counter() - guard_started
        return state, good, probe, reader, retries, halt

    def _excision_of(self, verdict: Verdict, trained: int) -> _Excision | None:
        """How to train a regressed window again, or None to quarantine all of it.

        The span the window checks' blocks found damaged, when they found part of the window
        (None when they found all of it); when no block located the damage (the probe, or a
        whole-window test alone), the window's first half alone (a split), so a damaged half
        costs the clean one nothing. A window trained again that regresses may be cut again
        (its new span joined to the old one), up to MAX_RETRAINS times; then all of it goes.
        """
        pending = self._excision
        if (pending is not None and pending.depth >= MAX_RETRAINS) or len(self._trace) < 2:
            return None
        starts = [before for before, _, _ in self._trace]

        def batch_of(row: int) -> tuple[int, Positions, Positions]:
            return self._trace[max(bisect.bisect_right(starts, row) - 1, 0)]

        window = verdict.check("window")
        rows = None if window is None else self.window_sample.damaged_rows(window)
        if rows is None and window is not None and window.resembling is not None:
            # No block test located the damage, but the probe named segments: the rows that look like them.
            rows = self.window_sample.span_of(window.resembling)
            if rows is not None and rows[0] == 0 and rows[1] >= self.window_sample.seen:
                rows = None  # they are everywhere in the window: split it instead
        if rows is None:
            middle = batch_of(trained // 2 - 1)[2]
            cut = _Excision(middle, middle, verdict)
        elif rows[0] == 0 and rows[1] >= self.window_sample.seen:
            return None  # all of the window is damaged
        else:
            cut = _Excision(batch_of(rows[0])[1], batch_of(rows[1] - 1)[2], verdict)
        if pending is None:
            return cut
        if not pending.split and not cut.split:  # one span: from the new one's start to the old one's end
            cut = _Excision(cut.start, pending.end, verdict)
        return replace(cut, depth=pending.depth + 1)

    def _quarantine_excision(self) -> int:
        """Quarantine the span of a pending excision (its window was judged good without it)."""
        excision, self._excision = self._excision, None
        if excision is None or excision.split:
            return 0
        return self._quarantine(excision.start, excision.end, excision.verdict)

    def _finish_excision(self, good: _Good, positions: Positions, segment_names: list) -> _Good:
        """An excision with nothing left to train (its span began the window, or the stream ended):
        quarantine the span and go on after it."""
        excision = self._excision
        copied = self._quarantine_excision()
        if excision is not None and not excision.split and not _reached(positions, excision.end):
            positions = excision.end  # the stream ended inside the span: all of it is accounted for
        good = _Good(
            None,
            good.probe,
            positions,
            segment_names,
            good.lineage_examples,
            good.report,
            topics=good.topics,
            # As the accept path: the statistics at the new positions, the span's records
            # decoded, so a restart from this checkpoint decodes what follows as this run does.
            codec_state=self.stream.codec.state(positions),
            prequential=good.prequential,
        )
        self._checkpoint(good, quarantined=copied)
        return good

    def _warn_of_a_streak(self, verdict) -> None:
        """Say so when windows keep regressing: the guard may be holding off drift, not damage.

        A stream that drifts further per window than `probe.tolerance` lets old segments
        forget is judged regressed window after window, and (quarantine) none of it is
        learned. Only an operator can tell that from a long-broken upstream.
        """
        self._regressions_in_a_row += 1
        streaks, rest = divmod(self._regressions_in_a_row, REGRESSION_STREAK)
        if rest == 0 and streaks & (streaks - 1) == 0:  # at 3, 6, 12, 24, ... windows: loud, not spammy
            log.warning(
                "%d windows in a row regressed (now on %s, against the %s); nothing has been learned "
                "since checkpoint %s. If the stream has changed for good rather than broken, accept it "
                '(probe.on_sustained_regression = "accept"), or raise probe.tolerance, the model\'s '
                "capacity or replay.capacity.",
                self._regressions_in_a_row,
                ", ".join(verdict.regressed_scopes) or "overall",
                "anchor" if verdict.against == "anchor" else "last good model",
                self.good_number,
            )

    def _handle_requests(self, state, good: _Good, probe: ProbeStore, reader: _Reader):
        """Operator requests, between windows: the window in progress was already judged."""
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return state, good, probe, reader
            try:
                if request.kind == "checkpoint":
                    # Any trained examples were just judged: checkpoint the last good model now.
                    self._checkpoint(good)
                    if good is not self._saved:
                        raise RuntimeError("saving the checkpoint failed (see the service's log); it is retried")
                    request.finish({"checkpoint": good.number, "positions": good.positions.to_json()})
                elif request.kind == "rollback":
                    state, good, probe, reader = self._operator_rollback(
                        request.args.get("to"), request.args.get("reason", "operator"), reader
                    )
                    request.finish({"checkpoint": good.number, "positions": good.positions.to_json()})
                elif request.kind in ("pin", "unpin"):
                    number = request.args["checkpoint"]
                    (self.store.pin if request.kind == "pin" else self.store.unpin)(number)
                    request.finish({"checkpoint": number, "pinned": request.kind == "pin"})
                else:
                    raise ValueError(f"unknown request {request.kind!r}")
            except Exception as error:  # noqa: BLE001 - handed back to the requesting thread
                request.finish(error=error)

    def _operator_rollback(self, to: int | None, reason: str, reader: _Reader):
        """Make checkpoint `to` (default: the last good one) current: restore it and read on from its positions.

        All or nothing: the checkpoint is read back (and its digests checked) before the
        head moves, so a corrupt target changes nothing.
        """
        self._collect_save(wait=True)
        number = to if to is not None else self.store.last_good()
        if number is None:
            raise LookupError("there is no good checkpoint to roll back to")
        try:
            restored = self.store.restore(
                number, state_like=self.learner.init(self.seed), reshape=self.learner.relayout
            )
        except CorruptCheckpointError as error:
            raise ValueError(f"{error}; nothing was changed: roll back to another checkpoint") from None
        self.store.set_head(number, reason=reason)
        state, good = self._from_restored(restored)
        self._saved = self._finalized = good
        self._regressions_in_a_row = 0  # the operator chose where history begins
        self._excision = None
        self.guard.mark_good(state, trained=good.lineage_examples > 0)
        self.prequential.restore(good.prequential)
        self._announce(good.number)
        reader = self.reader = self._reopen(reader, good)
        return state, good, good.probe.copy(), reader

    def _announce(self, number: int | None, params=None) -> None:
        """Hand the model checkpointed as `number` (default params: the guard's last good copy) to `on_accepted`."""
        if number is None or self.on_accepted is None:
            return
        if params is None:
            params = self.guard.last_good.params if self.guard.last_good is not None else None
        if params is not None:
            self.on_accepted(AcceptedModel(params, number))

    def _fail_pending_requests(self) -> None:
        while not self._requests.empty():
            self._requests.get_nowait().finish(error=RuntimeError("the training loop stopped"))

    # ---- pieces ----------------------------------------------------------------------------

    def _restore_or_start(self):
        learner = self.learner
        try:
            fresh = learner.init(self.seed)
        except jax.errors.JaxRuntimeError as error:
            if not _out_of_memory(error):
                raise
            raise UsageError(_state_does_not_fit(learner, error)) from None
        skipped: list[str] = []

        def on_skip(number: int, error: CorruptCheckpointError) -> None:
            log.warning("%s; trying the previous good checkpoint", error)
            skipped.append(f"{number}: {error.reason}")

        # A replay buffer saved over another device count or layout is re-dealt to this one's.
        restored = self.store.restore_latest(state_like=fresh, on_skip=on_skip, reshape=learner.relayout)
        if restored is None and self.store.numbers() and not self.start_fresh:
            found = "; ".join(skipped) if skipped else "none is good and not abandoned"
            raise NoUsableCheckpointError(
                f"{self.store.directory} holds checkpoints {_span(self.store.numbers())} but none can be restored "
                f"({found}); see `continuity checkpoints verify --dir {self.store.directory}`, or start a new "
                "model from the stream's start positions with `--start-fresh`"
            )
        if restored is None:
            probe = ProbeStore(
                learner.inputs,
                learner.task.labels,
                per_segment=self.probe_config.per_segment,
                max_segments=self.probe_config.max_segments,
                window_examples=self.probe_config.window_examples,
                seed=self.seed,
            )
            if self.probe_config.golden:
                try:
                    probe.add_golden(*load_golden(self.probe_config.golden))
                except (OSError, ValueError) as error:  # missing, not a .npz, arrays not the model's
                    raise UsageError(f"probe.golden: {error}") from None
            self.ledger.append("start", fresh=True, seed=self.seed, config_digest=self.digest)
            return fresh, _Good(None, probe, Positions(), [], 0)
        state, good = self._from_restored(restored)
        self.summary.restored_from = restored.number
        self.summary.last_checkpoint = restored.number
        return state, good

    def _from_restored(self, restored):
        meta = restored.metadata
        if self.digest is not None and meta.get("config_digest") != self.digest:
            log.warning(
                "checkpoint %s was trained with another config (digest %s, now %s)",
                restored.number,
                meta.get("config_digest"),
                self.digest,
            )
        probe = ProbeStore.from_arrays(
            restored.probe,
            meta["probe_store"],
            self.learner.inputs,
            self.learner.task.labels,
            max_segments=self.probe_config.max_segments,
        )
        positions = Positions.from_json(meta["positions"])
        self.guard.restore_state(meta.get("guard"))
        self.stream.codec.restore(meta.get("codec"))
        self.ledger.append(
            "restore",
            checkpoint=restored.number,
            positions=meta["positions"],
            learner_step=meta["learner_step"],
            config_digest=self.digest,
        )
        good = _Good(
            restored.number,
            probe,
            positions,
            list(meta["segment_names"]),
            meta["lineage_examples"],
            topics=dict(meta.get("topics") or {}),  # absent from checkpoints written before it was kept
            codec_state=meta.get("codec"),
            prequential=meta.get("prequential"),  # absent from checkpoints written before it was kept
        )
        return restored.state, good

    def _open(self, good: _Good) -> _Reader:
        return _Reader(
            self.stream,
            self.learner.process_rows,  # batch_size, or this process's share of it (several processes)
            self.holdout,
            good.positions,
            good.segment_names,
            topics=good.topics,
            on_lost_positions=self._on_lost_positions,
        )

    def _on_lost_positions(self, action: str, lost: tuple[LostPosition, ...]) -> None:
        """The source found held positions gone from the broker (called on the ingest thread)."""
        partitions = [p.to_json() for p in lost]
        self.summary.lost_positions.extend({**p, "action": action} for p in partitions)
        self.ledger.append("lost_positions", action=action, partitions=partitions)

    def _reopen(self, reader: _Reader, good: _Good) -> _Reader:
        """The reader, moved back to `good`'s positions: the same source when it can seek, else a new one."""
        if reader.rewind(good.positions, good.segment_names):
            return reader
        return self._open(good)

    def _dispatch(self, state, stack: list[tuple[TrainBatch, np.ndarray]], segment_names: list):
        """Train the gathered micro-batches in one dispatch (`Learner.train_steps`) and empty `stack`.

        Each micro-batch comes with its rows' segment ids (into `segment_names`): the step's
        per-row outcomes before the update go to the prequential tracker with them, unread.

        The stack is put on the device here, asynchronously, while the device still trains the
        previous one (dispatches return before their computation ends), so the host-to-device
        copy is off the critical path; fewer than K micro-batches are padded with empty ones.
        """
        if not stack:
            return state
        on_device = self.learner.put_stack(self.learner.stack([batch for batch, _ in stack]))
        segments = np.full((self.learner.steps_per_dispatch, self.learner.batch_size), NO_SEGMENT, np.int32)
        segments[: len(stack)] = [ids for _, ids in stack]
        stack.clear()
        state, metrics = self._train_stack(state, on_device)
        self.prequential.record(metrics["row_outcomes"], metrics["row_trained"], segments, segment_names)
        return state

    def _train_stack(self, state, on_device):
        """One dispatch of `Learner.train_steps`, timed. The run's first is waited for: a step
        whose buffers the memory cannot hold fails there in one line, where a later read of
        one of its outputs would wait forever (JAX 0.10). Its shapes never change, so one
        check covers the run (short of memory others take meanwhile)."""
        tick = time.perf_counter()
        state, metrics = self.learner.train_steps(state, on_device)
        if not self._stepped:
            self._stepped = True
            self._ready((state, metrics))
        self._step_seconds.append(time.perf_counter() - tick)
        return state, metrics

    @staticmethod
    def _ready(tree) -> None:
        """Wait for the dispatches that make `tree`. One that failed raises here: a read of one
        of its outputs would wait forever instead (JAX 0.10). A step that ran out of memory is
        one line: at the first dispatch its shapes do not fit; later, others took the memory."""
        try:
            jax.block_until_ready(tree)
        except jax.errors.JaxRuntimeError as error:
            if not _out_of_memory(error):
                raise
            raise UsageError(
                f"the train step cannot allocate its buffers ({_jax_said(error)}): lower learner.batch_size "
                "or learner.steps_per_dispatch, use a smaller model, or free the device's memory"
            ) from None

    def _train_window(self, state, reader: _Reader, probe: ProbeStore, good: _Good):
        """Train until a window's worth of examples, the end of the stream, or stop.

        Micro-batches are gathered into stacks of up to K (`learner.steps_per_dispatch`) and
        each stack is one dispatch. The window sees the same micro-batches as with K = 1 (its
        boundary is checked after each one, and the stack is sent short where it falls), and a
        quiet stream sends what it has, so nothing waits for K.

        While an excision is pending (see `_Excision`), the batches inside its span are read
        but neither trained nor held out, and the window closes at the span's end.
        """
        trained = 0
        stack: list[tuple[TrainBatch, np.ndarray]] = []  # gathered, not yet dispatched, with their segment ids
        # The window's held-out rows, added to the probe at its close (nothing reads it sooner):
        # one add per segment a window rather than a dozen NumPy calls per batch.
        held: list[tuple] = []
        steps_per_dispatch = self.learner.steps_per_dispatch
        positions = good.positions
        ended = False
        excision = self._excision
        self._trace = []  # (rows trained before, positions before, positions after) of each trained batch
        recent: list[tuple] = []  # (x, y) of recent batches: the Fisher's examples when replay is off
        ewc = self.learner.ewc
        # The Fisher's examples when replay is off: the last `fisher_samples` rows trained.
        fisher_rows = ewc.fisher_samples if ewc is not None and self.learner.replay is None else 0
        last_batch = started = time.monotonic()
        judge_idle_s = self.stream.judge_idle_s
        every_s = self.guard_config.every_seconds if self.stream.live else 0
        sample = self.window_sample
        sample.start((self.seed, good.lineage_examples))  # the same records give the same sample
        # The window checks (Guard.judge) take tasks with right/wrong answers over one feature array.
        sampled = self.learner.task.outcome.kind == "correct" and not isinstance(self.learner.inputs, dict)
        while trained < self.guard_config.every_examples:
            if self.stopping() or not self._requests.empty():
                break
            if trained and every_s and time.monotonic() - started >= every_s:
                break
            batch = reader.next()
            if batch is None:
                ended = True
                break
            if batch is IDLE:  # a quiet live stream: wait on, checking for stop, requests and saves due
                state = self._dispatch(state, stack, reader.batcher.segment_names)
                # A save finished meanwhile is taken now, not at the next record: its model served,
                # its positions committed, or its failure retried.
                self._collect_save()
                if trained and judge_idle_s is not None and time.monotonic() - last_batch > judge_idle_s:
                    break
                if not trained and self._checkpoint_due(good):
                    break
                self._maybe_report(state, good)  # a quiet or unreachable stream still reports
                continue
            last_batch = time.monotonic()
            if excision is not None and excision.covers(positions, batch.positions):
                positions = batch.positions  # excised: its records are quarantined once the window is judged
                if _reached(positions, excision.end):
                    sample.cut_short = True
                    break
                continue
            if batch.held_out.any():
                held.append(held_out_rows(batch))
            mask = batch.train_mask
            rows = int(mask.sum())
            if sampled:
                sample.add(batch.x, batch.y, mask, rows)
            stack.append((TrainBatch(batch.x, batch.y, mask), batch.segment))
            if len(stack) == steps_per_dispatch:
                state = self._dispatch(state, stack, reader.batcher.segment_names)
            if rows:
                self._trace.append((trained, positions, batch.positions))
            trained += rows
            self.summary.examples_trained += rows  # counted when gathered: this window dispatches them
            positions = batch.positions
            self._maybe_report(state, good)
            if excision is not None and _reached(positions, excision.end):
                sample.cut_short = True
                break  # the window ends where the excised span did: what follows is the next window's
            if fisher_rows and rows:
                recent.append((feature_rows(batch.x, mask), batch.y[mask]))
                while sum(len(y) for _, y in recent) - len(recent[0][1]) >= fisher_rows:
                    recent.pop(0)
        state = self._dispatch(
            state, stack, reader.batcher.segment_names
        )  # the window's last stack, short where the boundary fell
        if held:
            x, y, ids = join_held_out(held)
            add_held_out(probe, reader.batcher.segment_names, x, y, ids)
        recent_examples = _concatenated(recent) if recent else None
        return state, positions, ended, recent_examples

    def _checkpoint_due(self, good: _Good) -> bool:
        """True when `good` is not checkpointed yet, `checkpoint_every_s` has passed since the last save,
        and a failed save's backoff is over."""
        now = time.monotonic()
        return good is not self._saved and now - self._last_save >= self.checkpoint_every_s and now >= self._retry_at

    def _checkpoint(self, good: _Good, *, quarantined: int = 0) -> None:
        """Checkpoint the last good model (the guard's copy) as `good`, unless it already is.

        `quarantined`: the window before `good.positions` was skipped, not trained.
        """
        self._collect_save(wait=True)  # the previous save's outcome: committed, or failed and to be redone
        if good is self._saved:
            return
        state, parent = self.guard.last_good, self._saved
        if state is None or parent is None:  # run() marks the starting model good (and saved) first
            raise RuntimeError("a checkpoint needs the last good model and its parent")
        report, verdict = good.report, good.verdict
        arrays, probe_meta = good.probe.to_arrays()
        metadata = {
            "status": "good",
            "learner_step": int(state.step),
            "positions": good.positions.to_json(),
            "segment_names": good.segment_names,
            "probe": report,
            "verdict": None
            if verdict is None
            else {
                "p_values": {"overall": verdict.overall.p_value, **{k: r.p_value for k, r in verdict.segments.items()}}
            },
            "quarantined_records": quarantined,
            "probe_store": probe_meta,
            "guard": self.guard.state_json(),  # what the window checks and the golden constraint compare with
            "ewc_strength": float(state.ewc.strength),
            "lineage_examples": good.lineage_examples,
            "topics": good.topics,
            "parent": parent.number,
            "window_from": parent.positions.to_json(),
            "config_digest": self.digest,
        }
        if good.prequential is not None:  # the test-then-train totals a restart goes on from
            metadata["prequential"] = good.prequential
        if good.codec_state is not None:  # running feature statistics: a restart decodes as this run did
            metadata["codec"] = good.codec_state
        try:
            self._letters_written()
            good.number = self.store.save(state, arrays, metadata)
        except CheckpointSaveError as error:
            self._save_failed(error)
            return
        self._saved = self._pending = good
        self._pending_params = state.params
        self._last_save = time.monotonic()
        self.summary.last_checkpoint = good.number
        # parent + from + positions chain the checkpoints: the lineage a restart continues.
        self.ledger.append(
            "accept",
            checkpoint=good.number,
            parent=parent.number,
            learner_step=int(state.step),
            **{"from": parent.positions.to_json()},
            positions=good.positions.to_json(),
            lineage_examples=good.lineage_examples,
            ewc_strength=float(state.ewc.strength),
            accuracy=report.get("accuracy"),
            quarantined=quarantined,
        )

    def _letters_written(self) -> None:
        """A CheckpointSaveError while dead letters or quarantined records are held in memory (their
        file refusing writes: a full disk): the checkpoint would commit positions past records kept
        nowhere else, so it waits and is retried as any failed save is."""
        for sink in (self.stream.dead_letters, self.stream.quarantine):
            unwritten = sink.unwritten()
            if unwritten is not None:
                raise CheckpointSaveError(f"checkpoint not saved: {unwritten}")

    def _collect_save(self, *, wait: bool = False) -> None:
        """Take the pending save's outcome: once finalized, commit its positions; if it failed, plan a retry.

        Without `wait`, a save still being written is left for a later call. Offsets are
        only ever committed for a finalized checkpoint.
        """
        if self._pending is None or (self.store.saving and not wait):
            return
        pending, self._pending = self._pending, None
        try:
            self.store.wait()
        except CheckpointSaveError as error:
            pending.number = None
            if self._saved is pending:  # the lineage goes on from what is on disk
                self._saved = self._finalized
            self._save_failed(error)
            return
        self._finalized = pending
        self._failing_since, self._retry_at, self._retry_wait_s = None, 0.0, self.save_retry_s[0]
        if pending.number is not None:
            self._announce(pending.number, self._pending_params)
        if self.reader is None:  # run() opens the reader before anything is saved
            raise RuntimeError("positions to commit, but no source to commit them to")
        self.reader.source.commit(pending.positions)

    def _save_failed(self, error: CheckpointSaveError) -> None:
        """One line per failure, and a retry after a wait that doubles up to `save_retry_s[1]`."""
        now = time.monotonic()
        self.summary.checkpoint_failures += 1
        if self._failing_since is None:
            self._failing_since = now
        self._retry_at = now + self._retry_wait_s
        log.error(
            "%s; training goes on, retrying in %.3g s (a restart would resume from %s)",
            error,
            self._retry_wait_s,
            self._resume_point(),
        )
        self._retry_wait_s = min(self._retry_wait_s * 2, self.save_retry_s[1])

    def _unsaved_too_long(self) -> bool:
        """True (and `summary.unsaved` set) when saves have failed for longer than `max_unsaved_s` in a row."""
        if not self.max_unsaved_s or self._failing_since is None:
            return False
        failing_s = time.monotonic() - self._failing_since
        if failing_s <= self.max_unsaved_s:
            return False
        self.summary.unsaved = (
            f"checkpoints could not be saved for {failing_s:.0f} s ({self.summary.checkpoint_failures} failures; "
            f"checkpoints.max_unsaved_seconds = {self.max_unsaved_s:g}): stopping; a restart resumes from "
            f"{self._resume_point()}"
        )
        return True

    def _resume_point(self) -> str:
        number = self.good_number
        return "the stream's start positions (no checkpoint yet)" if number is None else f"checkpoint {number}"

    def _quarantine(self, start: Positions, end: Positions, verdict) -> int:
        """Copy the window's raw records to the quarantine sink; training goes on after them."""
        reason = f"quarantined: regression on {', '.join(verdict.regressed_scopes)}"
        copied = copy_range(
            self.stream.open_reader or self.stream.open_source, start, end, self.stream.quarantine, reason
        )
        self.stream.quarantine.flush()
        self.summary.quarantined_records += copied
        self.ledger.append("quarantine", records=copied, reason=reason, **{"from": start.to_json()}, to=end.to_json())
        return copied

    def _maybe_report(self, state, good: _Good) -> None:
        """A Progress snapshot every `progress_every_s` seconds (reading lambda syncs with the device)."""
        on_progress = self.on_progress
        if on_progress is None:
            return
        when, since_examples = self._progress_clock
        seconds = time.monotonic() - when
        if seconds >= self.progress_every_s:
            self._ready(state)  # the snapshot reads from it
            on_progress(self._progress(state, good, since_examples, seconds))
            self._progress_clock = (time.monotonic(), self.summary.examples_trained)

    def _progress(self, state, good: _Good, since_examples: int, seconds: float) -> Progress:
        """The Progress snapshot now; takes the step times gathered since the last one."""
        steps, self._step_seconds = self._step_seconds, []
        return Progress(
            examples_trained=self.summary.examples_trained,
            examples_per_second=(self.summary.examples_trained - since_examples) / max(seconds, 1e-9),
            lineage_examples=good.lineage_examples,
            rollbacks=self.summary.rollbacks,
            dead_letters=self.stream.dead_letters.total,
            quarantined_records=self.summary.quarantined_records,
            probe_accuracy=self._last_report.get("accuracy"),
            probe_segments=self._last_report.get("segments", {}),
            ewc_strength=float(state.ewc.strength),
            checkpoint=self.good_number,
            positions=good.positions,
            step_seconds=steps,
            probe_loss=self._last_report.get("loss"),
            regressions_in_a_row=self._regressions_in_a_row,
            lost_positions=len(self.summary.lost_positions),
            stream_note=None if self.reader is None else self.reader.source.state_note(),
            checkpoint_failures=self.summary.checkpoint_failures,
            nonfinite_rows=self.summary.nonfinite_rows,
            **self._step_figures.snapshot(state.totals),
            prequential=self.prequential.figures(),
        )


def copy_range(
    open_reader: Callable[[Positions], Source],
    start: Positions,
    end: Positions,
    sink: DeadLetterSink,
    reason: str,
    *,
    timeout_s: float = 60.0,
) -> int:
    """Copy the raw records in [start, end) of every partition to `sink`; returns how many.

    A record that `end` only partly covers (a batched record cut mid-way) is copied whole.
    """
    stop_at = {}
    for key, position in end.items():
        first = start[key].offset if key in start else 0
        last = position.offset + (1 if position.skip else 0)
        if last > first:
            stop_at[PartitionKey(*key)] = last
    if not stop_at:
        return 0
    source = open_reader(start)
    copied = 0
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        source.open()
        while stop_at:
            if time.monotonic() > deadline:
                timed_out = True
                break
            runs = source.poll(0.2)
            if not runs and source.finished:
                break  # a finite stream ended inside the range: everything there was copied
            for run in runs:
                key = PartitionKey(run.topic, run.partition)
                if key not in stop_at:
                    continue
                for record in run.records():
                    offset = record.position.offset
                    if offset < stop_at[key]:
                        sink.put(DeadLetter(record, reason))
                        copied += 1
                    if offset >= stop_at[key] - 1:  # the range's last record: done, even on a live topic
                        del stop_at[key]
                        break
    finally:
        source.close()
    if timed_out:
        log.error("quarantine copy timed out after %.0f s; partitions not fully copied: %s", timeout_s, sorted(stop_at))
    return copied


def held_out_rows(batch) -> tuple:
    """A batch's held-out rows: (features, labels, segment ids), copies."""
    rows = np.flatnonzero(batch.held_out)
    return feature_rows(batch.x, rows), batch.y[rows], batch.segment[rows]


def join_held_out(held: list[tuple]) -> tuple:
    """`held_out_rows` of several batches as one (features, labels, segment ids), in order."""
    x, y, ids = _concatenated(held)
    return x, y, ids.astype(np.int32)


def _concatenated(parts: list) -> Any:
    """Trees of host arrays of one structure, joined along their rows, in order."""
    return jax.tree.map(lambda *leaves: np.concatenate(leaves), *parts)


def add_held_out(probe: ProbeStore, segment_names: list, x, y: np.ndarray, ids: np.ndarray) -> None:
    """Held-out rows into the probe: each segment's (ids index `segment_names`; NO_SEGMENT:
    the probe's own windows) in the order they arrived, segments in the order they first
    came. A segment's reservoir sees the same arrivals as when its rows were added batch by
    batch; what can differ is only which segment the probe drops first past its
    `max_segments`, when more than that many are open in one window."""
    _, first = np.unique(ids, return_index=True)
    segments = ids[np.sort(first)]
    for segment_id in segments:
        chosen = np.flatnonzero(ids == segment_id) if len(segments) > 1 else np.arange(len(ids))
        if segment_id == NO_SEGMENT:
            probe.add_unsegmented(feature_rows(x, chosen), y[chosen])
        else:
            probe.add(segment_names[segment_id], feature_rows(x, chosen), y[chosen])


def _out_of_memory(error: jax.errors.JaxRuntimeError) -> bool:
    """A failed allocation: said at once (RESOURCE_EXHAUSTED), or by a computation whose input
    failed to allocate ("INTERNAL: Error dispatching computation: ... Out of memory ...")."""
    return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def _jax_said(error: jax.errors.JaxRuntimeError) -> str:
    """JAX's error in one line, without the "Error dispatching computation: " each computation
    downstream of a failed allocation adds."""
    said = " ".join(str(error).split("\n", 1)[0].split()).rstrip(".")
    return re.sub(r"^(INTERNAL: )?(Error dispatching computation: )+", "", said)


def _state_does_not_fit(learner: Learner, error: jax.errors.JaxRuntimeError) -> str:
    """One line for a first state the device's memory cannot hold: what JAX said, and the part
    that takes most of it: the replay buffer (what replay.capacity decides) or the model's own
    (its parameters, optimizer state and EWC's anchor and Fisher). The config check refuses a
    state that surely cannot fit; this is what slips past it: memory taken by others, a limit
    not known."""
    line = f"cannot allocate the learner's first state ({_jax_said(error)})"
    shapes = learner.state_shapes()
    replay, whole = learner.replay, tree_bytes(shapes)
    held = tree_bytes(shapes.replay) if replay is not None else 0
    if replay is None or 2 * held < whole:
        return (
            f"{line}: the model's part of it (its parameters, their optimizer state, EWC's anchor and "
            f"Fisher) takes {byte_size(whole - held)}: a smaller model"
        )
    return (
        f"{line}: its replay buffer of replay.capacity = {replay.capacity:,} examples takes {byte_size(held)}: "
        "lower replay.capacity"
    )


def _span(numbers: list[int]) -> str:
    """ "1-5" for consecutive numbers, else "1, 3, 7"."""
    if len(numbers) > 2 and numbers[-1] - numbers[0] == len(numbers) - 1:
        return f"{numbers[0]}-{numbers[-1]}"
    return ", ".join(map(str, numbers))


def params_digest(state) -> str:
    """SHA-256 over the parameter bytes: equal digests mean bit-identical models."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state.params):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()
