"""The regression rule: is a candidate model worse than the last good one on the probe?

Both models are evaluated on the same probe examples, so the comparison is paired. For
classification, the paired outcomes are counted as
    b = examples the last good model got right and the candidate got wrong,
    c = examples the candidate got right and the last good model got wrong,
and an exact one-sided McNemar test (McNemar 1947; exact binomial form) asks whether
b is larger than chance allows: p = P(X >= b), X ~ Binomial(b + c, 1/2).

A scope (overall, or one segment) regresses when its accuracy drops by more than
`tolerance` AND the test is significant (`judge`).

The guard tests the tolerance itself instead (`judge_beyond_tolerance`): Tango's score
test for paired proportions (Tango 1998) of H0: the drop is at most `tolerance`, so a
scope whose true drop stays within the tolerance regresses with probability at most the
level, however many examples it holds. `judge`'s composite rule has no such rate at the
tolerance (a true drop just below it passes the cut half the time, and McNemar's test of
no change at all is then nearly always significant).

For regression targets there is no right or wrong, only a per-example loss (squared
error). The paired differences d = candidate loss - good loss go to a one-sided
Wilcoxon signed-rank test (Wilcoxon 1945) of H1: the candidate's losses are larger. It
uses the size of each difference, not just its sign (as a sign test would), so a few
badly broken examples weigh more than many negligible changes; squared errors are far
from normal, which rules out a paired t-test. A scope regresses when its mean loss rises
by more than the relative `tolerance` (candidate mean > good mean * (1 + tolerance)) AND
the test is significant. Examples whose losses are equal carry no evidence and are
dropped; when all are, p = 1.

Either way, because overall and every segment are tested, the significance level is
Bonferroni-corrected over the scopes tested, so that noise alone on many segments does
not trigger rollbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.special import bdtrc, ndtr
from scipy.stats import wilcoxon


def mcnemar_one_sided(good_correct: np.ndarray, candidate_correct: np.ndarray) -> tuple[int, int, float]:
    """(b, c, p) for H1: the candidate is worse. p is 1.0 when the models never disagree."""
    good_correct = np.asarray(good_correct, bool)
    candidate_correct = np.asarray(candidate_correct, bool)
    b = int(np.sum(good_correct & ~candidate_correct))
    c = int(np.sum(candidate_correct & ~good_correct))
    return b, c, _upper_tail(b, b + c)


def _upper_tail(b: int, n: int) -> float:
    """P(X >= b), X ~ Binomial(n, 1/2): the exact one-sided McNemar p-value; 1.0 when n == 0.

    `bdtrc(k, n, p)` is P(X > k) as a plain ufunc: about 1 microsecond, where
    `scipy.stats.binomtest` takes ~0.25 ms, which over tens of scopes per window made
    the test itself most of the guard's judging time.
    """
    return 1.0 if n == 0 else float(bdtrc(b - 1, n, 0.5))


def wilcoxon_one_sided(good_loss: np.ndarray, candidate_loss: np.ndarray) -> tuple[int, int, float]:
    """(worse, better, p) for H1: the candidate's losses are larger (one-sided signed-rank test).

    worse / better count the examples whose loss rose / fell. p is 1.0 when no loss changed.
    """
    differences = np.asarray(candidate_loss, np.float64) - np.asarray(good_loss, np.float64)
    worse, better = int(np.sum(differences > 0)), int(np.sum(differences < 0))
    if worse + better == 0:
        return worse, better, 1.0
    return worse, better, float(wilcoxon(differences, alternative="greater").pvalue)


@dataclass(frozen=True)
class ScopeReport:
    """One scope's paired comparison: the two models' figures, changed examples, p-value, verdict.

    `metric` says what `good` and `candidate` are: "accuracy" (higher is better; McNemar or Tango)
    or "loss", the mean per-example loss (lower is better; Wilcoxon signed-rank).
    """

    name: str
    examples: int
    good: float  # the reference model's accuracy or mean loss on the scope
    candidate: float
    worse: int  # accuracy: b, right before and wrong now; loss: examples whose loss rose
    better: int  # accuracy: c, wrong before and right now; loss: examples whose loss fell
    p_value: float
    regressed: bool
    metric: str = "accuracy"

    @property
    def drop(self) -> float:
        """How much worse the candidate is: accuracy lost, or mean loss gained."""
        return self.candidate - self.good if self.metric == "loss" else self.good - self.candidate

    def to_json(self) -> dict:
        return {
            "examples": self.examples,
            f"good_{self.metric}": round(self.good, 6),
            f"candidate_{self.metric}": round(self.candidate, 6),
            "worse": self.worse,
            "better": self.better,
            "p_value": self.p_value,
            "regressed": self.regressed,
        }


@dataclass(frozen=True)
class Verdict:
    """The guard's decision with every figure behind it.

    `metric` "accuracy": `tolerance` is an absolute accuracy drop. "loss" (regression
    targets): `tolerance` is a relative rise of the mean loss.
    """

    regressed: bool
    overall: ScopeReport
    segments: dict[str, ScopeReport] = field(default_factory=dict)
    alpha: float = 0.01
    tolerance: float = 0.02
    against: str = "last_good"  # which reference model the figures compare with: last_good | anchor
    metric: str = "accuracy"
    # Checks beside the probe's paired tests (the window checks, the golden constraint): each has a
    # `name`, `regressed`, `scopes()`, `fired_json()` and `to_json()`.
    checks: tuple[Any, ...] = ()
    test: str = "mcnemar"  # the paired test behind the scopes: mcnemar, tango (drop beyond the tolerance), wilcoxon

    def check(self, name: str) -> Any:
        """The check called `name` among `checks` ("window", "golden"), or None."""
        return next((check for check in self.checks if check.name == name), None)

    @property
    def regressed_scopes(self) -> list[str]:
        """The probe scopes that regressed, then what the other checks name ("window.<indicator>", "golden")."""
        scopes = [("overall", self.overall)] + list(self.segments.items())
        probe = [name for name, report in scopes if report.regressed]
        return probe + [scope for check in self.checks for scope in check.scopes()]

    def fired(self) -> list[dict]:
        """Every test that fired, with its figures: what the ledger says about why a window regressed."""
        scopes = [("overall", self.overall)] + list(self.segments.items())
        probe = [
            {
                "check": "probe",
                "scope": name,
                "against": self.against,
                "test": self.test,
                f"good_{self.metric}": round(report.good, 6),
                f"candidate_{self.metric}": round(report.candidate, 6),
                "tolerance": self.tolerance,
                "p_value": report.p_value,
            }
            for name, report in scopes
            if report.regressed
        ]
        return probe + [test for check in self.checks for test in check.fired_json()]

    def to_json(self) -> dict:
        metric = {} if self.metric == "accuracy" else {"metric": self.metric}  # classification JSON as before
        checks = {check.name: check.to_json() for check in self.checks}
        return {
            **metric,
            "regressed": self.regressed,
            "regressed_scopes": self.regressed_scopes,
            "fired": self.fired(),
            "against": self.against,
            "test": self.test,
            "alpha": self.alpha,
            "tolerance": self.tolerance,
            "overall": self.overall.to_json(),
            "segments": {name: report.to_json() for name, report in self.segments.items()},
            **checks,
        }


def judge(
    good_correct: np.ndarray,
    candidate_correct: np.ndarray,
    segment_ids: np.ndarray,
    segment_names: list[str],
    *,
    tolerance: float,
    alpha: float,
    min_examples: int = 20,
) -> Verdict:
    """Compare paired correctness overall and per segment; see the module docstring for the rule.

    Segments with fewer than `min_examples` probe examples are reported but not tested
    (too few to tell anything from noise).
    """

    def worse_by_more_than_tolerance(good: float, candidate: float) -> bool:
        return good - candidate > tolerance

    return _judge_scopes(
        np.asarray(good_correct, bool),
        np.asarray(candidate_correct, bool),
        segment_ids,
        segment_names,
        metric="accuracy",
        test=mcnemar_one_sided,
        worse_enough=worse_by_more_than_tolerance,
        tolerance=tolerance,
        alpha=alpha,
        min_examples=min_examples,
    )


def judge_beyond_tolerance(
    good_correct: np.ndarray,
    candidate_correct: np.ndarray,
    segment_ids: np.ndarray,
    segment_names: list[str],
    *,
    tolerance: float,
    alpha: float,
    min_examples: int = 20,
) -> Verdict:
    """Compare paired correctness overall and per segment, testing the drop against `tolerance` itself.

    A scope regresses when Tango's score test (`drop_beyond_one_sided`) rejects "the
    candidate's accuracy is at most `tolerance` below the reference's" at alpha /
    scopes tested. Unlike `judge` (a drop beyond the tolerance AND a significant
    McNemar test of no change at all), the false-alarm rate holds at the tolerance: a
    scope whose true drop is within it regresses with probability at most alpha / scopes.
    """

    def test(good: np.ndarray, candidate: np.ndarray) -> tuple[int, int, float]:
        return drop_beyond_one_sided(good, candidate, tolerance)

    verdict = _judge_scopes(
        np.asarray(good_correct, bool),
        np.asarray(candidate_correct, bool),
        segment_ids,
        segment_names,
        metric="accuracy",
        test=test,
        worse_enough=lambda good, candidate: True,  # the tolerance is inside the test
        tolerance=tolerance,
        alpha=alpha,
        min_examples=min_examples,
    )
    return replace(verdict, test="tango")


def drop_beyond_one_sided(
    good_correct: np.ndarray, candidate_correct: np.ndarray, margin: float
) -> tuple[int, int, float]:
    """(b, c, p) for H1: the candidate's accuracy is more than `margin` below the good model's (paired).

    Tango's score test for a difference of paired proportions (Tango 1998, "Equivalence
    test and confidence interval for the difference in proportions for the paired-sample
    design", Statistics in Medicine 17: 891-908). With b = right before and wrong now,
    c = wrong before and right now, n pairs and the drop theta = p_b - p_c, it tests
    H0: theta <= margin by
        Z = (b - c - n margin) / sqrt(n (2 q + margin (1 - margin))),
    q the maximum-likelihood estimate of p_c under theta = margin, the root of
    2n q^2 + (-b - c + (2n - b + c) margin) q - c margin (1 - margin) = 0;
    p = P(N(0, 1) >= Z). At margin 0 it is McNemar's test in its score form.
    """
    good_correct = np.asarray(good_correct, bool)
    candidate_correct = np.asarray(candidate_correct, bool)
    n = len(good_correct)
    b = int(np.sum(good_correct & ~candidate_correct))
    c = int(np.sum(candidate_correct & ~good_correct))
    if n == 0:
        return b, c, 1.0
    big_b = -b - c + (2 * n - b + c) * margin
    big_c = -c * margin * (1 - margin)
    q = (-big_b + np.sqrt(big_b * big_b - 8 * n * big_c)) / (4 * n)
    variance = n * (2 * q + margin * (1 - margin))
    if variance <= 0:  # no discordant pairs at margin 0: no evidence either way
        return b, c, 1.0
    z = (b - c - n * margin) / np.sqrt(variance)
    return b, c, float(ndtr(-z))


def judge_losses(
    good_loss: np.ndarray,
    candidate_loss: np.ndarray,
    segment_ids: np.ndarray,
    segment_names: list[str],
    *,
    tolerance: float,
    alpha: float,
    min_examples: int = 20,
) -> Verdict:
    """Compare paired per-example losses (regression targets) overall and per segment.

    A scope regresses when candidate mean loss > good mean loss * (1 + tolerance) and the
    one-sided Wilcoxon signed-rank test gives p < alpha / scopes tested (module docstring).
    """

    def worse_by_more_than_tolerance(good: float, candidate: float) -> bool:
        return candidate > good * (1 + tolerance)

    verdict = _judge_scopes(
        np.asarray(good_loss, np.float64),
        np.asarray(candidate_loss, np.float64),
        segment_ids,
        segment_names,
        metric="loss",
        test=wilcoxon_one_sided,
        worse_enough=worse_by_more_than_tolerance,
        tolerance=tolerance,
        alpha=alpha,
        min_examples=min_examples,
    )
    return replace(verdict, test="wilcoxon")


def segment_rows(segment_ids: np.ndarray, segments: int) -> list[np.ndarray]:
    """The row indices of each segment 0..segments-1, in row order: one sort instead of a
    comparison over every row per segment (64 segments x 12,800 probe rows per judgement)."""
    segment_ids = np.asarray(segment_ids)
    counts = np.bincount(segment_ids, minlength=segments)[:segments]
    return np.split(np.argsort(segment_ids, kind="stable"), np.cumsum(counts)[:-1])


def _judge_scopes(
    good: np.ndarray,
    candidate: np.ndarray,
    segment_ids,
    segment_names: list[str],
    *,
    metric: str,
    test: Callable[[np.ndarray, np.ndarray], tuple[int, int, float]],
    worse_enough: Callable[[float, float], bool],
    tolerance: float,
    alpha: float,
    min_examples: int,
) -> Verdict:
    """The rule both metrics share: per scope, a paired `test` and a tolerance; Bonferroni over scopes."""
    rows_of = segment_rows(segment_ids, len(segment_names))
    testable = [len(rows) >= min_examples for rows in rows_of]
    tests = 1 + sum(testable)
    level = alpha / tests

    def scope(name: str, rows: np.ndarray, tested: bool) -> ScopeReport:
        g, c = good[rows], candidate[rows]
        worse, better, p = test(g, c)
        good_figure = float(g.mean()) if len(g) else float("nan")
        candidate_figure = float(c.mean()) if len(c) else float("nan")
        regressed = tested and worse_enough(good_figure, candidate_figure) and p < level
        return ScopeReport(name, len(g), good_figure, candidate_figure, worse, better, p, bool(regressed), metric)

    everything = np.arange(len(good))
    overall = scope("overall", everything, len(good) >= min_examples)
    segments = {name: scope(name, rows_of[i], testable[i]) for i, name in enumerate(segment_names)}
    regressed = overall.regressed or any(r.regressed for r in segments.values())
    return Verdict(regressed, overall, segments, alpha, tolerance, metric=metric)
