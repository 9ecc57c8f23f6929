"""The guard's cached judgements: reused results must equal a fresh evaluation, row for row."""

import jax
import jax.numpy as jnp
import numpy as np

from continuity.factory import learner_for
from continuity.guard import Guard, GuardConfig
from continuity.learner import Batch, LearnerConfig, ModelConfig
from continuity.probe import ProbeStore

SHAPE, CLASSES = (6,), 3
INPUTS, LABELS = jax.ShapeDtypeStruct(SHAPE, jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)


def _stream(rng, n):
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)


def _train(learner, state, rng, steps=5):
    for _ in range(steps):
        x, y = _stream(rng, 16)
        state, _ = learner.train_step(state, Batch(x, y, np.ones(16, bool)))
    return state


def test_cached_results_match_a_fresh_evaluation_and_only_new_rows_are_evaluated():
    rng = np.random.default_rng(0)
    learner = learner_for(
        LearnerConfig(model=ModelConfig(hidden=(16,)), learning_rate=1e-2, batch_size=16), SHAPE, CLASSES
    )
    guard = Guard(learner, GuardConfig(anchor_windows=2))
    probe = ProbeStore(INPUTS, LABELS, per_segment=40, seed=0)
    state = learner.init(0)
    guard.mark_good(state)
    rows_evaluated = []
    evaluate = learner.evaluate
    learner.evaluate = lambda params, x, y: rows_evaluated.append(len(x)) or evaluate(params, x, y)

    for window in range(6):
        probe.add("a", *_stream(rng, 30))  # the reservoir fills, then replaces rows at random
        probe.add(f"s{window}", *_stream(rng, 25))
        state = _train(learner, state, rng)
        rows_evaluated.clear()
        verdict, _ = guard.judge(state, probe)
        x, y, _ = probe.examples()
        for params, results in ((guard.last_good.params, guard._good_results), (guard.anchor, guard._anchor_results)):
            fresh = evaluate(params, x, y)
            found, at = results.lookup(probe.serials())
            assert found.all()
            np.testing.assert_array_equal(results.evaluation.correct[at], fresh.correct)
            np.testing.assert_allclose(results.evaluation.loss[at], fresh.loss, rtol=1e-6)
        if window >= 1:
            # The candidate sees every row; the reference models only rows new since they last judged.
            assert rows_evaluated[0] == len(y) and sum(rows_evaluated[1:]) < len(y)
        state = guard.accept(state)


def test_step_figures_count_every_step_once_across_judgements_and_rollbacks():
    from continuity.learner import StepTotals
    from continuity.loop import _StepFigures

    def totals(steps, skipped, loss, grad, fresh, replayed):
        return StepTotals(*(np.float32(v) for v in (steps, skipped, loss, grad, fresh, replayed)))

    figures = _StepFigures()
    # 4 steps (1 skipped) read at a progress report...
    first = figures.snapshot(totals(4, 1, 3.0, 6.0, 100, 50))
    assert first == {"train_loss": 1.0, "grad_norm": 2.0, "replay_share": 50 / 150, "skipped_updates": 1}
    # ... 2 more before a judgement takes the totals out (the state then holds zeros, and so
    # does any copy the guard keeps, which a rollback returns to), 1 more after it.
    figures.taken(totals(6, 1, 5.0, 9.0, 164, 82))
    second = figures.snapshot(totals(1, 1, 0.0, 0.0, 32, 16))
    assert second == {"train_loss": 1.0, "grad_norm": 1.5, "replay_share": 1 / 3, "skipped_updates": 2}
    assert figures.snapshot(totals(1, 1, 0.0, 0.0, 32, 16))["train_loss"] is None  # nothing new: no figure
