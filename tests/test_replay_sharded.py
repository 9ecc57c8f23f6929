"""A replay buffer split into shards (replay/sharded.py): each shard is the policy over its own block
of every batch, so the shared contract (tests/test_replay.py) holds per shard; sampling draws
from every shard; a host copy re-deals to another shard count keeping every held example."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_replay import CLASS_LABEL, FEATURES, NUM_CLASSES, stream_batch

from continuity import replay

SHARDS, PER_SHARD, BATCH, DRAWS = 2, 6, 8, 8
KINDS = replay.REPLAY_KINDS


@functools.cache
def compiled(kind: str):
    """(sharded policy, one shard's policy, jitted sharded add, jitted one-shard add, jitted sharded sample)."""
    one = replay.make(kind, PER_SHARD)
    policy = replay.sharded(one, SHARDS)
    return (
        policy,
        one,
        jax.jit(lambda s, x, y, m, k: policy.add(s, x, y, m, k, y)),
        jax.jit(lambda s, x, y, m, k: one.add(s, x, y, m, k, y)),
        jax.jit(policy.sample, static_argnums=2),
    )


def _feed(kind: str, batches: int = 5):
    """The sharded buffer, and each shard's lone-policy twin fed its block with key fold_in(key, shard)."""
    policy, one, add, add_one, _ = compiled(kind)
    state = policy.init(FEATURES, CLASS_LABEL, NUM_CLASSES)
    twins = [one.init(FEATURES, CLASS_LABEL, NUM_CLASSES) for _ in range(SHARDS)]
    rows = BATCH // SHARDS
    for b in range(batches):
        x, y, mask = stream_batch(b * BATCH, BATCH, mask=np.arange(BATCH) % 5 != 3)
        key = jax.random.PRNGKey(b)
        state = add(state, x, y, mask, key)
        for s in range(SHARDS):
            part = slice(s * rows, (s + 1) * rows)
            twins[s] = add_one(twins[s], x[part], y[part], mask[part], jax.random.fold_in(key, s))
    return state, twins


def test_a_sharded_policy_holds_its_shards_times_the_capacity_and_refuses_bad_counts():
    policy = replay.sharded(replay.reservoir(PER_SHARD), SHARDS)
    assert (policy.capacity, policy.shards) == (PER_SHARD * SHARDS, SHARDS)
    assert policy.add.__qualname__ == replay.reservoir(1).add.__qualname__  # a learner describes it as the policy
    state = policy.init(FEATURES, CLASS_LABEL, NUM_CLASSES)
    assert state.x.shape == (SHARDS, PER_SHARD, 3) and state.size.shape == (SHARDS,)
    assert replay.shard_count(state) == SHARDS
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="`shards` must be an integer >= 1"):
            replay.sharded(replay.reservoir(PER_SHARD), bad)
    with pytest.raises(ValueError, match="sharded already"):
        replay.sharded(policy, 2)
    x, y, mask = stream_batch(0, 7)
    with pytest.raises(ValueError, match="leading batch axis that divides by 2"):
        policy.add(state, x, y, mask, jax.random.PRNGKey(0), y)


