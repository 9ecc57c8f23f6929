"""The training loop that `serve` and `replay` share: ingest -> train -> guard -> checkpoint -> commit.

One run:
1. Restore what a restart should restore (the rollback head, else the newest good
   checkpoint): learner state, probe store, stream positions, segment names. Or start
   fresh.
2. Read batches from the stream at those positions. Held-out rows go to the probe;
   the rest are trained, one jitted step per batch.
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

Judging and checkpointing are decoupled on purpose: every window is judged (and EWC
consolidated), which is what decides the model, while checkpoints, which only decide
how much a crash re-trains, are written at most every `checkpoint_every_s`. The state
never depends on when saves happened, so determinism and exactly-once hold for any
interval: a checkpoint always sits on a window boundary of the surviving lineage.

Exactly-once training effect: positions are saved inside each checkpoint and the
source is re-opened at them on restart, so in the surviving lineage every record is
trained once. The ledger records each accepted or quarantined window with its
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
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import jax
import numpy as np

from continuity.checkpoints import CheckpointStore
from continuity.detectors import WindowSample
from continuity.guard import Guard, GuardConfig
from continuity.learner import Batch as TrainBatch
from continuity.learner import Learner
from continuity.probe import ProbeConfig, ProbeStore, load_golden
from continuity.regression import Verdict
from continuity.stream import (
    NO_SEGMENT,
    Batcher,
    Codec,
    DeadLetter,
    DeadLetterSink,
    Holdout,
    Ingest,
    PartitionKey,
    Positions,
    Source,
)
from continuity.stream.ingest import IDLE, BatchStream

log = logging.getLogger(__name__)

REGRESSION_STREAK = 3  # windows regressed in a row before the first warning
MAX_RETRAINS = 3  # times a regressed window is cut and trained again before all of it is quarantined

SCHEMA_VERSION = 1


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
    halted: bool = False
    stopped: bool = False
    restored_from: int | None = None
    last_checkpoint: int | None = None
    positions: dict = field(default_factory=dict)
    probe_accuracy: float | None = None
    probe_loss: float | None = None  # regression tasks: the probe's mean loss, in place of accuracy
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
    probe_loss: float | None = None  # regression tasks: probe mean loss; probe_segments then hold losses
    regressions_in_a_row: int = 0  # windows judged regressed since the last accepted one


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
    """A short stable digest of the configs that shape training, saved in every checkpoint."""
    text = json.dumps([asdict(c) for c in configs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Reader:
    """A source opened at given positions, with its ingest thread and batcher."""

    def __init__(
        self, stream: StreamInput, batch_size: int, holdout: Holdout, positions: Positions, segment_names: list
    ):
        self.stream, self.batch_size, self.holdout = stream, batch_size, holdout
        self.source = stream.open_source(positions)
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
    ):
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
        self.guard = Guard(learner, guard)
        self.window_sample = WindowSample(max(guard.window_sample, 1))  # the rows the window checks test
        self.holdout = Holdout(probe.holdout_fraction, salt=seed)
        self.digest = config_digest(learner.config, probe, guard)
        self.ledger = store.ledger
        self.summary = RunSummary()
        self._last_report: dict = {}
        self._step_seconds: list[float] = []
        self._requests: queue.Queue[_Request] = queue.Queue()
        self.ready = threading.Event()  # set once restored and reading
        self.reader: _Reader | None = None
        self._saved: _Good | None = None  # the good model last checkpointed (or restored): lineage parent
        self._last_save = time.monotonic()
        self._uncommitted: Positions | None = None  # positions of a save not yet known to be finalized
        self._regressions_in_a_row = 0  # windows judged regressed since the last accepted one
        self._excision: _Excision | None = None  # a window to train again without its damaged span
        self._trace: list[tuple[int, Positions, Positions]] = []  # the window's trained batches (see _train_window)

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
        self._saved = good
        probe = good.probe.copy()
        self.guard.mark_good(state, trained=good.lineage_examples > 0)
        reader = self.reader = self._open(good)
        self.ready.set()
        retries = 0
        self._progress_clock = (time.monotonic(), 0)  # (when, examples trained) of the last report
        try:
            while True:
                window_start_examples = self.summary.examples_trained
                state, positions, ended, recent = self._train_window(state, reader, probe, good)
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
                self._commit_finalized()
                self._maybe_report(state, good)
                if (ended and self._excision is None) or self.stopping():
                    break
            self._checkpoint(good)  # the last good model, if accepted since the last checkpoint
        finally:
            self.store.wait()  # the last save is finalized (or its error raised) before anything is committed
            self._commit_finalized()
            reader.close()
            self._fail_pending_requests()
        self.summary.stopped = self._stop()
        self.summary.dead_letters = self.stream.dead_letters.total
        self.summary.skipped_updates = int(state.skipped_updates)
        self.summary.positions = {f"{k.topic}/{k.partition}": v.offset for k, v in good.positions.items()}
        self.summary.probe_accuracy = self._last_report.get("accuracy")
        self.summary.probe_loss = self._last_report.get("loss")
        self.summary.ewc_strength = float(state.ewc.strength)
        self.summary.wall_seconds = time.perf_counter() - started
        self.ledger.append(
            "stop",
            **{k: v for k, v in self.summary.to_json().items() if k != "positions"},
            positions=good.positions.to_json(),
        )
        self.final_state = state
        return self.summary

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
                    None, good.probe, positions, list(reader.batcher.segment_names), good.lineage_examples, good.report
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
        good = _Good(None, good.probe, positions, segment_names, good.lineage_examples, good.report)
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
                    request.finish({"checkpoint": good.number, "positions": good.positions.to_json()})
                elif request.kind == "rollback":
                    state, good, probe, reader = self._operator_rollback(
                        request.args.get("to"), request.args.get("reason", "operator"), reader
                    )
                    request.finish({"checkpoint": good.number, "positions": good.positions.to_json()})
                else:
                    raise ValueError(f"unknown request {request.kind!r}")
            except Exception as error:  # noqa: BLE001 - handed back to the requesting thread
                request.finish(error=error)

    def _operator_rollback(self, to: int | None, reason: str, reader: _Reader):
        """Make checkpoint `to` (default: the last good one) current: restore it and read on from its positions."""
        number = to if to is not None else self.store.last_good()
        if number is None:
            raise LookupError("there is no good checkpoint to roll back to")
        self.store.wait()
        self.store.set_head(number, reason=reason)
        restored = self.store.restore(number, state_like=self.learner.init(self.seed))
        state, good = self._from_restored(restored)
        self._saved = good
        self._uncommitted = None  # newer than the checkpoint rolled back to: committing it would skip records
        self._regressions_in_a_row = 0  # the operator chose where history begins
        self._excision = None
        self.guard.mark_good(state, trained=good.lineage_examples > 0)
        reader = self.reader = self._reopen(reader, good)
        return state, good, good.probe.copy(), reader

    def _fail_pending_requests(self) -> None:
        while not self._requests.empty():
            self._requests.get_nowait().finish(error=RuntimeError("the training loop stopped"))

    # ---- pieces ----------------------------------------------------------------------------

    def _restore_or_start(self):
        learner = self.learner
        fresh = learner.init(self.seed)
        restored = self.store.restore_latest(state_like=fresh)
        if restored is None:
            probe = ProbeStore(
                learner.example_shape,
                per_segment=self.probe_config.per_segment,
                max_segments=self.probe_config.max_segments,
                window_examples=self.probe_config.window_examples,
                seed=self.seed,
                label_dtype=learner.label_dtype,
            )
            if self.probe_config.golden:
                probe.add_golden(*load_golden(self.probe_config.golden))
            self.ledger.append("start", fresh=True, seed=self.seed, config_digest=self.digest)
            return fresh, _Good(None, probe, Positions(), [], 0)
        state, good = self._from_restored(restored)
        self.summary.restored_from = restored.number
        self.summary.last_checkpoint = restored.number
        return state, good

    def _from_restored(self, restored):
        meta = restored.metadata
        if meta.get("config_digest") != self.digest:
            log.warning(
                "checkpoint %s was trained with another config (digest %s, now %s)",
                restored.number,
                meta.get("config_digest"),
                self.digest,
            )
        probe = ProbeStore.from_arrays(
            restored.probe,
            meta["probe_store"],
            self.learner.example_shape,
            max_segments=self.probe_config.max_segments,
            label_dtype=self.learner.label_dtype,
        )
        positions = Positions.from_json(meta["positions"])
        self.guard.restore_state(meta.get("guard"))
        self.ledger.append(
            "restore",
            checkpoint=restored.number,
            positions=meta["positions"],
            learner_step=meta["learner_step"],
            config_digest=self.digest,
        )
        good = _Good(restored.number, probe, positions, list(meta["segment_names"]), meta["lineage_examples"])
        return restored.state, good

    def _open(self, good: _Good) -> _Reader:
        return _Reader(self.stream, self.learner.config.batch_size, self.holdout, good.positions, good.segment_names)

    def _reopen(self, reader: _Reader, good: _Good) -> _Reader:
        """The reader, moved back to `good`'s positions: the same source when it can seek, else a new one."""
        if reader.rewind(good.positions, good.segment_names):
            return reader
        return self._open(good)

    def _train_window(self, state, reader: _Reader, probe: ProbeStore, good: _Good):
        """Train until a window's worth of examples, the end of the stream, or stop.

        While an excision is pending (see `_Excision`), the batches inside its span are read
        but neither trained nor held out, and the window closes at the span's end.
        """
        trained = 0
        positions = good.positions
        ended = False
        excision = self._excision
        self._trace = []  # (rows trained before, positions before, positions after) of each trained batch
        recent: list[tuple[np.ndarray, np.ndarray]] = []
        fisher_rows = self.learner.config.ewc.fisher_samples
        last_batch = started = time.monotonic()
        judge_idle_s = self.stream.judge_idle_s
        every_s = self.guard_config.every_seconds if self.stream.live else 0
        sample = self.window_sample
        sample.start((self.seed, good.lineage_examples))  # the same records give the same sample
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
                if trained and judge_idle_s is not None and time.monotonic() - last_batch > judge_idle_s:
                    break
                if not trained and self._checkpoint_due(good):
                    break
                continue
            last_batch = time.monotonic()
            if excision is not None and excision.covers(positions, batch.positions):
                positions = batch.positions  # excised: its records are quarantined once the window is judged
                if _reached(positions, excision.end):
                    sample.cut_short = True
                    break
                continue
            if batch.held_out.any():
                self._hold_out(probe, reader.batcher.segment_names, batch)
            mask = batch.train_mask
            rows = int(mask.sum())
            sample.add(batch.x, batch.y, mask, rows)
            tick = time.perf_counter()
            state, _ = self.learner.train_step(state, TrainBatch(batch.x, batch.y, mask))
            self._step_seconds.append(time.perf_counter() - tick)
            if rows:
                self._trace.append((trained, positions, batch.positions))
            trained += rows
            self.summary.examples_trained += rows
            positions = batch.positions
            self._maybe_report(state, good)
            if excision is not None and _reached(positions, excision.end):
                sample.cut_short = True
                break  # the window ends where the excised span did: what follows is the next window's
            if self.learner.replay is None and rows:
                recent.append((batch.x[mask], batch.y[mask]))
                while sum(len(y) for _, y in recent) - len(recent[0][1]) >= fisher_rows:
                    recent.pop(0)
        recent_examples = (
            (np.concatenate([x for x, _ in recent]), np.concatenate([y for _, y in recent])) if recent else None
        )
        return state, positions, ended, recent_examples

    @staticmethod
    def _hold_out(probe: ProbeStore, segment_names: list, batch) -> None:
        rows = np.flatnonzero(batch.held_out)
        ids = batch.segment[rows]
        for segment_id in np.unique(ids):
            chosen = rows[ids == segment_id]
            if segment_id == NO_SEGMENT:
                probe.add_unsegmented(batch.x[chosen], batch.y[chosen])
            else:
                probe.add(segment_names[segment_id], batch.x[chosen], batch.y[chosen])

    def _checkpoint_due(self, good: _Good) -> bool:
        """True when `good` is not checkpointed yet and `checkpoint_every_s` has passed since the last save."""
        return good is not self._saved and time.monotonic() - self._last_save >= self.checkpoint_every_s

    def _checkpoint(self, good: _Good, *, quarantined: int = 0) -> None:
        """Checkpoint the last good model (the guard's copy) as `good`, unless it already is.

        `quarantined`: the window before `good.positions` was skipped, not trained.
        """
        if good is self._saved:
            return
        self._commit_finalized(wait=True)  # the previous save's positions, before its slot is reused
        state, parent = self.guard.last_good, self._saved
        if state is None or parent is None:  # run() marks the starting model good (and saved) first
            raise RuntimeError("a checkpoint needs the last good model and its parent")
        report, verdict = good.report, good.verdict
        arrays, probe_meta = good.probe.to_arrays()
        metadata = {
            "status": "good",
            "schema": SCHEMA_VERSION,
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
            "parent": parent.number,
            "window_from": parent.positions.to_json(),
            "config_digest": self.digest,
        }
        good.number = self.store.save(state, arrays, metadata)
        self._saved, self._uncommitted, self._last_save = good, good.positions, time.monotonic()
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

    def _commit_finalized(self, *, wait: bool = False) -> None:
        """Commit the newest checkpoint's positions to the source once its save is finalized.

        Without `wait`, a save still being written is left for a later call.
        """
        if self._uncommitted is None or (self.store.saving and not wait):
            return
        self.store.wait()  # raises the save's error instead of committing past a lost checkpoint
        if self.reader is None:  # run() opens the reader before anything is saved
            raise RuntimeError("positions to commit, but no source to commit them to")
        self.reader.source.commit(self._uncommitted)
        self._uncommitted = None

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


def params_digest(state) -> str:
    """SHA-256 over the parameter bytes: equal digests mean bit-identical models."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state.params):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()
