"""The continual train step: deterministic, never retraced, masked rows inert, non-finite rows masked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from continuity import replay
from continuity.learner import (
    Batch,
    Classification,
    EWCConfig,
    Learner,
    LearnerConfig,
    ModelConfig,
    ReplayConfig,
    cnn,
    compilation_count,
    mlp,
)
from continuity.learner import learner as learner_module

SHAPE, CLASSES, B = (4, 4, 1), 5, 8
INPUTS = jax.ShapeDtypeStruct(SHAPE, jnp.float32)


def _learner(replay_kind="reservoir", model="mlp", steps_per_dispatch=1):
    factory = functools.partial(mlp, hidden=(16,)) if model == "mlp" else functools.partial(cnn, channels=(4,), dense=8)
    return Learner(
        factory,
        optax.adam(1e-3),
        Classification(CLASSES),
        inputs=INPUTS,
        batch_size=B,
        replay=replay.make(replay_kind, 24),
        replay_batch_size=6,
        ewc=EWCConfig(enabled=True, strength=10.0, fisher_samples=32),
        steps_per_dispatch=steps_per_dispatch,
    )


def _batches(n, seed=0, valid=None):
    rng = np.random.default_rng(seed)
    for i in range(n):
        rows = B if valid is None else valid(i)
        yield Batch(
            rng.random((B, *SHAPE), dtype=np.float32), rng.integers(0, CLASSES, B).astype(np.int32), np.arange(B) < rows
        )


def _run(learner, batches, consolidate_at=None):
    state = learner.init(7)
    for i, batch in enumerate(batches):
        state, metrics = learner.train_step(state, batch)
        if i == consolidate_at:
            state = learner.consolidate(state)
    return state, metrics


def _leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.slow  # many steps of both presets, twice
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_train_step_is_deterministic_to_the_bit(model):
    first, _ = _run(_learner(model=model), _batches(30), consolidate_at=10)
    second, _ = _run(_learner(model=model), _batches(30), consolidate_at=10)
    for a, b in zip(_leaves(first), _leaves(second)):
        np.testing.assert_array_equal(a, b)


def test_no_retrace_over_100_steps_with_varying_valid_rows():
    learner = _learner()
    state = learner.init(0)
    state, _ = learner.train_step(state, next(_batches(1)))  # warm-up compiles once
    before = compilation_count()
    for i, batch in enumerate(_batches(100, seed=1, valid=lambda i: i % (B + 1))):  # 0..B valid rows
        if i % 10 == 0:
            batch.x[0] = np.nan  # bad batches take the other branch of the same compiled step
        state, metrics = learner.train_step(state, batch)
    jax.block_until_ready(state)
    assert compilation_count() == before
    assert learner.train_step._cache_size() == 1
    empty = sum(1 for i in range(100) if i % (B + 1) == 0)  # a batch without rows takes no step
    assert empty > 0 and int(state.step) == 101 - empty


def test_padding_rows_have_no_effect_whatever_they_hold():
    learner = _learner()
    clean = next(_batches(1, valid=lambda i: 5))
    garbage_x = clean.x.copy()
    garbage_x[5:] = np.nan  # padding can hold anything, NaN included
    garbage = Batch(garbage_x, np.where(clean.mask, clean.y, 99).astype(np.int32), clean.mask)
    a, metrics_a = learner.train_step(learner.init(3), clean)
    b, metrics_b = learner.train_step(learner.init(3), garbage)
    assert bool(metrics_b["finite"])
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert int(a.replay.size) == 5  # only valid rows enter the buffer


@pytest.mark.parametrize("poison", [np.inf, np.nan, 3e38], ids=["inf", "nan", "finite-but-overflowing"])
def test_a_row_that_makes_the_step_non_finite_is_masked_and_the_rest_of_its_batch_trains(poison):
    learner = _learner()
    state, _ = _run(learner, _batches(3))
    seen = int(state.replay.seen)
    clean = next(_batches(1, seed=9))
    poisoned = Batch(clean.x.copy(), clean.y, clean.mask)
    poisoned.x[2] = poison  # 3e38 is finite, but its logits are not
    without_row = Batch(clean.x, clean.y, clean.mask & (np.arange(B) != 2))
    expected, expected_metrics = learner.train_step(jax.tree.map(jnp.copy, state), without_row)
    params = _leaves(state.params)
    state, metrics = learner.train_step(state, poisoned)
    assert bool(metrics["finite"]) and int(metrics["nonfinite_rows"]) == 1 and int(metrics["examples"]) == B - 1
    assert int(state.nonfinite_rows) == 1 and int(state.skipped_updates) == 0
    assert any(not np.array_equal(a, b) for a, b in zip(params, _leaves(state.params)))  # the update happened
    # Exactly the update of the batch without that row, and the row never enters the buffer.
    for a, b in zip(_leaves(expected.params) + _leaves(expected.replay), _leaves(state.params) + _leaves(state.replay)):
        np.testing.assert_array_equal(a, b)
    assert int(state.replay.seen) == seen + B - 1 and np.isfinite(np.asarray(state.replay.x)).all()
    assert float(metrics["loss"]) == float(expected_metrics["loss"])


def test_a_step_non_finite_without_any_bad_row_changes_nothing_but_the_counter():
    learner = _learner()
    state, _ = _run(learner, _batches(3))
    # A NaN Fisher makes the EWC penalty NaN whatever the rows hold: no row to blame, the step is skipped.
    state = state.replace(ewc=state.ewc._replace(fisher=jax.tree.map(lambda f: f * np.nan, state.ewc.fisher)))
    params = _leaves(state.params)
    opt_state = _leaves(state.opt_state)
    replay_size = int(state.replay.size)
    state, metrics = learner.train_step(state, next(_batches(1, seed=9)))
    assert not bool(metrics["finite"])
    assert int(state.skipped_updates) == 1 and int(state.nonfinite_rows) == 0
    for before, after in zip(params + opt_state, _leaves(state.params) + _leaves(state.opt_state)):
        np.testing.assert_array_equal(before, after)
    assert int(state.replay.size) == replay_size


def test_a_row_the_model_cannot_score_is_left_out_of_the_fisher():
    # Else one such row in a window (replay off: the Fisher comes from the window's rows) makes
    # the EWC penalty NaN and every later step is skipped.
    learner = Learner(
        functools.partial(mlp, hidden=(16,)),
        optax.adam(1e-3),
        Classification(CLASSES),
        inputs=INPUTS,
        batch_size=B,
        ewc=EWCConfig(enabled=True, fisher_samples=32),
    )
    batch = next(_batches(1))
    x, y = np.concatenate([batch.x, batch.x]), np.concatenate([batch.y, batch.y])
    poisoned = x.copy()
    poisoned[3] = 3e38  # finite, but its logits are not
    clean = learner.consolidate(learner.init(0), np.delete(x, 3, axis=0), np.delete(y, 3))
    state = learner.consolidate(learner.init(0), poisoned, y)
    for a, b in zip(_leaves(clean.ewc), _leaves(state.ewc)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    state, metrics = learner.train_step(state, batch)
    assert bool(metrics["finite"]) and int(state.skipped_updates) == 0


def test_replay_is_mixed_in_and_filled_from_fresh_examples():
    learner = _learner()
    state, metrics = _run(learner, _batches(5))
    assert int(state.replay.size) == 24  # 40 fresh examples offered to a 24-slot buffer
    assert float(metrics["replay_loss"]) > 0  # replayed rows contribute to the loss


def test_ewc_penalty_is_live_after_consolidation():
    learner = _learner()
    state, _ = _run(learner, _batches(4), consolidate_at=1)
    state, metrics = learner.train_step(state, next(_batches(1, seed=5)))
    assert float(metrics["ewc_penalty"]) > 0


def test_evaluate_in_chunks_equals_one_big_forward_pass():
    learner = _learner()
    params = learner.init(0).params
    rng = np.random.default_rng(0)
    x = rng.random((1100, *SHAPE), dtype=np.float32)  # spans three evaluation chunks
    y = rng.integers(0, CLASSES, 1100).astype(np.int32)
    evaluation = learner.evaluate(params, x, y)
    predicted = np.asarray(learner.logits(params, x)).argmax(-1)
    np.testing.assert_array_equal(evaluation.predicted, predicted)
    np.testing.assert_array_equal(evaluation.correct, predicted == y)
    np.testing.assert_array_equal(evaluation.outcome, predicted == y)
    assert evaluation.loss.shape == (1100,)


def test_learning_reduces_the_loss():
    learner = Learner(
        functools.partial(mlp, hidden=(16,)), optax.adam(1e-2), Classification(CLASSES), inputs=INPUTS, batch_size=B
    )
    batch = next(_batches(1))
    state = learner.init(0)
    state, first = learner.train_step(state, batch)
    for _ in range(50):
        state, last = learner.train_step(state, batch)
    assert float(last["fresh_loss"]) < 0.5 * float(first["fresh_loss"])


def test_an_mlp_without_hidden_layers_is_a_logistic_regression_that_learns_with_replay_and_ewc():
    from continuity.factory import learner_for
    from continuity.learner import count_parameters

    config = LearnerConfig(
        model=ModelConfig(hidden=()),
        learning_rate=0.05,
        batch_size=16,
        replay=ReplayConfig(kind="fifo", capacity=64, batch_size=8),
        ewc=EWCConfig(enabled=True, strength=10.0),
    )
    learner = learner_for(config, (6,), 2)
    state = learner.init(0)
    assert count_parameters(state.params) == 6 * 2 + 2  # one dense layer: a kernel and a bias
    rng = np.random.default_rng(3)
    w = rng.normal(size=6)
    x = rng.normal(size=(1600, 6)).astype(np.float32)
    y = (x @ w > 0).astype(np.int32)  # linearly separable
    for s in range(0, 800, 16):
        state, _ = learner.train_step(state, Batch(x[s : s + 16], y[s : s + 16], np.ones(16, bool)))
    state = learner.consolidate(state)  # the Fisher of a model with no hidden layer
    assert float(sum(jnp.sum(f) for f in jax.tree.leaves(state.ewc.fisher))) > 0
    for s in range(800, 1200, 16):
        state, metrics = learner.train_step(state, Batch(x[s : s + 16], y[s : s + 16], np.ones(16, bool)))
    assert float(metrics["ewc_penalty"]) > 0
    held_out = learner.evaluate(state.params, x[1200:], y[1200:])
    assert held_out.accuracy > 0.9


@pytest.mark.parametrize(
    "classes, batch, asymmetric, warned",
    [(2, 4, True, "about 1 batch in 8 holds one class"), (2, 4, False, None), (10, 8, True, None), (2, 8, True, None)],
)
def test_er_ace_warns_when_batches_of_one_class_are_common(caplog, classes, batch, asymmetric, warned):
    Learner(
        functools.partial(mlp, hidden=(4,)),
        optax.sgd(0.1),
        Classification(classes),
        inputs=INPUTS,
        batch_size=batch,
        replay=replay.make("fifo", 16),
        replay_batch_size=2,
        asymmetric=asymmetric,
    )
    said = [r.getMessage() for r in caplog.records if "ER-ACE" in r.getMessage()]
    if warned is None:
        assert not said
    else:
        assert len(said) == 1 and warned in said[0] and "replay.asymmetric = false" in said[0]


def _optimizer(config):
    from continuity.factory import build_optimizer

    return build_optimizer(config)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ModelConfig(kind="transformer"), "`model.kind` must be one of 'mlp', 'cnn'. Got 'transformer'."),
        (lambda: ModelConfig(hidden=(0,)), "`model.hidden`"),
        (lambda: _optimizer(LearnerConfig(optimizer="adamx")), "[learner] optimizer: optax has no optimizer 'adamx'"),
        (lambda: LearnerConfig(learning_rate=0), "`learner.learning_rate` must be > 0"),
        (lambda: ReplayConfig(kind="lru"), "`replay.kind` must be one of 'reservoir', 'class_balanced', 'fifo'"),
        (lambda: EWCConfig(strength=5.0, strength_min=10.0), "strength_min <= strength"),
        (lambda: EWCConfig(gamma=1.5), "`ewc.gamma` must be in [0, 1]"),
    ],
)
def test_bad_config_names_the_field(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


def test_cnn_needs_image_shaped_examples():
    with pytest.raises(ValueError, match="image-shaped"):
        Learner(
            cnn, optax.adam(1e-3), Classification(10), inputs=jax.ShapeDtypeStruct((64,), jnp.float32), batch_size=8
        )


def test_a_module_trains_from_its_own_parameters_for_every_seed():
    module = mlp(rngs=nnx.Rngs(5), inputs=INPUTS, outputs=CLASSES, hidden=(8,))
    learner = Learner(module, optax.sgd(0.1), Classification(CLASSES), inputs=INPUTS, batch_size=B)
    first, second = learner.init(0), learner.init(1)
    for a, b in zip(_leaves(first.params), _leaves(second.params)):
        np.testing.assert_array_equal(a, b)
    state, metrics = learner.train_step(first, next(_batches(1)))
    assert bool(metrics["finite"]) and int(state.step) == 1


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Learner(mlp, optax.adam(1e-3), "classification", inputs=INPUTS, batch_size=B), "`task` must be"),
        (lambda: Learner(mlp, "adam", Classification(3), inputs=INPUTS, batch_size=B), "`optimizer` must be"),
        (lambda: Learner(mlp, optax.adam(1e-3), Classification(3), inputs=(4, 4, 1), batch_size=B), "`inputs` must"),
        (lambda: Learner(mlp, optax.adam(1e-3), Classification(3), inputs=INPUTS, batch_size=0), "`batch_size`"),
        (
            lambda: Learner(
                lambda **_: "not a module", optax.adam(1e-3), Classification(3), inputs=INPUTS, batch_size=B
            ),
            "must return an nnx.Module",
        ),
        (lambda: Classification(1), "`num_classes` must be an integer >= 2"),
    ],
)
def test_bad_learner_parts_are_named(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert message in str(error.value)


class _Bag(nnx.Module):
    """Embeds int32 ids and adds a dense view of float features: named inputs, as a user's model."""

    def __init__(self, *, rngs: nnx.Rngs, inputs: dict, outputs: int):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.dense = nnx.Linear(inputs["numeric"].shape[0], 4, rngs=rngs)
        self.head = nnx.Linear(4, outputs, rngs=rngs)

    def __call__(self, x):
        return self.head(self.embed(x["ids"]).mean(axis=1) + self.dense(x["numeric"]))


