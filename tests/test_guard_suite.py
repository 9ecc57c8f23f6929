"""The guard lets clean drift through and stops every kind of damage (reduced streams of `bench guard`)."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest

from continuity.benchmarks.guard import DIGITS_GUARD, GUARD_PROBE, run_scenario_through_loop
from continuity.benchmarks.guard_suite import _Learners, caught, final_accuracy, suite_scenario
from continuity.checkpoints import CheckpointStore
from continuity.stream.damage import DAMAGE_KINDS, damage_scenario
from continuity.stream.scenarios import make_scenario

pytestmark = pytest.mark.slow  # whole streams through the training loop

# Reduced streams: each clean stream of the suite, short enough for CI (the full ones: BENCHMARKS.md).
CLEAN_STREAMS = {
    "permuted-digits": {"segments": 10},
    "rotated-digits": {"segments": 20, "keep": 6},  # the first six of twenty: 0 to 45 degrees, 9 at a time
    "split-digits": {},
    "stationary-digits": {"segments": 3},
    "sea-abrupt": {"examples": 6_000},
    "sea-gradual": {"examples": 6_000},
    "agrawal-abrupt": {"examples": 6_000},
    "agrawal-gradual": {"examples": 6_000},
}


@pytest.fixture(scope="module")
def learners():
    return _Learners()  # one compiled learner per input shape, shared by every run here


def _clean(name: str):
    options = dict(CLEAN_STREAMS[name])
    keep = options.pop("keep", None)
    scenario = suite_scenario(name, seed=0, **options)
    return scenario if keep is None else replace(scenario, segments=scenario.segments[:keep])


@pytest.mark.parametrize("name", list(CLEAN_STREAMS))
def test_a_clean_stream_loses_at_most_one_percent_to_quarantine(name, learners):
    scenario = _clean(name)
    run = run_scenario_through_loop(scenario, guard=DIGITS_GUARD, seed=0, learner=learners(scenario))
    records = sum(len(s.train_y) for s in scenario.segments)
    assert run["quarantined_records"] <= 0.01 * records, run["judged"]
    assert run["windows"] > 3


@pytest.fixture(scope="module")
def damage_runs(learners, tmp_path_factory):
    """permuted-digits, 6 segments (the benchmark's): clean, and each damage kind replacing the last
    segment with the inputs of the first."""
    clean = make_scenario("permuted-digits", segments=6, seed=0)
    runs = {"clean": (clean, run_scenario_through_loop(clean, guard=DIGITS_GUARD, seed=0, learner=learners(clean)))}
    for kind in DAMAGE_KINDS:
        damaged = damage_scenario(clean, kind, at=5, source=0)
        directory = tmp_path_factory.mktemp(kind)
        run = run_scenario_through_loop(
            damaged, guard=DIGITS_GUARD, seed=0, learner=learners(damaged), directory=directory
        )
        runs[kind] = (damaged, run | {"ledger": CheckpointStore(directory, create=False).ledger.read()})
    return runs


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_each_kind_of_damage_is_rolled_back_quarantined_and_costs_the_clean_segments_nothing(kind, damage_runs):
    clean_scenario, clean = damage_runs["clean"]
    scenario, run = damage_runs[kind]
    damaged = np.flatnonzero(scenario.segments[5].damaged) + sum(len(s.train_y) for s in scenario.segments[:5])
    assert run["rollbacks"] >= 1 and run["quarantined_records"] > 0
    records = sum(len(s.train_y) for s in scenario.segments)
    outcome = caught(run, damaged, records)
    assert outcome["windows"] is not None and outcome["windows"] <= 2  # caught within two windows
    scored = [0, 1, 2, 3, 4]  # the segments clean in both streams
    assert final_accuracy(run, scenario, scored) >= 0.98 * final_accuracy(clean, clean_scenario, scored)


def test_the_ledger_explains_every_rollback_with_the_tests_and_figures_that_fired(damage_runs):
    explained = 0
    for kind in DAMAGE_KINDS:
        ledger = damage_runs[kind][1]["ledger"]
        probes = {e["window"]: e for e in ledger if e["event"] == "probe"}
        for rollback in (e for e in ledger if e["event"] == "rollback"):
            assert rollback["scopes"] and rollback["fired"], rollback
            assert rollback["fired"] == probes[rollback["window"]]["verdict"]["fired"]
            for test in rollback["fired"]:
                assert test["test"] in ("binomial", "tango", "constraint")
                assert test["check"] == "probe" or test["check"].startswith("window.") or test["check"] == "golden"
                if test["test"] == "binomial":  # a window check: its figures, the null and the level
                    assert {"block", "rows", "count", "rate", "reference", "null_rate", "p_value", "level"} <= set(test)
                    assert test["p_value"] < test["level"] and test["rate"] > test["null_rate"]
                elif test["test"] == "tango":  # a probe scope: both models' accuracy, the tolerance
                    assert {"scope", "against", "good_accuracy", "candidate_accuracy", "tolerance", "p_value"} <= set(
                        test
                    )
                    assert test["good_accuracy"] - test["candidate_accuracy"] > test["tolerance"]
            explained += 1
    assert explained >= len(DAMAGE_KINDS)


def test_a_damaged_burst_inside_a_window_is_cut_out_and_the_rest_of_the_window_is_trained(learners):
    clean = make_scenario("permuted-digits", segments=4, seed=0)
    damaged = damage_scenario(clean, "constant", at=2, placement="burst", burst_examples=400)
    run = run_scenario_through_loop(damaged, guard=DIGITS_GUARD, seed=0, learner=learners(damaged))
    offsets = np.flatnonzero(np.concatenate([s.damaged for s in damaged.segments if s.damaged is not None]))
    offsets += sum(len(s.train_y) for s in damaged.segments[:2])
    records = sum(len(s.train_y) for s in damaged.segments)
    quarantined = np.zeros(records, bool)
    for start, end in run["quarantined_spans"]:
        quarantined[start:end] = True
    # Nearly all of the burst goes (an edge thinner than an eighth of a window's sample may stay) ...
    assert caught(run, offsets, records)["leaked"] <= 0.1 * len(offsets)
    assert quarantined[offsets].mean() >= 0.9
    # ... and far less clean data with it than the window it fell in (~1,100 records).
    assert quarantined.sum() - quarantined[offsets].sum() < 200


@pytest.mark.parametrize("on_sustained", ["quarantine", "accept"])
def test_a_golden_segment_never_regresses_past_its_tolerance_whatever_the_stream_does(on_sustained, tmp_path, learners):
    # The golden file holds segment 0's held-out digits; the stream drifts through new permutations and
    # then relabels segment 0's inputs systematically: both pull the golden accuracy down.
    clean = make_scenario("permuted-digits", segments=5, seed=1)
    golden = tmp_path / "golden.npz"
    np.savez(golden, x=clean.segments[0].test_x, y=clean.segments[0].test_y)
    scenario = damage_scenario(clean, "permute", at=4, source=0)
    guard = replace(DIGITS_GUARD, on_sustained_regression=on_sustained, sustained_windows=2)
    probe = replace(GUARD_PROBE, golden=str(golden))
    run_scenario_through_loop(
        scenario, guard=guard, probe=probe, seed=0, learner=learners(scenario), directory=tmp_path / "store"
    )
    ledger = CheckpointStore(tmp_path / "store", create=False).ledger.read()
    best, fired = None, 0
    for event in (e for e in ledger if e["event"] == "probe"):
        constraint = event["verdict"]["golden"]
        fired += constraint["regressed"]
        accepted = not event["verdict"]["regressed"] or any(
            s["event"] == "sustained" and s["window"] == event["window"] for s in ledger
        )
        if accepted:
            if best is not None:
                assert constraint["candidate_accuracy"] >= best - guard.golden_tolerance
            best = max(best or 0.0, constraint["candidate_accuracy"])
    assert fired >= 1  # the stream did push against it


def _flipped_stream():
    """Every label of the second segment wrong, on inputs the model knows: each window regresses."""
    return make_scenario("permuted-digits", segments=2, seed=0, poison=1, poison_mode="flip")


def test_a_sustained_regression_can_be_accepted_as_a_new_baseline_and_the_ledger_says_so(tmp_path, learners):
    scenario = _flipped_stream()
    guard = replace(DIGITS_GUARD, every_examples=200, on_sustained_regression="accept", sustained_windows=3)
    run = run_scenario_through_loop(scenario, guard=guard, seed=0, learner=learners(scenario), directory=tmp_path)
    ledger = CheckpointStore(tmp_path, create=False).ledger.read()
    sustained = [e for e in ledger if e["event"] == "sustained"]
    assert sustained and all(e["action"] == "accept" and e["regressions_in_a_row"] == 3 for e in sustained)
    assert all(e["fired"] for e in sustained)
    probes = {e["window"]: e for e in ledger if e["event"] == "probe"}
    assert all(probes[e["window"]]["verdict"]["regressed"] for e in sustained)  # accepted although regressed
    assert run["rollbacks"] >= 2 * len(sustained)


def test_a_sustained_regression_can_halt_the_service(tmp_path, learners):
    scenario = _flipped_stream()
    guard = replace(DIGITS_GUARD, every_examples=200, on_sustained_regression="halt", sustained_windows=2)
    run = run_scenario_through_loop(scenario, guard=guard, seed=0, learner=learners(scenario), directory=tmp_path)
    ledger = CheckpointStore(tmp_path, create=False).ledger.read()
    events = [e["event"] for e in ledger]
    assert events.count("halt") == 1 and ledger[-1]["event"] == "stop" and ledger[-1]["halted"]
    # It halts on the second regression in a row, and judges nothing after it.
    probes = [e for e in ledger if e["event"] == "probe"]
    assert probes[-1]["verdict"]["regressed"] and probes[-2]["verdict"]["regressed"]
    assert "probe" not in events[events.index("halt") :] and run["rollbacks"] >= 2


def test_by_default_a_sustained_regression_keeps_quarantining_and_warns(caplog, learners):
    scenario = _flipped_stream()
    guard = replace(DIGITS_GUARD, every_examples=200)
    with caplog.at_level(logging.WARNING, logger="continuity.loop"):
        run = run_scenario_through_loop(scenario, guard=guard, seed=0, learner=learners(scenario))
    assert guard.on_sustained_regression == "quarantine"
    assert run["rollbacks"] >= guard.sustained_windows
    assert any("windows in a row regressed" in r.getMessage() for r in caplog.records)


def test_what_the_window_checks_compare_with_is_saved_in_checkpoints_and_restored(tmp_path, learners):
    from continuity.loop import StreamInput, TrainingLoop
    from continuity.stream import FeatureSpec, MemoryDeadLetters, ScenarioSource, make_codec

    scenario = make_scenario("permuted-digits", segments=3, seed=0)
    learner = learners(scenario)
    run_scenario_through_loop(scenario, guard=DIGITS_GUARD, seed=0, learner=learner, directory=tmp_path)
    store = CheckpointStore(tmp_path, create=False)
    saved = store.info(store.last_good()).metadata["guard"]
    assert len(saved["window_history"]["windows"]) >= 3 and saved["window_history"]["classes"] == list(range(10))
    codec = make_codec("binary", FeatureSpec(scenario.example_shape, "float32", scenario.num_classes))
    stream = StreamInput(
        open_source=lambda positions: ScenarioSource(scenario, codec, start=positions),
        codec=codec,
        dead_letters=MemoryDeadLetters(),
        quarantine=MemoryDeadLetters(),
    )
    restarted = TrainingLoop(stream, learner, store, probe=GUARD_PROBE, guard=DIGITS_GUARD, seed=0)
    restarted.run()  # restores the checkpoint; the stream has nothing left after it
    store.close()
    assert restarted.summary.restored_from == store.last_good()
    assert restarted.guard.state_json() == saved
