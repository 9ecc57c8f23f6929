"""The built-in presets train bit-for-bit as they did before the learner took injected parts.

Digests recorded with the code before the refactor (commit 4b1dead: `Learner(config,
example_shape, num_classes)`), on the CPU with the locked versions (constraints.txt): a
fixed seeded stream of padded batches through mlp and cnn, classification and
regression, with replay (reservoir, class-balanced, FIFO, or off) and EWC on, consolidated
twice along the way, then evaluated. The same figures through today's factory mean the
same program. A JAX or XLA upgrade may change float results; re-record then, from the
previous commit, and say so.

One deliberate difference: the CNN's Fisher. Its two dense layers now take the one-pass
path (learner/fisher.py) where all its parameters took per-example gradients before;
the figures agree to float rounding, not bit for bit. So the CNN is pinned to the old
code up to its first consolidation (training, replay, evaluation: bit-identical), its
Fisher is checked against the old computation, and its runs that consolidate midway are
pinned to the figures of the commit that made the change.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest

from continuity.factory import learner_for
from continuity.learner import Batch, EWCConfig, LearnerConfig, ModelConfig, ReplayConfig, ewc

pytestmark = pytest.mark.slow  # compiles both presets for both tasks

SHAPE, B = (8, 8, 1), 16

CNN_AFTER_ONE_PASS_FISHER = {
    "classification": {
        "params": "26ee6a956d7f3077",
        "opt": "3afd138aad98c4ef",
        "ewc": "fd4c2d05297f9798",
        "replay": "3ae72aba8e9748dc",
        "eval": "110877f777ce585d",
    },
    "regression": {
        "params": "519150c8a47eafc8",
        "opt": "240bbff575af0295",
        "ewc": "b79ac360812584c8",
        "replay": "f07dccd0874d11f1",
        "eval": "21b135a35550e3bd",
    },
}

# The CNN trained 40 steps, consolidated only at the end: the old code's params and optimizer state.
CNN_BEFORE_CONSOLIDATING = {
    "classification": {"params": "2889a35c8f8a669a", "opt": "d9083685815afa62"},
    "regression": {"params": "1122360208aaa14d", "opt": "7381baa0170f13cd"},
}

PINNED = {
    ("mlp", "classification", "reservoir", 64): {
        "params": "d2321a4546f7c7f4",
        "opt": "fc26fe940c6b24d2",
        "ewc": "4a0344d8c9c81f57",
        "replay": "3ae72aba8e9748dc",
        "eval": "6f14885fa3b26469",
    },
    ("mlp", "regression", "reservoir", 64): {
        "params": "d28b84f696356f87",
        "opt": "bed00daca48c9513",
        "ewc": "a8cc7cff0890473c",
        "replay": "f07dccd0874d11f1",
        "eval": "67ea159432c128b1",
    },
    # Recorded with the commit that took the CNN's dense layers' Fisher to the one-pass path
    # (before it, with per-example gradients for every parameter: params 8babbcbb0ccd1c66
    # and 5b71aa32d68a3f3d).
    ("cnn", "classification", "reservoir", 64): CNN_AFTER_ONE_PASS_FISHER["classification"],
    ("cnn", "regression", "reservoir", 64): CNN_AFTER_ONE_PASS_FISHER["regression"],
    ("mlp", "classification", "class_balanced", 64): {
        "params": "37dd8385cbd61f67",
        "opt": "9243ae11b95ea0eb",
        "ewc": "52c3163dafbd8dc6",
        "replay": "16ea27a679b38b1b",
        "eval": "f32c411bcc95bdf8",
    },
    ("mlp", "regression", "fifo", 64): {
        "params": "66b20331b50d336f",
        "opt": "17df1a561ed3e215",
        "ewc": "b016ed9663597738",
        "replay": "d1d304d3f5ce7bc8",
        "eval": "17150278c5ecbaaa",
    },
    ("mlp", "classification", "reservoir", 0): {  # replay off: the Fisher from given examples
        "params": "a8c8db52c56a5042",
        "opt": "ed5942881f5314d6",
        "ewc": "699b179530c96b77",
        "replay": None,
        "eval": "0340375320a9ab3c",
    },
}


def _digest(tree) -> str:
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        digest.update(np.asarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def _batches(n, task, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = rng.random((B, *SHAPE), dtype=np.float32)
        y = rng.normal(size=B).astype(np.float32) if task == "regression" else rng.integers(0, 5, B).astype(np.int32)
        yield Batch(x, y, np.arange(B) < (B - i % 4))


def _learner(model, task, replay_kind, capacity):
    config = LearnerConfig(
        model=ModelConfig(kind=model, hidden=(32, 16), channels=(4, 8), dense=16),
        batch_size=B,
        task=task,
        learning_rate=3e-3,
        replay=ReplayConfig(kind=replay_kind, capacity=capacity, batch_size=8),
        ewc=EWCConfig(enabled=True, strength=50.0, fisher_samples=64),
    )
    return learner_for(config, SHAPE, None if task == "regression" else 5)


@pytest.mark.parametrize("case", list(PINNED), ids=["-".join(map(str, case)) for case in PINNED])
def test_a_preset_trains_bit_identical_to_before_the_refactor(case):
    model, task, replay_kind, capacity = case
    learner = _learner(*case)
    state = learner.init(3)
    data = list(_batches(40, task, seed=11))
    for i, batch in enumerate(data):
        state, _ = learner.train_step(state, batch)
        if i in (10, 25):
            if capacity:
                state = learner.consolidate(state)
            else:
                recent = data[:3]
                state = learner.consolidate(
                    state, np.concatenate([b.x for b in recent]), np.concatenate([b.y for b in recent])
                )
    test = list(_batches(3, task, seed=5))
    evaluation = learner.evaluate(
        state.params, np.concatenate([b.x for b in test]), np.concatenate([b.y for b in test])
    )
    replay = state.replay
    got = {
        "params": _digest(state.params),
        "opt": _digest(state.opt_state),
        "ewc": _digest(state.ewc),
        "replay": None if replay is None else _digest((replay.x, replay.y, replay.size, replay.class_counts)),
        "eval": _digest((evaluation.loss, evaluation.predicted)),
    }
    assert got == PINNED[case]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_cnn_preset_trains_bit_identical_to_before_and_its_fisher_matches_per_example_gradients(task):
    learner = _learner("cnn", task, "reservoir", 64)
    state = learner.init(3)
    for batch in _batches(40, task, seed=11):
        state, _ = learner.train_step(state, batch)
    assert {"params": _digest(state.params), "opt": _digest(state.opt_state)} == CNN_BEFORE_CONSOLIDATING[task]
    # The old code's Fisher: per-example gradients of every parameter, on the replay sample
    # consolidate() draws.
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x46495348)
    x, y, valid = learner.replay.sample(state.replay, key, 64)
    before = ewc.fisher_diagonal(learner.logits, learner.task.nll, state.params, x, y, valid, chunk=32)
    state = learner.consolidate(state)
    for got, want in zip(jax.tree.leaves(state.ewc.fisher), jax.tree.leaves(before)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-10)