def test_padding_rows_of_every_named_feature_are_zeroed_and_integer_ids_stay_integers():
    inputs = {"ids": jax.ShapeDtypeStruct((3,), jnp.int32), "numeric": jax.ShapeDtypeStruct((2,), jnp.float32)}
    learner = Learner(
        _Bag,
        optax.adam(1e-2),
        Classification(3),
        inputs=inputs,
        batch_size=4,
        replay=replay.fifo(8),
        replay_batch_size=4,
    )
    rng = np.random.default_rng(0)
    ids, numeric = rng.integers(0, 10, (4, 3)).astype(np.int32), rng.normal(size=(4, 2)).astype(np.float32)
    mask, y = np.array([True, True, False, False]), np.array([0, 2, 1, 1], np.int32)
    clean = Batch({"ids": np.where(mask[:, None], ids, 0), "numeric": np.where(mask[:, None], numeric, 0)}, y, mask)
    garbage = Batch(
        {"ids": np.where(mask[:, None], ids, 10**6), "numeric": np.where(mask[:, None], numeric, np.nan)}, y, mask
    )
    a, _ = learner.train_step(learner.init(0), clean)
    b, metrics = learner.train_step(learner.init(0), garbage)
    assert bool(metrics["finite"])
    for x, z in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, z)
    assert b.replay.x["ids"].dtype == jnp.int32 and int(b.replay.size) == 2
    np.testing.assert_array_equal(np.asarray(b.replay.x["ids"])[:2], ids[:2])
    evaluation = learner.evaluate(b.params, {"ids": ids, "numeric": numeric}, y)
    assert evaluation.predicted.shape == (4,) and evaluation.loss.dtype == np.float32


