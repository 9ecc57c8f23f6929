"""The guard: keeps the last good model on the device and judges every candidate against it.

Accept -> the candidate becomes the last good model: EWC is anchored at it with a Fisher
refreshed from replay samples (F <- gamma F + F_new) and lambda decays toward its floor.
Regress -> the state goes back to the last good copy (a device-to-device copy, no disk
read), with lambda boosted so the retried window is held harder.

What a judgement costs: the candidate is evaluated on the whole probe, but the last good
and the anchor models only on probe examples they have not seen yet. Their per-example
results are cached by the probe's serial numbers; an accepted candidate's results become
the last good model's, and the last good model's become the anchor's, as the models move.

Threading: NOT thread-safe; the service loop owns it.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from continuity.config import GuardConfig  # [probe]: declared with the config
from continuity.learner import Evaluation, Learner, LearnerState
from continuity.learner import ewc as ewc_lib
from continuity.probe import ProbeStore
from continuity.regression import Verdict, judge, judge_losses, segment_rows

# How two models' per-example outcomes are paired, by the task's outcome kind (Task.outcome):
# the judging rule, and which GuardConfig field is its tolerance.
PAIRED_TESTS = {"correct": (judge, "tolerance"), "loss": (judge_losses, "loss_tolerance")}


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
        self.anchor: dict | None = None  # params of an older good model
        self._accepted_since_anchor = 0
        self._good_results: _Results | None = None  # cached per-example results of last_good
        self._anchor_results: _Results | None = None  # ... and of the anchor
        self._judged: tuple[LearnerState, _Results] | None = None  # the last candidate judged

    def mark_good(self, state: LearnerState, *, reset_anchor: bool = True) -> None:
        self.last_good = device_copy(state)
        if reset_anchor:  # a fresh start or an operator rollback: history begins here
            self.anchor = device_copy(state.params) if self.config.anchor_windows else None
            self._accepted_since_anchor = 0
            self._good_results = self._anchor_results = None

    def _good(self) -> LearnerState:
        """The last good state: judging and accepting start from one, so mark_good() comes first."""
        if self.last_good is None:
            raise RuntimeError("Guard has no last good model: call mark_good() with the starting state first")
        return self.last_good

    def judge(self, candidate: LearnerState, probe: ProbeStore) -> tuple[Verdict, dict]:
        """The verdict on `candidate`, and the probe report.

        The two models' per-example outcomes are paired as the task's outcome says
        (`PAIRED_TESTS`): right/wrong by McNemar with the absolute `tolerance`, losses by
        Wilcoxon signed-rank with the relative `loss_tolerance`. The report holds the
        task's figure (the mean outcome, "accuracy" or "loss") overall and per segment:
        {"examples", figure, "segments": {name: figure}}.

        Judged against the last good model and, when kept, the older anchor; a regression
        against either is a regression (the last good model's figures are reported first).
        """
        x, y, ids = probe.examples()
        serials = probe.serials()
        names = probe.segments
        config = self.config
        outcome = self.learner.task.outcome
        rule, tolerance = PAIRED_TESTS[outcome.kind]
        candidate_eval = self.learner.evaluate(candidate.params, x, y)
        self._judged = (candidate, _Results(serials, candidate_eval))

        def compare(reference_eval: Evaluation) -> Verdict:
            return rule(
                reference_eval.outcome,
                candidate_eval.outcome,
                ids,
                names,
                tolerance=getattr(config, tolerance),
                alpha=config.alpha,
                min_examples=config.min_examples,
            )

        good_eval, self._good_results = self._evaluate_cached(self._good().params, self._good_results, x, y, serials)
        verdict = compare(good_eval)
        if not verdict.regressed and self.anchor is not None:
            anchor_eval, self._anchor_results = self._evaluate_cached(self.anchor, self._anchor_results, x, y, serials)
            against_anchor = compare(anchor_eval)
            if against_anchor.regressed:
                verdict = replace(against_anchor, against="anchor")
        if not self.config.enabled:
            verdict = replace(verdict, regressed=False)
        per_example = candidate_eval.outcome
        rows_of = segment_rows(ids, len(names))
        report = {
            "examples": len(y),
            outcome.figure: _mean(per_example),
            "segments": {name: _mean(per_example[rows]) for name, rows in zip(names, rows_of)},
        }
        return verdict, report

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

    def accept(self, candidate: LearnerState, recent: tuple | None = None) -> LearnerState:
        """Consolidate EWC at the candidate and decay lambda; it becomes the last good model.

        The Fisher comes from replay samples, or from `recent` training examples when
        replay is off. Consumes `candidate`.
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
        self._accepted_since_anchor += 1
        if self.anchor is not None and self._accepted_since_anchor >= self.config.anchor_windows:
            # The anchor moves up to the previous good model: it always trails by 1..K windows.
            self.anchor, self._anchor_results = self._good().params, self._good_results
            self._accepted_since_anchor = 1
        # Consolidation leaves the params as they were judged: their results carry over.
        judged, self._judged = self._judged, None
        self._good_results = judged[1] if judged is not None and judged[0] is candidate else None
        self.mark_good(state, reset_anchor=False)
        return state

    def roll_back(self) -> LearnerState:
        """A fresh copy of the last good state with lambda boosted (the stream hurt it: hold harder)."""
        ewc_config = self.learner.ewc
        state = device_copy(self.last_good)
        if ewc_config is not None:
            state = state.replace(
                ewc=ewc_lib.boost_strength(state.ewc, boost=ewc_config.boost, ceiling=ewc_config.strength_max)
            )
            # The boost carries over: the kept copy is the one a second rollback starts from.
            self.last_good = device_copy(state)
        return state


def _rows(evaluation: Evaluation, index: np.ndarray) -> Evaluation:
    """The results of the rows `index` selects, as copies."""
    return Evaluation(*(field[index] for field in evaluation))


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None
