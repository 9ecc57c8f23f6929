"""`make chaos`, reduced: SIGKILLs, a corrupt checkpoint and a broker outage against `serve`, then the lineage check."""

from __future__ import annotations

import numpy as np
import pytest

from continuity.benchmarks.chaos import ChaosPlan, lineage_violations, run_chaos


@pytest.mark.slow  # serve restarted four times, a replay, an outage
def test_serve_killed_three_times_through_a_corrupt_checkpoint_and_an_outage_ends_bit_identical(tmp_path):
    # No consumer group: each restart skips the group join (the full `make chaos` has one). No
    # anchor: the guard's anchor model is not in checkpoints, so where the kills land decides
    # whether a restart changes a later verdict (ChaosPlan.anchor_windows; BENCHMARKS.md).
    plan = ChaosPlan(kills=3, segments=3, poison=2, outage_s=5.0, group="", anchor_windows=0)
    report = run_chaos(plan, tmp_path, say=lambda _: None)
    assert report.ok and report.checked, report.summary()
    assert report.kills == 3 and report.restarts == 3
    assert report.corruption_detected and report.unready_in_outage and report.outage_s >= 5.0
    assert report.digest == report.reference_digest and report.digest is not None
    assert 0 < report.split < report.records and report.windows >= 6 and report.quarantined_windows >= 1


def _accept(checkpoint: int, start: int, end: int, lineage: int, quarantined: int = 0) -> dict:
    def at(offset: int) -> list[dict]:
        return [{"topic": "chaos", "partition": 0, "offset": offset}] if offset else []

    return {
        "event": "accept",
        "checkpoint": checkpoint,
        "parent": checkpoint - 1 if checkpoint > 1 else None,
        "from": at(start),
        "positions": at(end),
        "lineage_examples": lineage,
        "quarantined": quarantined,
    }


# Ten records, one example each; offsets 3 and 7 are held out for the probe.
TRAINED = np.array([True, True, True, False, True, True, True, False, True, True])


def test_the_lineage_check_passes_a_chain_that_trains_each_record_once_or_quarantines_it():
    chain = [_accept(1, 0, 4, 3), _accept(2, 4, 8, 3, quarantined=4), _accept(3, 8, 10, 5)]
    assert lineage_violations(chain, TRAINED, [(4, 8)]) == []
    # A damaged span cut out of a window (offsets 5 and 6), the rest of it trained (4, 8, 9; 7 held out).
    excised = [_accept(1, 0, 4, 3), _accept(2, 4, 10, 6, quarantined=2)]
    assert lineage_violations(excised, TRAINED, [(5, 7)]) == []
    assert lineage_violations(excised, TRAINED) != []  # without the span, two records went untrained


@pytest.mark.parametrize(
    "chain, violation",
    [
        ([_accept(1, 0, 4, 3), _accept(2, 5, 10, 7)], "a gap between offsets 4 and 5"),
        ([_accept(1, 0, 4, 3), _accept(2, 3, 10, 8)], "an overlap between offsets 4 and 3"),
        ([_accept(1, 0, 4, 3), _accept(2, 4, 8, 6)], "the chain spans 0..8, the stream 0..10"),
        ([_accept(1, 0, 4, 4), _accept(2, 4, 10, 8)], "window 0..4 (checkpoint 1) trained 4 examples; 3 once each"),
    ],
)
def test_the_lineage_check_names_a_gap_an_overlap_a_short_chain_and_a_record_trained_twice(chain, violation):
    assert any(violation in found for found in lineage_violations(chain, TRAINED))


def test_the_lineage_check_names_a_quarantined_window_that_was_trained():
    chain = [_accept(1, 0, 4, 3), _accept(2, 4, 10, 9, quarantined=6)]
    found = lineage_violations(chain, TRAINED, [(4, 10)])
    assert any("window 4..10 (checkpoint 2) trained 6" in violation for violation in found)