def test_step_totals_accumulate_on_the_device_and_are_taken_out_at_once():
    learner = _learner()
    state = learner.init(0)
    expected = {"steps": 0, "loss": 0.0, "grad_norm": 0.0, "fresh_rows": 0, "replayed_rows": 0}
    for i, batch in enumerate(_batches(6, valid=lambda i: B - i)):
        if i == 4:
            batch.x[0] = np.nan  # a non-finite row: masked, the rest of its batch trains and is counted
        if i == 5:  # a NaN Fisher makes the penalty NaN whatever the rows: skipped, its figures left out
            state = state.replace(ewc=state.ewc._replace(fisher=jax.tree.map(lambda f: f * np.nan, state.ewc.fisher)))
        full = int(state.replay.size) > 0  # replay rows join the loss once the buffer holds any
        state, metrics = learner.train_step(state, batch)
        expected["steps"] += 1
        if bool(metrics["finite"]):
            expected["loss"] += float(metrics["loss"])
            expected["grad_norm"] += float(metrics["grad_norm"])
        expected["fresh_rows"] += int(metrics["examples"])
        expected["replayed_rows"] += 6 if full else 0
    before = learner.train_step._cache_size()
    totals, state = learner.take_totals(state)
    assert int(totals.steps) == 6 and int(totals.skipped) == 1 and int(state.nonfinite_rows) == 1
    assert float(totals.loss) == pytest.approx(expected["loss"], rel=1e-5)
    assert float(totals.grad_norm) == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert (int(totals.fresh_rows), int(totals.replayed_rows)) == (expected["fresh_rows"], expected["replayed_rows"])
    assert all(int(v) == 0 for v in jax.tree.leaves(state.totals))  # taken: the state starts again from zero
    state, _ = learner.train_step(state, next(_batches(1)))  # and the step still runs, not recompiled
    assert learner.train_step._cache_size() == before and int(state.totals.steps) == 1