@pytest.mark.parametrize("kind", KINDS)
def test_each_shard_is_the_policy_over_its_own_block_of_every_batch(kind):
    # Each shard equals a lone buffer fed only its block with its own key: the contract suite's
    # guarantees (prefix, counts, masked rows, bounded memory) hold per shard.
    state, twins = _feed(kind)
    for s, twin in enumerate(twins):
        for ours, alone in zip(jax.tree.leaves(state), jax.tree.leaves(twin)):
            np.testing.assert_array_equal(np.asarray(ours)[s], np.asarray(alone))
    # Row r of a batch lives on shard r // (BATCH / SHARDS): the ids held say which block they came from.
    for s in range(SHARDS):
        ids = np.asarray(state.x)[s, : int(state.size[s]), 0].astype(int)
        assert len(ids) and set((ids % BATCH) // (BATCH // SHARDS)) == {s}


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_draws_an_equal_share_from_every_shard_in_shard_order(kind):
    state, _ = _feed(kind)
    policy, *_, sample = compiled(kind)
    x, y, valid = sample(state, jax.random.PRNGKey(7), DRAWS)
    assert x.shape == (DRAWS, 3) and bool(valid.all())
    ids = np.asarray(x)[:, 0].astype(int)
    per = DRAWS // SHARDS
    for s in range(SHARDS):
        held = set(np.asarray(state.x)[s, : int(state.size[s]), 0].astype(int))
        assert set(ids[s * per : (s + 1) * per]) <= held
    np.testing.assert_array_equal(np.asarray(y), ids % NUM_CLASSES)  # each row's own label


def test_a_draw_that_does_not_divide_by_the_shards_keeps_its_size():
    state, _ = _feed("reservoir")
    policy = compiled("reservoir")[0]
    x, y, valid = policy.sample(state, jax.random.PRNGKey(1), 5)
    assert x.shape == (5, 3) and y.shape == valid.shape == (5,)
    with pytest.raises(ValueError, match="static non-negative Python int"):
        policy.sample(state, jax.random.PRNGKey(1), jnp.int32(4))


def _held(state) -> list:
    """Every held example's (id, label), over all shards."""
    count = replay.shard_count(state)
    lead = (lambda a: np.asarray(a)) if count > 1 else (lambda a: np.asarray(a)[None])
    x, y, size = lead(state.x), lead(state.y), lead(state.size)
    return sorted((int(x[s, i, 0]), int(y[s, i])) for s in range(count) for i in range(int(size[s])))


def _check_counters(state, buckets: int) -> None:
    count = replay.shard_count(state)
    lead = (lambda a: np.asarray(a)) if count > 1 else (lambda a: np.asarray(a)[None])
    for s in range(count):
        size = int(lead(state.size)[s])
        held = lead(state.bucket)[s, :size]
        np.testing.assert_array_equal(lead(state.class_counts)[s], np.bincount(held, minlength=buckets))
        assert not lead(state.x)[s, size:].any()  # the filled slots are the prefix


@pytest.mark.parametrize("kind", KINDS)
def test_a_host_copy_re_deals_to_any_shard_count_keeping_every_held_example_and_the_counts(kind):
    state, _ = _feed(kind, batches=2)  # not full: 2 x 8 rows offered, some masked
    host = jax.tree.map(np.asarray, state)
    seen = int(np.sum(host.seen))
    for shards in (1, 3, 4):
        dealt = replay.reshard(host, shards)
        assert replay.shard_count(dealt) == shards
        assert _held(dealt) == _held(host)
        assert int(np.sum(dealt.seen)) == seen and np.asarray(dealt.bucket).size == PER_SHARD * SHARDS
        _check_counters(dealt, NUM_CLASSES)
        assert _held(replay.reshard(dealt, SHARDS)) == _held(host)  # and back
    with pytest.raises(ValueError, match="cannot be split into 5 equal shards"):
        replay.reshard(host, 5)


def test_a_re_dealt_fifo_still_evicts_its_oldest_examples_first():
    state, _ = _feed("fifo", batches=8)  # full: each shard holds its newest rows
    one = replay.reshard(jax.tree.map(np.asarray, state), 1)
    assert int(one.size) == PER_SHARD * SHARDS and int(one.cursor) == 0
    policy = replay.fifo(PER_SHARD * SHARDS)
    newest = stream_batch(1000, 4)
    after = policy.add(jax.tree.map(jnp.asarray, one), *newest, jax.random.PRNGKey(0), newest[1])
    gone = {i for i, _ in _held(one)} - {i for i, _ in _held(after)}
    # The 4 evicted are the oldest held: the 2 oldest of each old shard.
    oldest = sorted(i for i, _ in _held(one))
    per_shard = [sorted(i for i in oldest if (i % BATCH) // (BATCH // SHARDS) == s)[:2] for s in range(SHARDS)]
    assert gone == set(per_shard[0] + per_shard[1])
