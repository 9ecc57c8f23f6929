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
- Re-recorded when the train step became one straight line of kernels (issue 13, the
  continual step's cost: no `while_loop`, the second pass under a `lax.cond`, the EWC
  penalty's gradient added analytically): XLA fuses and rounds the straight line
  differently. Measured against the previous code (ec15e6c) on the same stream, every case:
  every parameter within 1.2e-7 after 40 steps (params of magnitude ~0.6), replay contents
  bit-identical. The analytic EWC gradient alone changes no parameter's bit.

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
        "params": "71d2978f18b1f11f",
        "opt": "c79a412422fbb15c",
        "ewc": "2c370eddfd87cf80",
        "replay": "3ae72aba8e9748dc",
        "eval": "4dee20e848cda2e5",
    },
    "regression": {
        "params": "5f9f12291923805b",
        "opt": "7f0c3b22dba4fa33",
        "ewc": "fdf2955d255aa85a",
        "replay": "f07dccd0874d11f1",
        "eval": "d2fea6722bb2cb3e",
    },
}

# The CNN trained 40 steps, consolidated only at the end: params and optimizer state.
CNN_BEFORE_CONSOLIDATING = {
    "classification": {"params": "1c190ae8ca42efd0", "opt": "cc2d7e16936fc5c1"},
    "regression": {"params": "30273e68da26656f", "opt": "d105ab91537814df"},
}

PINNED = {
    ("mlp", "classification", "reservoir", 64): {
        "params": "4c0a0c280dff21b8",
        "opt": "8e3cae3ee85fd324",
        "ewc": "5131e2090f1501ae",
        "replay": "3ae72aba8e9748dc",
        "eval": "5c084938b42ef137",
    },
    ("mlp", "regression", "reservoir", 64): {
        "params": "53ea6ab75721c98c",
        "opt": "c57bfc70c5152e2e",
        "ewc": "21f1e2151cac770a",
        "replay": "f07dccd0874d11f1",
        "eval": "335fe95dcb295837",
    },
    # The CNN's dense layers take the one-pass Fisher (see the module docstring).
    ("cnn", "classification", "reservoir", 64): CNN_AFTER_ONE_PASS_FISHER["classification"],
    ("cnn", "regression", "reservoir", 64): CNN_AFTER_ONE_PASS_FISHER["regression"],
    ("mlp", "classification", "class_balanced", 64): {
        "params": "59979ec509f55774",
        "opt": "eda57349832120d4",
        "ewc": "02e00c6eddf3a186",
        "replay": "16ea27a679b38b1b",
        "eval": "39f40093ffabf51e",
    },
    ("mlp", "regression", "fifo", 64): {
        "params": "d5a39977f1f02486",
        "opt": "77b39119bc1ab219",
        "ewc": "5e318b621ddcb68f",
        "replay": "d1d304d3f5ce7bc8",
        "eval": "e3377926a0594ab2",
    },
    ("mlp", "classification", "reservoir", 0): {  # replay off: the Fisher from given examples
        "params": "8f3c4b65c32edb0f",
        "opt": "1feec020c2ae6f8a",
        "ewc": "a1eb996f40cf4d91",
        "replay": None,
        "eval": "41c0c3708103adac",
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
