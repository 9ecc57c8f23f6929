"""The regression rule: is a candidate model worse than the last good one on the probe?

Both models are evaluated on the same probe examples, so the comparison is paired. For
classification, the paired outcomes are counted as
    b = examples the last good model got right and the candidate got wrong,
    c = examples the candidate got right and the last good model got wrong,
and an exact one-sided McNemar test (McNemar 1947; exact binomial form) asks whether
b is larger than chance allows: p = P(X >= b), X ~ Binomial(b + c, 1/2).

A scope (overall, or one segment) regresses when its accuracy drops by more than
`tolerance` AND the test is significant. Because overall and every segment are tested,
the significance level is Bonferroni-corrected over the scopes tested, so that noise
alone on many segments does not trigger rollbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import bdtrc


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


@dataclass(frozen=True)
class ScopeReport:
    """One scope's paired comparison: accuracies, discordant counts, p-value, verdict."""

    name: str
    examples: int
    good_accuracy: float
    candidate_accuracy: float
    worse: int  # b: right before, wrong now
    better: int  # c: wrong before, right now
    p_value: float
    regressed: bool

    @property
    def drop(self) -> float:
        return self.good_accuracy - self.candidate_accuracy

    def to_json(self) -> dict:
        return {
            "examples": self.examples,
            "good_accuracy": round(self.good_accuracy, 6),
            "candidate_accuracy": round(self.candidate_accuracy, 6),
            "worse": self.worse,
            "better": self.better,
            "p_value": self.p_value,
            "regressed": self.regressed,
        }


@dataclass(frozen=True)
class Verdict:
    """The guard's decision with every figure behind it."""

    regressed: bool
    overall: ScopeReport
    segments: dict[str, ScopeReport] = field(default_factory=dict)
    alpha: float = 0.01
    tolerance: float = 0.02
    against: str = "last_good"  # which reference model the figures compare with: last_good | anchor

    @property
    def regressed_scopes(self) -> list[str]:
        scopes = [("overall", self.overall)] + list(self.segments.items())
        return [name for name, report in scopes if report.regressed]

    def to_json(self) -> dict:
        return {
            "regressed": self.regressed,
            "regressed_scopes": self.regressed_scopes,
            "against": self.against,
            "alpha": self.alpha,
            "tolerance": self.tolerance,
            "overall": self.overall.to_json(),
            "segments": {name: report.to_json() for name, report in self.segments.items()},
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
    good_correct = np.asarray(good_correct, bool)
    candidate_correct = np.asarray(candidate_correct, bool)
    segment_ids = np.asarray(segment_ids)
    testable = [i for i in range(len(segment_names)) if np.sum(segment_ids == i) >= min_examples]
    tests = 1 + len(testable)
    level = alpha / tests

    def scope(name: str, rows: np.ndarray, tested: bool) -> ScopeReport:
        g, c = good_correct[rows], candidate_correct[rows]
        worse, better, p = mcnemar_one_sided(g, c)
        good_acc = float(g.mean()) if len(g) else float("nan")
        cand_acc = float(c.mean()) if len(c) else float("nan")
        regressed = tested and (good_acc - cand_acc) > tolerance and p < level
        return ScopeReport(name, int(len(g)), good_acc, cand_acc, worse, better, p, bool(regressed))

    everything = np.ones(len(good_correct), bool)
    overall = scope("overall", everything, len(good_correct) >= min_examples)
    segments = {
        name: scope(name, segment_ids == i, i in testable) for i, name in enumerate(segment_names)
    }
    regressed = overall.regressed or any(r.regressed for r in segments.values())
    return Verdict(regressed, overall, segments, alpha, tolerance)
