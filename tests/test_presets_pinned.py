"""The built-in presets train bit-for-bit as pinned: the same program through today's factory.

History of the pins, so a change of digest is never silent:
- Recorded first with the code before the learner took injected parts (commit 4b1dead:
  `Learner(config, example_shape, num_classes)`): the refactor reproduced them exactly,
  but for the CNN's Fisher (its dense layers took the one-pass path, learner/fisher.py:
  equal to float rounding; its Fisher is still checked against the per-example one here).
- Re-recorded when the train step began to mask non-finite rows (a `lax.while_loop` of at
  most two passes, issue 10): XLA rounds the loop body differently. Measured against the
  refactor's own code (learner-lib d6af06e) on the same stream: every parameter within
  6e-8 after 40 steps (params of magnitude ~0.6), replay contents bit-identical.

On the CPU with the locked versions (constraints.txt): a fixed seeded stream of padded
batches through mlp and cnn, classification and regression, with replay (reservoir,
class-balanced, FIFO, or off) and EWC on, consolidated twice along the way, then
evaluated. A JAX or XLA upgrade may change float results; re-record then, and say so here.
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
        "params": "e91ded6dae5e3eda",
        "opt": "b9bb61d73c017870",
        "ewc": "e6a1050057a47e3f",
        "replay": "3ae72aba8e9748dc",
        "eval": "e0138d5dffbc08c9",
    },
    "regression": {
        "params": "441ee0f3e5fdeaf3",
        "opt": "4ee961ddec8bcb42",
        "ewc": "65557e53302d6912",
        "replay": "f07dccd0874d11f1",
        "eval": "0d2258321c307de2",
    },
}

# The CNN trained 40 steps, consolidated only at the end: params and optimizer state.
CNN_BEFORE_CONSOLIDATING = {
    "classification": {"params": "490fbf392aec2a8b", "opt": "9ed092345ecf6ff5"},
    "regression": {"params": "93c94cdb9b5422c2", "opt": "d54b6765da7aade8"},
}

PINNED = {
    ("mlp", "classification", "reservoir", 64): {
        "params": "b8505176331cb668",
        "opt": "6dd017b06734818a",
        "ewc": "82afcfa2063f86ed",
        "replay": "3ae72aba8e9748dc",
        "eval": "ab7e60172f65d52c",
    },
    ("mlp", "regression", "reservoir", 64): {
        "params": "6d3f7b88392d3740",
        "opt": "4a3d917f199126aa",
        "ewc": "3fe942534f65005f",
        "replay": "f07dccd0874d11f1",
        "eval": "2d29802ac86d4c34",
    },
    # The CNN's dense layers take the one-pass Fisher (see the module docstring).
    ("cnn", "classification", "reservoir", 64): CNN_AFTER_ONE_PASS_FISHER["classification"],
    ("cnn", "regression", "reservoir", 64): CNN_AFTER_ONE_PASS_FISHER["regression"],
    ("mlp", "classification", "class_balanced", 64): {
        "params": "00ff8d5151bdcde6",
        "opt": "61fab2cfb3256a7f",
        "ewc": "6509439e8407a934",
        "replay": "16ea27a679b38b1b",
        "eval": "b97f91a501d82597",
    },
    ("mlp", "regression", "fifo", 64): {
        "params": "d5c36820c1c5f09e",
        "opt": "a2fb2a8f64a5e6d6",
        "ewc": "222fc59a0e33a7e5",
        "replay": "d1d304d3f5ce7bc8",
        "eval": "003e516378c2ac0d",
    },
    ("mlp", "classification", "reservoir", 0): {  # replay off: the Fisher from given examples
        "params": "2fd8c06ba3b67f6a",
        "opt": "53974cfe3e38bb45",
        "ewc": "215436ff2d748ad3",
        "replay": None,
        "eval": "fef77065f33eecd2",
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
    # The per-example Fisher of every parameter (what the CNN took before the one-pass path), on the replay sample
    # consolidate() draws.
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x46495348)
    x, y, valid = learner.replay.sample(state.replay, key, 64)
    before = ewc.fisher_diagonal(learner.logits, learner.task.nll, state.params, x, y, valid, chunk=32)
    state = learner.consolidate(state)
    for got, want in zip(jax.tree.leaves(state.ewc.fisher), jax.tree.leaves(before)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-10)
