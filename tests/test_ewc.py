"""Online EWC: the penalty and its gradient match the formula; every Fisher path matches per-example gradients.

The Fisher of a dense layer applied once per example comes from one backward pass; of any
other layer (an embedding, a per-token dense layer, a convolution) from per-example
gradients; the two merge into one tree, found from the model, not from its name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from continuity.factory import learner_for
from continuity.learner import Classification, Learner, MultiLabel, Regression, ewc
from continuity.learner.config import EWCConfig, LearnerConfig, ModelConfig
from continuity.learner.fisher import dense_leaves, exact_dense_layers
from continuity.learner.learner import _total_by_matvec


def _tiny_tree(rng):
    return {
        "w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }


def test_penalty_and_gradient_equal_the_formula_by_hand():
    rng = np.random.default_rng(0)
    params, anchor = _tiny_tree(rng), _tiny_tree(rng)
    fisher = jax.tree.map(lambda a: jnp.abs(a), _tiny_tree(rng))
    state = ewc.EWCState(anchor=anchor, fisher=fisher, strength=jnp.float32(3.0))

    expected = 0.0
    for name in ("w", "b"):
        p, a, f = (np.asarray(t[name], np.float64) for t in (params, anchor, fisher))
        expected += (f * (p - a) ** 2).sum()
    expected *= 3.0 / 2

    assert float(ewc.penalty(params, state)) == pytest.approx(expected, rel=1e-5)
    grads = jax.grad(ewc.penalty)(params, state)
    for name in ("w", "b"):
        by_hand = 3.0 * np.asarray(fisher[name]) * (np.asarray(params[name]) - np.asarray(anchor[name]))
        np.testing.assert_allclose(np.asarray(grads[name]), by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("total", [jnp.sum, _total_by_matvec], ids=["sum", "matvec"])
def test_the_steps_penalty_and_pulled_gradient_equal_the_formula_by_hand(total):
    # What the train step uses: the loss's gradient plus strength * F * (theta - anchor), and
    # the penalty summed by the device's total (a matrix-vector product on the CPU).
    rng = np.random.default_rng(2)
    params, anchor, grads = _tiny_tree(rng), _tiny_tree(rng), _tiny_tree(rng)
    fisher = jax.tree.map(jnp.abs, _tiny_tree(rng))
    state = ewc.EWCState(anchor=anchor, fisher=fisher, strength=jnp.float32(3.0))

    penalty, pulled = jax.jit(ewc.penalty_and_pulled, static_argnums=3)(params, state, grads, total)

    assert float(penalty) == pytest.approx(float(ewc.penalty(params, state)), rel=1e-6)
    for name in ("w", "b"):
        by_hand = np.asarray(grads[name]) + 3.0 * np.asarray(fisher[name]) * (
            np.asarray(params[name]) - np.asarray(anchor[name])
        )
        np.testing.assert_allclose(np.asarray(pulled[name]), by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(), (0,), (5,), (0, 4), (3, 4), (2, 3, 4)])
def test_the_cpu_total_by_matrix_vector_product_is_the_sum(shape):
    x = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
    assert float(jax.jit(_total_by_matvec)(x)) == pytest.approx(float(jnp.sum(x)), rel=1e-5, abs=1e-6)


def test_penalty_is_zero_before_any_consolidation():
    params = _tiny_tree(np.random.default_rng(1))
    shifted = jax.tree.map(lambda p: p + 5.0, params)
    assert float(ewc.penalty(shifted, ewc.init(params, strength=100.0))) == 0.0


@pytest.mark.slow  # a Python loop of per-example gradients
def test_vmap_fisher_equals_a_per_example_loop():
    learner = learner_for(LearnerConfig(model=ModelConfig(hidden=(5,))), (3, 2), 4)
    params = learner.init(0).params
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3, 2)).astype(np.float32)
    y = rng.integers(0, 4, 64).astype(np.int32)
    mask = rng.random(64) < 0.7

    fisher = ewc.fisher_diagonal(learner.logits, learner.task.nll, params, x, y, mask, chunk=32)

    def nll(p, xi, yi):
        return optax.softmax_cross_entropy_with_integer_labels(learner.logits(p, xi[None])[0], yi)

    total = jax.tree.map(np.zeros_like, params)
    for i in np.flatnonzero(mask):
        g = jax.grad(nll)(params, x[i], y[i])
        total = jax.tree.map(lambda t, gi: t + np.square(np.asarray(gi, np.float64)), total, g)
    by_loop = jax.tree.map(lambda t: t / mask.sum(), total)
    for got, want in zip(jax.tree.leaves(fisher), jax.tree.leaves(by_loop)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-7)


def test_fisher_needs_whole_chunks():
    learner = learner_for(LearnerConfig(model=ModelConfig(hidden=(5,))), (3,), 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        ewc.fisher_diagonal(
            learner.logits,
            learner.task.nll,
            learner.init(0).params,
            np.zeros((40, 3)),
            np.zeros(40, int),
            np.ones(40, bool),
        )


def test_consolidate_is_the_online_update():
    rng = np.random.default_rng(2)
    params, old_fisher, new_fisher = _tiny_tree(rng), _tiny_tree(rng), _tiny_tree(rng)
    state = ewc.EWCState(anchor=_tiny_tree(rng), fisher=old_fisher, strength=jnp.float32(1.0))
    updated = ewc.consolidate(state, params, new_fisher, gamma=0.5)
    for name in ("w", "b"):
        np.testing.assert_array_equal(updated.anchor[name], params[name])
        np.testing.assert_allclose(
            updated.fisher[name], 0.5 * np.asarray(old_fisher[name]) + np.asarray(new_fisher[name]), rtol=1e-6
        )


def test_strength_decays_to_its_floor_and_boosts_to_its_ceiling():
    state = ewc.init({"w": jnp.zeros(2)}, strength=100.0)
    assert float(ewc.decay_strength(state, decay=0.5, floor=10.0).strength) == 50.0
    floor_state = state
    for _ in range(10):
        floor_state = ewc.decay_strength(floor_state, decay=0.5, floor=10.0)
    assert float(floor_state.strength) == 10.0
    assert float(ewc.boost_strength(state, boost=4.0, ceiling=1000.0).strength) == 400.0
    assert float(ewc.boost_strength(state, boost=40.0, ceiling=1000.0).strength) == 1000.0


def test_learner_consolidation_anchors_at_current_params():
    config = LearnerConfig(
        model=ModelConfig(hidden=(8,)), ewc=EWCConfig(enabled=True, strength=50.0, fisher_samples=32)
    )
    learner = learner_for(config, (4,), 3)
    state = learner.init(0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)).astype(np.float32), rng.integers(0, 3, 20).astype(np.int32)
    params = jax.tree.map(np.array, state.params)
    state = learner.consolidate(state, x, y)
    for anchor, p in zip(jax.tree.leaves(state.ewc.anchor), jax.tree.leaves(params)):
        np.testing.assert_array_equal(anchor, p)
    assert sum(float(jnp.sum(f)) for f in jax.tree.leaves(state.ewc.fisher)) > 0


@pytest.mark.slow  # compiles per-example gradients as the reference
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_one_pass_dense_fisher_equals_per_example_gradients(task):
    # An MLP's Fisher comes from ewc.fisher_diagonal_dense; it must be the per-example one.
    regression = task == "regression"
    config = LearnerConfig(model=ModelConfig(hidden=(16, 8)), task=task)
    learner = learner_for(config, (3, 2), None if regression else 4)
    params = learner.init(0).params
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 3, 2)).astype(np.float32)
    y = rng.normal(size=64).astype(np.float32) if regression else rng.integers(0, 4, 64).astype(np.int32)
    mask = rng.random(64) < 0.7

    one_pass = learner.fisher(params, x, y, mask)
    per_example = ewc.fisher_diagonal(learner.logits, learner.task.nll, params, x, y, mask, chunk=32)
    assert jax.tree.structure(one_pass) == jax.tree.structure(per_example)
    for got, want in zip(jax.tree.leaves(one_pass), jax.tree.leaves(per_example)):
        assert float(jnp.max(want)) > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-8)


class _TokensThenDense(nnx.Module):
    """Token embeddings, a dense layer applied per token ([B, T, F]: shared across positions),
    mean pooling, a dense layer applied once per example, a head; plus a layer applied twice
    and one never used."""

    def __init__(self, *, rngs: nnx.Rngs, inputs, outputs: int):
        self.embed = nnx.Embed(20, 6, rngs=rngs)
        self.per_token = nnx.Linear(6, 6, rngs=rngs)
        self.pooled = nnx.Linear(6, 8, rngs=rngs)
        self.twice = nnx.Linear(8, 8, rngs=rngs)
        self.unused = nnx.Linear(8, 8, rngs=rngs)
        self.head = nnx.Linear(8, outputs, rngs=rngs)

    def __call__(self, tokens):
        h = jax.nn.relu(self.per_token(self.embed(tokens))).mean(axis=1)
        h = jax.nn.relu(self.pooled(h))
        h = jax.nn.tanh(self.twice(jax.nn.tanh(self.twice(h))))
        return self.head(h)


def _token_learner(task):
    return Learner(
        _TokensThenDense,
        optax.adam(1e-3),
        task,
        inputs=jax.ShapeDtypeStruct((5,), jnp.int32),
        batch_size=8,
        ewc=EWCConfig(enabled=True, fisher_samples=64),
    )


def test_the_fisher_fast_path_takes_exactly_the_dense_layers_applied_once_per_example():
    learner = _token_learner(Classification(3))
    params = learner.init(0).params
    tokens = np.zeros((64, 5), np.int32)
    layers = exact_dense_layers(lambda: learner._module(params), tokens)
    assert layers == {("pooled",), ("head",)}  # not per token, not applied twice, not unused
    marked = dense_leaves(params, layers)
    assert marked["pooled"] == {"kernel": True, "bias": True} and marked["embed"] == {"embedding": False}
    mlp_learner = learner_for(LearnerConfig(model=ModelConfig(hidden=(4, 4))), (3,), 2)
    mlp_params = mlp_learner.init(0).params
    assert exact_dense_layers(lambda: mlp_learner._module(mlp_params), np.zeros((32, 3), np.float32)) == {
        ("hidden", 0),
        ("hidden", 1),
        ("head",),
    }


@pytest.mark.slow  # compiles per-example gradients as the reference
@pytest.mark.parametrize("task", [Classification(3), Regression(), MultiLabel(3)], ids=lambda t: type(t).__name__)
def test_a_user_models_fisher_mixing_dense_layers_with_an_embedding_equals_per_example_gradients(task):
    learner = _token_learner(task)
    params = learner.init(0).params
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 20, (64, 5)).astype(np.int32)
    y = {
        Classification(3): rng.integers(0, 3, 64).astype(np.int32),
        Regression(): rng.normal(size=64).astype(np.float32),
        MultiLabel(3): rng.integers(0, 2, (64, 3)).astype(np.int32),
    }[task]
    mask = rng.random(64) < 0.7
    mixed = learner.fisher(params, tokens, y, mask)
    per_example = ewc.fisher_diagonal(learner.logits, task.nll, params, tokens, y, mask, chunk=32)
    assert jax.tree.structure(mixed) == jax.tree.structure(per_example)
    for got, want in zip(jax.tree.leaves(mixed), jax.tree.leaves(per_example)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-9)
    assert float(jnp.sum(mixed["unused"]["kernel"])) == 0.0  # a layer the loss never sees has no Fisher
    assert float(jnp.max(mixed["embed"]["embedding"])) > 0 and float(jnp.max(mixed["pooled"]["kernel"])) > 0


@pytest.mark.slow  # compiles per-example gradients as the reference
def test_the_cnn_presets_fisher_equals_per_example_gradients():
    # Convolutions share their kernels across positions: per-example gradients; its dense layers: one pass.
    config = LearnerConfig(model=ModelConfig(kind="cnn", channels=(4,), dense=8))
    learner = learner_for(config, (6, 6, 1), 3)
    params = learner.init(0).params
    rng = np.random.default_rng(5)
    x, y, mask = (
        rng.random((64, 6, 6, 1), dtype=np.float32),
        rng.integers(0, 3, 64).astype(np.int32),
        rng.random(64) < 0.8,
    )
    mixed = learner.fisher(params, x, y, mask)
    per_example = ewc.fisher_diagonal(learner.logits, learner.task.nll, params, x, y, mask, chunk=32)
    for got, want in zip(jax.tree.leaves(mixed), jax.tree.leaves(per_example)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-9)
