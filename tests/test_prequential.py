"""Prequential (test-then-train) figures: each trained row scored by the model before its update."""

import functools
import sys
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from conftest import record_scenario

from continuity.benchmarks.guard import DIGITS_GUARD, run_scenario_through_loop
from continuity.guard import GuardConfig
from continuity.learner import Batch, Classification, Learner, mlp
from continuity.learner.tasks import CORRECT, LOSS
from continuity.prequential import PrequentialTracker
from continuity.stream import NO_SEGMENT
from continuity.stream.scenarios import make_scenario

sys.path.insert(0, str(Path(__file__).parent))
from loop_worker import build_loop


def test_only_trained_rows_count_overall_per_segment_and_in_the_window():
    tracker = PrequentialTracker(CORRECT, window=4)
    outcomes = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], np.float32)
    trained = np.array([[True, True, True, False], [True, True, False, False]])
    segments = np.array([[0, 1, NO_SEGMENT, 0], [1, 1, 0, 0]])
    tracker.record(outcomes, trained, segments, ["a", "b"])
    figures = tracker.figures()
    assert figures.examples == 5  # the untrained rows (a held-out or padding row, say) are not counted
    assert figures.total == pytest.approx(4 / 5)
    assert figures.window == pytest.approx(3 / 4)  # the last four trained rows, in step order: 0, 1, 1, 1
    assert figures.segments == {"a": 1.0, "b": pytest.approx(2 / 3)}  # the unsegmented row counts overall only
    assert figures.figure == "accuracy"


def test_a_restored_snapshot_reads_the_same_and_drops_what_was_recorded_after_it():
    tracker = PrequentialTracker(LOSS, window=2, max_segments=1)
    tracker.record(np.array([0.5, 1.5]), np.array([True, True]), np.array([0, 1]), ["old", "new"])
    snapshot = tracker.snapshot()
    before = tracker.figures()
    assert before.segments == {"new": 1.5}  # beyond max_segments the oldest goes
    assert before.figure == "loss" and before.total == pytest.approx(1.0)
    tracker.record(np.array([9.0]), np.array([True]), np.array([1]), ["old", "new"])  # a window later rolled back
    tracker.restore(snapshot)
    assert tracker.figures() == before
    assert tracker.mean_since(snapshot) is None
    again = PrequentialTracker(LOSS, window=2, max_segments=1)
    again.restore(snapshot)  # a restart: the checkpoint's metadata
    assert again.figures() == before
    again.record(np.array([3.0]), np.array([True]), np.array([1]), ["old", "new"])
    assert again.mean_since(snapshot) == pytest.approx(3.0)
    assert again.figures().window == pytest.approx((1.5 + 3.0) / 2)


def test_the_train_step_scores_each_trained_row_with_the_params_before_its_update():
    learner = Learner(
        functools.partial(mlp, hidden=(16,)),
        optax.sgd(0.5),
        Classification(3),
        inputs=jax.ShapeDtypeStruct((4,), np.float32),
        batch_size=8,
    )
    rng = np.random.default_rng(0)
    state = learner.init(0)
    for _ in range(3):
        x = rng.normal(size=(8, 4)).astype(np.float32)
        y = rng.integers(0, 3, 8).astype(np.int32)
        mask = np.array([True] * 6 + [False] * 2)
        before = learner.evaluate(state.params, x[mask], y[mask])
        state, metrics = learner.train_step(state, Batch(x, y, mask))
        np.testing.assert_array_equal(np.asarray(metrics["row_trained"]), mask)
        np.testing.assert_array_equal(np.asarray(metrics["row_outcomes"])[mask], before.outcome.astype(np.float32))
        assert not np.asarray(metrics["row_outcomes"])[~mask].any()


@pytest.mark.slow
def test_the_loop_reports_what_a_direct_computation_finds_overall_and_per_segment(tmp_path):
    """The loop's batches, trained again from the same start step by step, each predicted by the
    params before its step: the same figures as the loop's tracker. Held-out rows never count."""
    recording = record_scenario(tmp_path / "stream.parquet", segments=3, seed=4)
    loop = build_loop(recording, tmp_path / "run", guard=GuardConfig(every_examples=10**9))
    stacks, segment_ids = [], []
    train_steps, record = loop.learner.train_steps, loop.prequential.record

    def capturing_train_steps(state, stack):
        stacks.append(jax.device_get(stack))
        return train_steps(state, stack)

    def capturing_record(outcomes, trained, segments, names):
        segment_ids.append((segments, list(names)))
        record(outcomes, trained, segments, names)

    loop.learner.train_steps = capturing_train_steps
    loop.prequential.record = capturing_record
    summary = loop.run()
    loop.store.close()
    assert summary.windows == summary.accepted == 1  # nothing rolled back: every trained row counts

    learner = loop.learner
    state = learner.init(0)
    correct: list[bool] = []
    per_segment: dict[str, list[bool]] = {}
    for stack, (segments, names) in zip(stacks, segment_ids, strict=True):
        for k in range(learner.steps_per_dispatch):
            mask = np.asarray(stack.mask[k], bool)
            if not mask.any():
                continue
            right = learner.evaluate(state.params, stack.x[k][mask], stack.y[k][mask]).outcome
            correct += right.tolist()
            for segment_id, one in zip(segments[k][mask], right):
                per_segment.setdefault(names[segment_id], []).append(bool(one))
        state, _ = train_steps(state, stack)

    held_out = loop.reader.batcher.examples_held_out
    assert held_out > 0 and summary.prequential_examples == len(correct) == summary.examples_trained
    assert summary.prequential_accuracy == pytest.approx(np.mean(correct), abs=1e-12)
    assert summary.prequential_segments.keys() == per_segment.keys() and len(per_segment) == 3
    for name, outcomes in per_segment.items():
        assert summary.prequential_segments[name] == pytest.approx(np.mean(outcomes), abs=1e-12)
    judged = [e for e in loop.store.ledger.read() if e["event"] == "probe"]
    assert judged[-1]["prequential"]["total"] == summary.prequential_accuracy
    assert judged[-1]["prequential"]["judged_window"] == summary.prequential_accuracy  # the only window


@pytest.mark.slow
def test_rolled_back_windows_are_not_counted_so_each_record_of_the_lineage_counts_once():
    # A broken labeler over the last segment: its windows regress, roll back and are quarantined
    # (or trained again without their damaged span); only the surviving lineage is counted.
    poisoned = make_scenario("permuted-digits", segments=2, seed=0, poison=1, poison_mode="flip")
    run = run_scenario_through_loop(poisoned, guard=replace(DIGITS_GUARD, every_examples=200), seed=0)
    assert run["rollbacks"] >= 1
    assert run["prequential_examples"] == run["lineage_examples"] < run["examples_trained"]
    assert 0 < run["prequential_accuracy"] < 1
