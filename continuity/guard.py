"""The guard: keeps the last good model on the device and judges every candidate against it.

The rule, the one false-alarm rate it keeps, and why (BENCHMARKS.md, "Guard", measures it):

- The probe (continuity.regression.judge_beyond_tolerance): per scope (overall, each
  segment), against the last good model and the anchor, Tango's score test of "the
  candidate lost at most `tolerance` of the scope's accuracy", at alpha / 2 over the
  scopes (Bonferroni). The old rule (a drop beyond the tolerance AND McNemar's test of no
  change) had no false-alarm rate at the tolerance: a clean segment forgetting 0.2-0.26
  in a window, as 60 permuted-digits segments do, was rolled back whenever McNemar found
  any change (18% of that stream quarantined). Tested at the tolerance, such drops pass,
  and a broken labeler's (0.44-0.85 on the segment whose inputs it reuses) does not.
- The golden segment (probe.golden) is a hard constraint (`GoldenConstraint`): never more
  than `golden_tolerance` below the best accuracy an accepted model reached on it.
- The window checks (continuity.detectors): five per-row indicators over a sample of the
  window's trained rows, each tested by an exact binomial test at its accepted-window
  median + `window_tolerance`, on the whole sample and its halves, quarters and eighths,
  at alpha / 2 over the 75 tests. They see damage in the data before its effect on the
  probe is significant, and where in the window it lies.

A window whose probe scopes lose at most the tolerance and whose rows stay within the
window tolerance of accepted windows' regresses with probability at most alpha.

Accept -> the candidate becomes the last good model: EWC is anchored at it with a Fisher
refreshed from replay samples (F <- gamma F + F_new) and lambda decays toward its floor;
its window figures join the window checks' history. Regress -> the state goes back to the
last good copy (a device-to-device copy, no disk read); lambda is boosted only when the
window is retried (held harder on the same records).

What a judgement costs: the candidate is evaluated on the whole probe, but the last good
and the anchor models only on probe examples they have not seen yet. Their per-example
results are cached by the probe's serial numbers; an accepted candidate's results become
the last good model's, and the last good model's become the anchor's, as the models move.
The window checks evaluate the last good model twice and the candidate once on the sample
(512 rows by default), a few percent of a judgement.

Threading: NOT thread-safe; the service loop owns it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from continuity.config import GuardConfig  # [probe]: declared with the config
from continuity.detectors import (
    WindowHistory,
    WindowSample,
    WindowVerdict,
    check_window,
    resembling_rows,
)
from continuity.learner import Evaluation, Learner, LearnerState
from continuity.learner import ewc as ewc_lib
from continuity.probe import GOLDEN_SEGMENT, ProbeStore
from continuity.regression import Verdict, judge_beyond_tolerance, judge_losses, segment_rows

# How two models' per-example outcomes are paired, by the task's outcome kind (Task.outcome):
# the judging rule, and which GuardConfig field is its tolerance.
PAIRED_TESTS = {"correct": (judge_beyond_tolerance, "tolerance"), "loss": (judge_losses, "loss_tolerance")}


@jax.jit
def device_copy(state: LearnerState) -> LearnerState:
    """A copy in fresh device buffers, safe to keep while the original is donated to train_step.

    One jitted dispatch (an explicit copy, which jit does not forward to its input):
    copying leaf by leaf costs a dispatch per leaf.
    """
    return jax.tree.map(jnp.copy, state)


class _Results:
    """A model's per-example results on the probe, by the probe rows' serial numbers."""

    def __init__(self, serials: np.ndarray, evaluation: Evaluation):
        order = np.argsort(serials, kind="stable")
        self.serials, self.evaluation = serials[order], _rows(evaluation, order)

    def lookup(self, serials: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, index into the cached rows) for each of `serials`."""
        at = np.minimum(np.searchsorted(self.serials, serials), max(len(self.serials) - 1, 0))
        found = (self.serials[at] == serials) if len(self.serials) else np.zeros(len(serials), bool)
        return found, at