def _stream_with_an_empty_batch_and_a_nan_row():
    """19 micro-batches: 0..B valid rows, one all padding, one with a NaN row (masked by the step)."""
    batches = list(_batches(19, seed=4, valid=lambda i: B - i % 4))
    batches[5] = batches[5]._replace(mask=np.zeros(B, bool))
    batches[9].x[1] = np.nan
    return batches


def _by_stacks(learner, batches):
    state = learner.init(7)
    k = learner.steps_per_dispatch
    for start in range(0, len(batches), k):
        state, metrics = learner.train_steps(state, learner.stack(batches[start : start + k]))
    return state, metrics


def test_k_updates_per_dispatch_train_bit_identical_to_one_update_per_dispatch():
    """On the CPU, K = 8 (stacks of 8, 8 and a short 3) and K = 1 give the same state to the bit:
    params, optimizer state, replay buffer, EWC, counters and totals. XLA compiles the scanned
    update as the same computation as the unscanned one, so nothing reorders."""
    batches = _stream_with_an_empty_batch_and_a_nan_row()
    eight, metrics = _by_stacks(_learner(steps_per_dispatch=8), batches)
    one, _ = _by_stacks(_learner(steps_per_dispatch=1), batches)
    # One train_step per batch that has rows: the update train_steps scans, unchanged.
    learner = _learner()
    single = learner.init(7)
    for batch in batches:
        if batch.mask.any():
            single, _ = learner.train_step(single, batch)
    for a, b, c in zip(_leaves(eight), _leaves(one), _leaves(single)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert int(eight.step) == 18 and int(eight.nonfinite_rows) == 1  # the empty batch took no step
    assert metrics["examples"].shape == (8,) and metrics["examples"][3:].sum() == 0  # the short stack's padding


def test_the_gpus_selected_update_keeps_the_state_as_the_cpus_branched_update_does():
    """On the CPU a step that must change nothing skips the optimizer's update under a
    `lax.cond`; on a GPU it computes the update and selects the old state back
    (`_update_or_keep_by_select`). Both, run here on the CPU over an empty micro-batch, a
    non-finite row and a step skipped whole (a NaN Fisher), end in the same state to the bit."""

    def trained(learner):
        state, _ = _by_stacks(learner, _stream_with_an_empty_batch_and_a_nan_row())
        nan_fisher = state.ewc._replace(fisher=jax.tree.map(lambda f: f * np.nan, state.ewc.fisher))
        state, metrics = learner.train_steps(state.replace(ewc=nan_fisher), learner.stack(list(_batches(2, seed=5))))
        assert not bool(metrics["finite"][:2].any())  # the two updates skipped; the rest is padding
        return state

    branched = _learner(steps_per_dispatch=8)
    selected = _learner(steps_per_dispatch=8)
    selected._update_or_keep = learner_module._update_or_keep_by_select  # what a GPU's learner picks
    one, other = trained(branched), trained(selected)
    assert int(one.skipped_updates) == 2 and int(one.step) == 20
    for a, b in zip(_leaves(one), _leaves(other)):
        np.testing.assert_array_equal(a, b)


def test_an_all_padding_micro_batch_changes_nothing_in_the_state():
    learner = _learner(steps_per_dispatch=4)
    state, _ = learner.train_steps(learner.init(0), learner.stack(list(_batches(4))))
    before = _leaves(state)
    empty = next(_batches(1, valid=lambda i: 0))
    state, metrics = learner.train_steps(state, learner.stack([empty, empty]))
    for a, b in zip(before, _leaves(state)):
        np.testing.assert_array_equal(a, b)
    assert bool(metrics["finite"].all()) and int(metrics["examples"].sum()) == 0


def test_train_step_given_an_all_padding_batch_changes_nothing_in_the_state():
    learner = _learner()
    state, _ = learner.train_steps(learner.init(0), learner.stack(list(_batches(1))))
    before = _leaves(state)
    state, metrics = learner.train_step(state, next(_batches(1, valid=lambda i: 0)))
    for a, b in zip(before, _leaves(state)):
        np.testing.assert_array_equal(a, b)
    assert bool(metrics["finite"]) and int(metrics["examples"]) == 0 and float(metrics["loss"]) == 0.0


def test_a_partly_filled_stack_compiles_nothing_after_warm_up():
    learner = _learner(steps_per_dispatch=8)
    state, _ = learner.train_steps(learner.init(0), learner.stack(list(_batches(8))))  # warm-up compiles once
    before = compilation_count()
    for rows in (8, 3, 1, 8):
        state, _ = learner.train_steps(state, learner.stack(list(_batches(rows, seed=rows))))
    jax.block_until_ready(state)
    assert compilation_count() == before and learner.train_steps._cache_size() == 1
    assert int(state.step) == 28


def test_a_stack_of_more_than_k_micro_batches_or_of_the_wrong_size_is_refused():
    learner = _learner(steps_per_dispatch=2)
    with pytest.raises(ValueError, match="steps_per_dispatch=2"):
        learner.stack(list(_batches(3)))
    short = Batch(np.zeros((B - 1, *SHAPE), np.float32), np.zeros(B - 1, np.int32), np.ones(B - 1, bool))
    with pytest.raises(ValueError, match=f"batch_size={B}"):
        learner.stack([short])
    with pytest.raises(ValueError, match="steps_per_dispatch"):
        _learner(steps_per_dispatch=0)