class Guard:
    """Judges candidates against the last good model and applies the reaction to the state."""

    def __init__(self, learner: Learner, config: GuardConfig):
        self.learner = learner
        self.config = config
        self.last_good: LearnerState | None = None
        self._trained = True  # whether the last good model has learned anything (see mark_good)
        self.anchor: dict | None = None  # params of an older good model
        self._accepted_since_anchor = 0
        self._good_results: _Results | None = None  # cached per-example results of last_good
        self._anchor_results: _Results | None = None  # ... and of the anchor
        self._judged: tuple[LearnerState, _Results] | None = None  # the last candidate judged
        self.window_history = WindowHistory()  # accepted windows' figures: the window checks' reference
        self._window_verdict: WindowVerdict | None = None  # the last candidate's window checks
        self.golden_best: float | None = None  # the best golden accuracy of an accepted model
        self._golden: GoldenConstraint | None = None  # the last candidate's golden constraint

    def state_json(self) -> dict:
        """What the guard learned from accepted windows, for the checkpoint of the last good model."""
        return {"window_history": self.window_history.to_json(), "golden_best": self.golden_best}

    def restore_state(self, data: dict | None) -> None:
        """Take back what `state_json` saved (None or {}: a checkpoint from before it was saved: start afresh)."""
        data = data or {}
        self.window_history = WindowHistory()
        self.window_history.restore(data.get("window_history") or {})
        self.golden_best = data.get("golden_best")

    def mark_good(self, state: LearnerState, *, reset_anchor: bool = True, trained: bool = True) -> None:
        """`state` is the last good model. `trained` False: a fresh model, which knows nothing yet,
        so its probe figures (chance) are no reference: the first window after it is not held to them."""
        self.last_good = device_copy(state)
        self._trained = trained
        if reset_anchor:  # a fresh start or an operator rollback: history begins here
            self.anchor = device_copy(state.params) if self.config.anchor_windows else None
            self._accepted_since_anchor = 0
            self._good_results = self._anchor_results = None

    def _good(self) -> LearnerState:
        """The last good state: judging and accepting start from one, so mark_good() comes first."""
        if self.last_good is None:
            raise RuntimeError("Guard has no last good model: call mark_good() with the starting state first")
        return self.last_good

    def judge(
        self, candidate: LearnerState, probe: ProbeStore, window: WindowSample | None = None
    ) -> tuple[Verdict, dict]:
        """The verdict on `candidate`, and the probe report.

        The two models' per-example outcomes are paired as the task's outcome says
        (`PAIRED_TESTS`): right/wrong by Tango's test beyond the absolute `tolerance`, losses
        by Wilcoxon signed-rank with the relative `loss_tolerance`. The report holds the
        task's figure (the mean outcome, "accuracy" or "loss") overall and per segment:
        {"examples", figure, "segments": {name: figure}}.

        Judged against the last good model and, when kept, the older anchor; a regression
        against either is a regression (the last good model's figures are reported first).
        With `window` (the rows the candidate trained on, sampled), the window checks run
        too (continuity.detectors), and a damaged window is a regression as well.
        """
        x, y, ids = probe.examples()
        serials = probe.serials()
        names = probe.segments
        config = self.config
        outcome = self.learner.task.outcome
        rule, tolerance = PAIRED_TESTS[outcome.kind]
        candidate_eval = self.learner.evaluate(candidate.params, x, y)
        self._judged = (candidate, _Results(serials, candidate_eval))
        # The window checks compare rows as flat vectors: a task with right/wrong answers, one feature array.
        window_checks = (
            window is not None
            and config.window_sample > 0
            and candidate_eval.correct is not None
            and isinstance(x, np.ndarray)
        )
        probe_alpha = config.alpha / 2 if window_checks else config.alpha  # the window checks test at the rest

        def compare(reference_eval: Evaluation) -> Verdict:
            verdict = rule(
                reference_eval.outcome,
                candidate_eval.outcome,
                ids,
                names,
                tolerance=getattr(config, tolerance),
                alpha=probe_alpha,
                min_examples=config.min_examples,
            )
            return _golden_apart(verdict)  # the golden segment has its own, stricter constraint

        good_eval, self._good_results = self._evaluate_cached(self._good().params, self._good_results, x, y, serials)
        verdict = compare(good_eval)
        if not self._trained:  # measured: a fresh model right on 57% of a new class pair's first probe rows by luck
            verdict = _not_counted(verdict)
        elif not verdict.regressed and self.anchor is not None:  # the anchor is the fresh model too, untrained
            anchor_eval, self._anchor_results = self._evaluate_cached(self.anchor, self._anchor_results, x, y, serials)
            against_anchor = compare(anchor_eval)
            if against_anchor.regressed:
                verdict = replace(against_anchor, against="anchor")
        rows_of = segment_rows(ids, len(names))
        checks: list = []
        self._window_verdict = self._check_window(candidate, window) if window_checks and window is not None else None
        if self._window_verdict is not None:
            if window is not None:  # which sampled rows look like the segments that regressed, if any did
                regressed = [rows_of[names.index(s)] for s in verdict.regressed_scopes if s in names]
                resembling = resembling_rows(window.rows()[0], [x[rows] for rows in regressed if len(rows)])
                self._window_verdict = replace(self._window_verdict, resembling=resembling)
            checks.append(self._window_verdict)
        self._golden = self._check_golden(names, rows_of, candidate_eval)
        if self._golden is not None:
            checks.append(self._golden)
        verdict = replace(
            verdict, regressed=verdict.regressed or any(c.regressed for c in checks), checks=tuple(checks)
        )
        if not self.config.enabled:
            verdict = replace(verdict, regressed=False)
        per_example = candidate_eval.outcome
        report = {
            "examples": len(y),
            outcome.figure: _mean(per_example),
            "segments": {name: _mean(per_example[rows]) for name, rows in zip(names, rows_of)},
        }
        return verdict, report

    def _check_window(self, candidate: LearnerState, window: WindowSample) -> WindowVerdict:
        """The window checks on the sampled rows: the last good model's predictions and confidence,
        and whether the candidate learned each row."""
        x, y = window.rows()
        history, settings = self.window_history, self.config.window_checks
        if not len(y):
            return check_window(x, y, y, np.zeros(0), np.zeros(0, bool), history, settings)
        good = self.learner.evaluate(self._good().params, x, y)
        # A model's loss on its own prediction is -log of its probability for it: its confidence.
        confidence = np.exp(-self.learner.evaluate(self._good().params, x, good.predicted).loss)
        learned = self.learner.evaluate(candidate.params, x, y).correct
        if learned is None:  # classification only: judge() runs the window checks for it alone
            raise RuntimeError("the window checks need a classification task")
        if window.cut_short:  # a window the guard itself ended early (a retrain): judged on its own first half
            settings = replace(settings, horizon=max(1, min(settings.horizon, window.seen // 2)))
        return check_window(
            x, y, good.predicted, confidence, learned, history, settings, arrival=window.arrivals(), trained=window.seen
        )

    def _check_golden(self, names: list[str], rows_of: list[np.ndarray], candidate_eval: Evaluation):
        """The golden constraint, when the probe has a golden segment (classification)."""
        if GOLDEN_SEGMENT not in names or candidate_eval.correct is None:
            return None
        rows = rows_of[names.index(GOLDEN_SEGMENT)]
        if not len(rows):
            return None
        accuracy = float(candidate_eval.correct[rows].mean())
        return GoldenConstraint(len(rows), accuracy, self.golden_best, self.config.golden_tolerance)

    def _evaluate_cached(self, params, cached: _Results | None, x, y, serials) -> tuple[Evaluation, _Results]:
        """`params`' results on the probe rows, evaluating only the rows `cached` lacks."""
        if cached is None:
            evaluation = self.learner.evaluate(params, x, y)
            return evaluation, _Results(serials, evaluation)
        found, at = cached.lookup(serials)
        missing = np.flatnonzero(~found)
        fresh = self.learner.evaluate(params, jax.tree.map(lambda a: a[missing], x), y[missing])
        evaluation = _rows(cached.evaluation, at)  # copies (fancy indexing): the rows not found are overwritten
        for merged, new in zip(evaluation, fresh):
            merged[missing] = new
        return evaluation, _Results(serials, evaluation)

    def accept(
        self,
        candidate: LearnerState,
        recent: tuple | None = None,
        *,
        new_baseline: bool = False,
    ) -> LearnerState:
        """Consolidate EWC at the candidate and decay lambda; it becomes the last good model.

        The Fisher comes from replay samples, or from `recent` training examples when
        replay is off. `new_baseline`: a regression accepted because it persisted
        (`probe.on_sustained_regression = "accept"`): the anchor and the window checks'
        history start again from this window. Consumes `candidate`.
        """
        learner = self.learner
        ewc_config = learner.ewc
        state = candidate
        if ewc_config is not None:
            if learner.replay is not None:
                state = learner.consolidate(state)
            elif recent is not None and len(recent[1]):
                state = learner.consolidate(state, *recent)
            state = state.replace(
                ewc=ewc_lib.decay_strength(state.ewc, decay=ewc_config.decay, floor=ewc_config.strength_min)
            )
        if new_baseline:
            self.window_history = WindowHistory()
        if self._window_verdict is not None:
            self.window_history.add(self._window_verdict.figures)
            self._window_verdict = None
        if self._golden is not None:
            self.golden_best = max(self._golden.candidate, self._golden.best or 0.0)
            self._golden = None
        self._accepted_since_anchor += 1
        if self.anchor is not None and self._accepted_since_anchor >= self.config.anchor_windows:
            # The anchor moves up to the previous good model: it always trails by 1..K windows.
            self.anchor, self._anchor_results = self._good().params, self._good_results
            self._accepted_since_anchor = 1
        # Consolidation leaves the params as they were judged: their results carry over.
        judged, self._judged = self._judged, None
        self._good_results = judged[1] if judged is not None and judged[0] is candidate else None
        # A fresh model is no anchor either: the first accepted one is.
        self.mark_good(state, reset_anchor=new_baseline or not self._trained)
        return state

    def roll_back(self, *, boost: bool = True) -> LearnerState:
        """A fresh copy of the last good state; with `boost`, lambda boosted (the window is retried: hold harder)."""
        ewc_config = self.learner.ewc
        state = device_copy(self._good())
        if ewc_config is not None and boost:
            state = state.replace(
                ewc=ewc_lib.boost_strength(state.ewc, boost=ewc_config.boost, ceiling=ewc_config.strength_max)
            )
            # The boost carries over: the kept copy is the one a second rollback starts from.
            self.last_good = device_copy(state)
        return state


@dataclass(frozen=True)
class GoldenConstraint:
    """The golden segment as a hard constraint: never more than `tolerance` below the best accepted accuracy.

    The golden file is the operator's fixed specification, not a sample of the stream, so
    its accuracy is compared as it is, without a test, and no drift tolerance applies.
    """

    examples: int
    candidate: float
    best: float | None  # None: no accepted model has been measured on it yet
    tolerance: float
    name = "golden"  # its key in the verdict's JSON

    @property
    def regressed(self) -> bool:
        return self.best is not None and self.candidate < self.best - self.tolerance

    def scopes(self) -> list[str]:
        return [GOLDEN_SEGMENT] if self.regressed else []

    def fired_json(self) -> list[dict]:
        return [self.to_json() | {"check": "golden", "test": "constraint"}] if self.regressed else []

    def to_json(self) -> dict:
        return {
            "examples": self.examples,
            "candidate_accuracy": round(self.candidate, 6),
            "best_accuracy": None if self.best is None else round(self.best, 6),
            "tolerance": self.tolerance,
            "regressed": self.regressed,
        }


def _not_counted(verdict: Verdict) -> Verdict:
    """`verdict` with its scopes' figures reported and none of them counted as a regression."""
    overall = replace(verdict.overall, regressed=False)
    segments = {name: replace(report, regressed=False) for name, report in verdict.segments.items()}
    return replace(verdict, regressed=False, overall=overall, segments=segments)


def _golden_apart(verdict: Verdict) -> Verdict:
    """`verdict` with the golden segment's paired test reported but not counted: GoldenConstraint judges it."""
    report = verdict.segments.get(GOLDEN_SEGMENT)
    if report is None or not report.regressed:
        return verdict
    segments = dict(verdict.segments)
    segments[GOLDEN_SEGMENT] = replace(report, regressed=False)
    regressed = verdict.overall.regressed or any(r.regressed for r in segments.values())
    return replace(verdict, regressed=regressed, segments=segments)


def _rows(evaluation: Evaluation, index: np.ndarray) -> Evaluation:
    """The results of the rows `index` selects, as copies."""
    return Evaluation(*(field[index] for field in evaluation))


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None
