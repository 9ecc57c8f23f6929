"""Replay policies: one shared contract suite for every policy, then each policy's own promise.

The contract (river style): pure, deterministic under a key, jit-compatible without
recompiling for new mask contents, bounded memory, survives a save/restore round trip,
never samples an empty slot, keeps `class_counts` equal to the held buckets, ignores
masked rows, and adding a batch equals adding its rows one at a time with the same key.
Every policy runs it with class labels (each class its bucket) and with named features
(a dict of a float and an int32 array); reservoir and FIFO also with float32 regression
targets as labels (one bucket).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

from continuity import replay
from continuity.replay.state import COUNT_LIMIT

EXAMPLE_SHAPE = (3,)
NUM_CLASSES = 5
CAPACITY = 12
BATCH = 16
DRAWS = 512  # one static sample size for the whole module: each new size is a compile
FEATURES = jax.ShapeDtypeStruct(EXAMPLE_SHAPE, jnp.float32)
# Named features: the example id in every entry of both, the int32 one kept an integer throughout.
NAMED_FEATURES = {"numeric": FEATURES, "tokens": jax.ShapeDtypeStruct((2,), jnp.int32)}
CLASS_LABEL = jax.ShapeDtypeStruct((), jnp.int32)
TARGET_LABEL = jax.ShapeDtypeStruct((), jnp.float32)


def empty(policy: replay.ReplayPolicy, targets: bool = False, named: bool = False) -> replay.ReplayState:
    """An empty buffer for the module's examples: class labels in NUM_CLASSES buckets, or float targets in one."""
    features = NAMED_FEATURES if named else FEATURES
    return policy.init(features, TARGET_LABEL if targets else CLASS_LABEL, 1 if targets else NUM_CLASSES)


@functools.cache
def compiled(kind: str, targets: bool = False, named: bool = False):
    """(policy, jitted add, jitted sample) for CAPACITY slots, compiled once for the module.

    Compiling is most of this module's run time, so tests share these: one `add` shape
    (BATCH rows) per policy, label kind and feature structure, and one `sample` size
    (DRAWS). A class label is its own bucket; targets all fall in bucket 0.
    """
    policy = replay.make(kind, CAPACITY)

    def add(state, x, y, mask, key):
        return policy.add(state, x, y, mask, key, None if targets else y)

    return policy, jax.jit(add), jax.jit(policy.sample, static_argnums=2)


def expected_labels(ids: np.ndarray, targets: bool = False) -> np.ndarray:
    """The label stream_batch gives example `ids`: id % NUM_CLASSES, or the target id / 4."""
    return (ids / 4).astype(np.float32) if targets else (ids % NUM_CLASSES).astype(np.int32)


def stream_batch(first_id: int, batch: int = BATCH, *, mask=None, labels=None, targets=False, named=False):
    """A batch whose row i is example `first_id + i`: x = the id in every feature (so a held
    row can be traced back to its example), y = expected_labels(id) unless given."""
    ids = np.arange(first_id, first_id + batch)
    x = np.repeat(ids[:, None], EXAMPLE_SHAPE[0], axis=1).astype(np.float32)
    if named:
        x = {"numeric": x, "tokens": np.repeat(ids[:, None], 2, axis=1).astype(np.int32)}
    y = expected_labels(ids, targets) if labels is None else np.asarray(labels, np.int32)
    mask = np.ones(batch, bool) if mask is None else np.asarray(mask, bool)
    return x, y, mask


def numeric(x) -> np.ndarray:
    """The float features of `x` (one array, or the dict's "numeric" array), as NumPy."""
    return np.asarray(x["numeric"] if isinstance(x, dict) else x)


def fill(kind: str, batches: int, *, seed: int = 0, mask_rate: float = 0.0, targets=False, named=False):
    """Offer `batches` batches of the id stream (randomly masked at `mask_rate`)."""
    policy, add, _ = compiled(kind, targets, named)
    state = empty(policy, targets, named)
    rng = np.random.default_rng(seed)
    for b in range(batches):
        x, y, mask = stream_batch(1 + b * BATCH, mask=rng.random(BATCH) >= mask_rate, targets=targets, named=named)
        state = add(state, x, y, mask, jax.random.fold_in(jax.random.key(seed), b))
    return state


def as_numpy(state: replay.ReplayState) -> replay.ReplayState:
    return jax.tree.map(np.asarray, state)


def assert_states_equal(a: replay.ReplayState, b: replay.ReplayState) -> None:
    for name, left, right in zip(replay.ReplayState._fields, a, b):
        for one, other in zip(jax.tree.leaves(left), jax.tree.leaves(right)):
            np.testing.assert_array_equal(np.asarray(one), np.asarray(other), err_msg=name)


def held_ids(state: replay.ReplayState) -> np.ndarray:
    return numeric(state.x)[: int(state.size), 0].astype(int)


KINDS = pytest.mark.parametrize("kind", replay.REPLAY_KINDS)
# The shared contract: every policy with class labels, with class labels and named features,
# and the policies that take float regression targets (all but class-balanced, which shares
# memory out by class) with those.
TARGET_KINDS = ("reservoir", "fifo")
CONTRACT = pytest.mark.parametrize(
    ("kind", "targets", "named"),
    [(kind, False, False) for kind in replay.REPLAY_KINDS]
    + [(kind, False, True) for kind in replay.REPLAY_KINDS]
    + [(kind, True, False) for kind in TARGET_KINDS],
    ids=[
        *replay.REPLAY_KINDS,
        *(f"{kind}-named" for kind in replay.REPLAY_KINDS),
        *(f"{kind}-targets" for kind in TARGET_KINDS),
    ],
)


# --- construction ------------------------------------------------------------------


def test_make_builds_each_kind():
    for kind, builder in zip(replay.REPLAY_KINDS, (replay.reservoir, replay.class_balanced, replay.fifo)):
        policy = replay.make(kind, 5)
        assert policy.capacity == 5
        assert policy.add.__qualname__ == builder(5).add.__qualname__


def test_make_rejects_unknown_kind_naming_allowed_values():
    with pytest.raises(ValueError) as error:
        replay.make("lru", 10)
    message = str(error.value)
    assert "'lru'" in message
    for kind in replay.REPLAY_KINDS:
        assert repr(kind) in message


@pytest.mark.parametrize("capacity", [0, -3, 2.5, True, "8"])
def test_make_rejects_bad_capacity(capacity):
    with pytest.raises(ValueError, match="capacity"):
        replay.make("reservoir", capacity)


def test_init_rejects_bad_arguments():
    policy = replay.fifo(4)
    with pytest.raises(ValueError, match="buckets"):
        policy.init(FEATURES, CLASS_LABEL, 0)
    with pytest.raises(ValueError, match="`example` must describe one example"):
        policy.init((3, -1), CLASS_LABEL, 10)
    with pytest.raises(ValueError, match="`label` must describe one example"):
        policy.init(FEATURES, "int32", 10)


def test_add_rejects_mismatched_batch_shapes():
    policy = replay.reservoir(4)
    state = empty(policy)
    x, y, mask = stream_batch(0, 4)
    with pytest.raises(ValueError, match=r"\(batch, \*\(3,\)\)"):
        policy.add(state, x[:, :2], y, mask, jax.random.key(0))
    with pytest.raises(ValueError, match="mask"):
        policy.add(state, x, y, mask[:3], jax.random.key(0))
    with pytest.raises(ValueError, match="structure"):
        policy.add(state, {"numeric": x}, y, mask, jax.random.key(0))


def test_sample_size_must_be_static():
    policy = replay.reservoir(4)
    state = empty(policy)
    with pytest.raises(ValueError, match="static"):
        jax.jit(policy.sample)(state, jax.random.key(0), 3)


# --- the shared contract -----------------------------------------------------------


@KINDS
def test_init_is_empty_with_documented_shapes(kind):
    policy, _, _ = compiled(kind)
    state = empty(policy)
    assert state.x.shape == (CAPACITY, *EXAMPLE_SHAPE) and state.x.dtype == jnp.float32
    assert state.y.shape == (CAPACITY,) and state.y.dtype == jnp.int32
    assert state.bucket.shape == (CAPACITY,) and state.bucket.dtype == jnp.int32
    for counter in (state.size, state.seen, state.cursor):
        assert counter.shape == () and counter.dtype == jnp.int32 and int(counter) == 0
    assert state.class_counts.shape == (NUM_CLASSES,) and state.class_counts.dtype == jnp.int32
    assert policy.init(jax.ShapeDtypeStruct((2, 2), jnp.bfloat16), CLASS_LABEL, 3).x.dtype == jnp.bfloat16
    named = empty(policy, named=True)
    assert named.x["tokens"].shape == (CAPACITY, 2) and named.x["tokens"].dtype == jnp.int32
    multi_hot = policy.init(FEATURES, jax.ShapeDtypeStruct((4,), jnp.int32), 2)
    assert multi_hot.y.shape == (CAPACITY, 4) and multi_hot.class_counts.shape == (2,)


@CONTRACT
def test_add_is_pure(kind, targets, named):
    policy, add, _ = compiled(kind, targets, named)
    state = fill(kind, 1, targets=targets, named=named)
    before = as_numpy(state)
    x, y, mask = stream_batch(100, targets=targets, named=named)
    after = add(state, x, y, mask, jax.random.key(1))
    assert_states_equal(state, before)  # the input state is untouched
    assert not np.array_equal(numeric(after.x), numeric(before.x))


@CONTRACT
def test_deterministic_under_a_key(kind, targets, named):
    first = fill(kind, 4, seed=3, mask_rate=0.3, targets=targets, named=named)
    assert_states_equal(first, fill(kind, 4, seed=3, mask_rate=0.3, targets=targets, named=named))


@CONTRACT
def test_no_recompilation_across_masks_and_sizes(kind, targets, named):
    """After the first call, new mask contents and a growing buffer reuse the one executable.

    (The check is on growth, not on == 1: every policy's `sample` is the same function,
    and jit shares one cache between wrappers of one function.)
    """
    policy, add, sample = compiled(kind, targets, named)
    state = empty(policy, targets, named)
    masks = [np.zeros(BATCH, bool), np.ones(BATCH, bool), np.arange(BATCH) % 3 == 0, np.arange(BATCH) < 2]
    sizes = None
    for step, mask in enumerate(masks):
        x, y, _ = stream_batch(step * BATCH, targets=targets, named=named)
        state = add(state, x, y, mask, jax.random.key(step))
        sample(state, jax.random.key(step), DRAWS)
        if sizes is None:
            sizes = (add._cache_size(), sample._cache_size())
    assert (add._cache_size(), sample._cache_size()) == sizes
    assert add._cache_size() == 1


@CONTRACT
def test_memory_is_bounded(kind, targets, named):
    policy, add, _ = compiled(kind, targets, named)
    initial = empty(policy, targets, named)
    state = fill(kind, 6, targets=targets, named=named)
    assert int(state.size) == CAPACITY and int(state.seen) == 6 * BATCH
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), initial)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == shapes
    # What a capacity costs is known before a buffer is built (the config's memory check uses it).
    features, label = (NAMED_FEATURES if named else FEATURES), (TARGET_LABEL if targets else CLASS_LABEL)
    held = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    assert replay.buffer_bytes(policy, features, label, 1 if targets else NUM_CLASSES) == held


@CONTRACT
def test_survives_save_and_restore(kind, targets, named):
    """A state written out as plain arrays (as Orbax does) and read back carries on identically."""
    _, add, _ = compiled(kind, targets, named)
    state = fill(kind, 3, mask_rate=0.2, targets=targets, named=named)
    restored = jax.tree.map(jnp.asarray, as_numpy(state))
    x, y, mask = stream_batch(500, targets=targets, named=named)
    key = jax.random.key(9)
    assert_states_equal(add(state, x, y, mask, key), add(restored, x, y, mask, key))


@CONTRACT
def test_filled_slots_are_a_prefix(kind, targets, named):
    policy, add, _ = compiled(kind, targets, named)
    state = empty(policy, targets, named)
    for step, count in enumerate([0, 3, 2, 5]):
        x, y, _ = stream_batch(1 + step * BATCH, targets=targets, named=named)
        state = add(state, x, y, np.arange(BATCH) < count, jax.random.key(step))
        size = int(state.size)
        assert size == min(CAPACITY, int(state.seen))
        for features in jax.tree.leaves(state.x):
            assert np.all(np.asarray(features)[:size] > 0)  # every id is >= 1
            assert np.all(np.asarray(features)[size:] == 0)


@CONTRACT
def test_sample_never_returns_an_empty_slot(kind, targets, named):
    policy, add, sample = compiled(kind, targets, named)
    state = empty(policy, targets, named)
    x, y, _ = stream_batch(1, targets=targets, named=named)
    state = add(state, x, y, np.arange(BATCH) < 3, jax.random.key(0))  # 3 of 8 slots filled
    xs, ys, valid = sample(state, jax.random.key(1), DRAWS)
    assert np.all(np.asarray(valid))
    ids = numeric(xs)[:, 0].astype(int)
    assert set(ids) == {1, 2, 3}  # only inserted examples, and (DRAWS draws) each of them
    np.testing.assert_array_equal(np.asarray(ys), expected_labels(ids, targets))
    np.testing.assert_array_equal(numeric(xs), np.repeat(ids[:, None], 3, axis=1))
    if named:  # the integer feature comes back an integer, row for row
        assert xs["tokens"].dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(xs["tokens"]), np.repeat(ids[:, None], 2, axis=1))


@CONTRACT
def test_sample_from_an_empty_buffer_is_all_invalid_zeros(kind, targets, named):
    policy, add, sample = compiled(kind, targets, named)
    state = empty(policy, targets, named)
    x, y, _ = stream_batch(1, targets=targets, named=named)
    state = add(state, x, y, np.zeros(BATCH, bool), jax.random.key(0))  # all masked: still empty
    xs, ys, valid = sample(state, jax.random.key(1), DRAWS)
    assert numeric(xs).shape == (DRAWS, *EXAMPLE_SHAPE) and ys.shape == (DRAWS,) and valid.shape == (DRAWS,)
    assert not np.any(np.asarray(valid))
    assert not any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(xs)) and not np.any(np.asarray(ys))


@KINDS
def test_class_counts_match_held_labels(kind):
    """Also with labels outside [0, num_classes), which are ignored like masked rows."""
    policy, add, _ = compiled(kind)
    state = empty(policy)
    rng = np.random.default_rng(4)
    offered = np.zeros(NUM_CLASSES, int)
    for step in range(8):
        labels = rng.integers(-1, NUM_CLASSES + 1, BATCH)
        mask = rng.random(BATCH) < 0.7
        x, y, _ = stream_batch(1 + step * BATCH, labels=labels)
        state = add(state, x, y, mask, jax.random.key(step))
        held = np.asarray(state.y)[: int(state.size)]
        np.testing.assert_array_equal(np.asarray(state.class_counts), np.bincount(held, minlength=NUM_CLASSES))
        good = mask & (labels >= 0) & (labels < NUM_CLASSES)
        offered += np.bincount(labels[good], minlength=NUM_CLASSES)
        np.testing.assert_array_equal(np.asarray(state.class_seen), offered)
        assert int(state.seen) == offered.sum()


@CONTRACT
def test_masked_rows_are_never_inserted(kind, targets, named):
    policy, add, _ = compiled(kind, targets, named)
    state = empty(policy, targets, named)
    rng = np.random.default_rng(5)
    offered: set[int] = set()
    for step in range(10):
        x, y, mask = stream_batch(1 + step * BATCH, mask=rng.random(BATCH) < 0.4, targets=targets, named=named)
        state = add(state, x, y, mask, jax.random.key(step))
        offered |= set(numeric(x)[mask, 0].astype(int))
        assert set(held_ids(state)) <= offered
    assert int(state.seen) == len(offered)


@CONTRACT
def test_a_batch_equals_its_rows_added_one_at_a_time(kind, targets, named):
    """Same key, same result, even where several rows of one batch land in one slot.

    Each row's randomness is fold_in(key, n) for its stream position n, so this is
    exact, not just equal in distribution. Rows colliding in a slot must resolve as
    Algorithm R does sequentially: the later row wins.
    """
    policy, add, _ = compiled(kind, targets, named)
    state = empty(policy, targets, named)
    rng = np.random.default_rng(6)
    key = jax.random.key(11)
    rewritten = 0  # writes to a slot that an earlier row of the same batch wrote
    for step in range(5):
        x, y, mask = stream_batch(1 + step * BATCH, mask=rng.random(BATCH) < 0.8, targets=targets, named=named)
        batched = add(state, x, y, mask, key)
        # One row at a time: the same batch with every other row masked out.
        sequential, written = state, set()
        for i in range(BATCH):
            after = add(sequential, x, y, mask & (np.arange(BATCH) == i), key)
            changed = np.flatnonzero(np.any(numeric(after.x) != numeric(sequential.x), axis=1))
            rewritten += len(set(changed) & written)
            written |= set(changed)
            sequential = after
        assert_states_equal(batched, sequential)
        state = batched
    assert rewritten > 0, "the stream should make rows of one batch collide"


@KINDS
def test_counters_saturate_instead_of_overflowing(kind):
    policy, add, _ = compiled(kind)
    state = fill(kind, 1)
    state = state._replace(
        seen=jnp.array(COUNT_LIMIT - 3, jnp.int32),
        class_seen=jnp.full((NUM_CLASSES,), COUNT_LIMIT - 1, jnp.int32),
    )
    for step in range(3):
        x, y, mask = stream_batch(100 + step * BATCH)
        state = add(state, x, y, mask, jax.random.key(step))
    assert int(state.seen) == COUNT_LIMIT
    assert np.all(np.asarray(state.class_seen) == COUNT_LIMIT)
    held = np.asarray(state.y)[: int(state.size)]
    np.testing.assert_array_equal(np.asarray(state.class_counts), np.bincount(held, minlength=NUM_CLASSES))


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_targets_are_stored_as_float32_and_counted_in_one_bucket(kind):
    """No classes: the counters hold one bucket (Orbax cannot save empty arrays) counting every target."""
    policy, _, _ = compiled(kind, True)
    state = empty(policy, True)
    assert state.y.shape == (CAPACITY,) and state.y.dtype == jnp.float32
    for counter in (state.class_counts, state.class_seen, state.full_classes):
        assert counter.shape == (1,)
    state = fill(kind, 3, mask_rate=0.3, targets=True)
    held = numeric(state.x)[: int(state.size), 0]
    np.testing.assert_array_equal(np.asarray(state.y)[: int(state.size)], expected_labels(held, True))
    assert np.asarray(state.class_counts).tolist() == [int(state.size)] == [CAPACITY]
    assert np.asarray(state.class_seen).tolist() == [int(state.seen)]


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_targets_make_the_same_slot_decisions_as_classes(kind):
    """Where an example goes never depends on its label, so both label kinds hold the same ids."""
    assert (
        held_ids(fill(kind, 6, seed=2, mask_rate=0.3, targets=True)).tolist()
        == held_ids(fill(kind, 6, seed=2, mask_rate=0.3)).tolist()
    )


@pytest.mark.parametrize("kind", TARGET_KINDS)
def test_non_finite_targets_are_ignored_like_masked_rows(kind):
    policy, add, _ = compiled(kind, True)
    state = empty(policy, True)
    x, y, mask = stream_batch(1, targets=True)
    y[[2, 5, 9]] = [np.nan, np.inf, -np.inf]
    state = add(state, x, y, mask, jax.random.key(0))
    assert int(state.seen) == BATCH - 3
    assert not {3, 6, 10} & set(held_ids(state))
    assert np.all(np.isfinite(np.asarray(state.y)))


def test_class_balanced_refuses_labels_in_one_bucket():
    with pytest.raises(ValueError, match="2 or more buckets.*'reservoir' or 'fifo'"):
        replay.class_balanced(4).init(FEATURES, TARGET_LABEL, 1)


# --- reservoir -----------------------------------------------------------------------


def held_frequencies(kind: str, seeds: int = 4000, items: int = 100, capacity: int = 10) -> np.ndarray:
    """How often each of `items` distinct examples is held at the end, over `seeds` runs.

    The stream is offered in batches of 16 (the last one padded with masked rows).
    """
    policy = replay.make(kind, capacity)
    batches = math.ceil(items / BATCH)
    ids = np.arange(batches * BATCH)
    x = np.repeat(ids[:, None], EXAMPLE_SHAPE[0], axis=1).astype(np.float32).reshape(batches, BATCH, -1)
    y = (ids % NUM_CLASSES).astype(np.int32).reshape(batches, BATCH)
    mask = (ids < items).reshape(batches, BATCH)

    def run(key):
        def offer(state, batch):
            b, xb, yb, mb = batch
            return policy.add(state, xb, yb, mb, jax.random.fold_in(key, b), yb), None

        state = empty(policy)
        state, _ = jax.lax.scan(offer, state, (jnp.arange(batches), x, y, mask))
        return state.x[:, 0].astype(jnp.int32)

    held = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(2024), seeds))
    return np.bincount(np.asarray(held).ravel(), minlength=items)


def test_reservoir_holds_every_example_with_equal_probability():
    """Vitter's guarantee: each of N items is held with probability capacity / N.

    Chi-square goodness of fit of the held counts against uniform over 4000 seeds; the
    FIFO check below shows the same test does reject a non-uniform policy.
    """
    counts = held_frequencies("reservoir")
    assert counts.sum() == 4000 * 10
    assert chisquare(counts).pvalue > 0.001


def test_uniformity_check_rejects_fifo():
    counts = held_frequencies("fifo")
    assert counts[90:].tolist() == [4000] * 10  # FIFO always holds the newest ten
    assert chisquare(counts).pvalue < 1e-12


def test_reservoir_pinned_outcome():
    """Pins the held ids for a seeded stream (river style): a behaviour change shows up here."""
    state = fill("reservoir", 6, seed=0)
    assert held_ids(state).tolist() == PINNED_RESERVOIR


PINNED_RESERVOIR = [82, 25, 3, 96, 34, 39, 91, 30, 60, 86, 49, 67]  # slot order


# --- FIFO ------------------------------------------------------------------------------


def test_fifo_keeps_exactly_the_newest_examples():
    policy, add, _ = compiled("fifo")
    state = empty(policy)
    rng = np.random.default_rng(7)
    offered: list[int] = []
    for step, rate in enumerate([0.1, 0.5, 1.0, 0.3, 0.0, 0.9, 1.0]):
        x, y, mask = stream_batch(1 + step * BATCH, mask=rng.random(BATCH) < rate)
        state = add(state, x, y, mask, jax.random.key(step))
        offered += x[mask, 0].astype(int).tolist()
        assert sorted(held_ids(state)) == sorted(offered[-CAPACITY:])
        # Ring order: reading from the cursor gives oldest to newest once full.
        if int(state.size) == CAPACITY:
            ring = np.roll(held_ids(state), -int(state.cursor))
            assert ring.tolist() == offered[-CAPACITY:]


# --- class-balanced -------------------------------------------------------------------


def water_filling_holds(held: np.ndarray, seen: np.ndarray) -> bool:
    """The CBRS invariant checked below: with L = max(held), every class c has
    held[c] == seen[c] (it kept all of its examples) or held[c] >= L - 1."""
    largest = held.max()
    return bool(np.all((held == seen) | (held >= largest - 1)))


def test_class_balanced_shares_memory_by_water_filling():
    """Once the buffer is full, for every class c (with L the largest held count):
    held[c] == seen[c] or held[c] >= L - 1, and sum(held) == capacity.

    That is the water-filling allocation within one slot. It implies the looser form
    "no class holds more than ceil(capacity / classes seen) unless some class has seen
    fewer examples than that", also checked. The stream is 90% class 0, and class 4
    arrives twice, so it ends below its fair share and must keep both examples.
    """
    policy, add, _ = compiled("class_balanced")
    state = empty(policy)
    rng = np.random.default_rng(8)
    seen = np.zeros(NUM_CLASSES, int)
    for step in range(30):
        labels = np.where(rng.random(BATCH) < 0.9, 0, rng.choice([1, 1, 1, 2, 2, 3], BATCH))
        if step in (5, 20):
            labels[3] = 4
        mask = (rng.random(BATCH) < 0.9) | (labels == 4)
        x, _, _ = stream_batch(1 + step * BATCH)
        state = add(state, x, labels.astype(np.int32), mask, jax.random.key(step))
        seen += np.bincount(labels[mask], minlength=NUM_CLASSES)
        held = np.asarray(state.class_counts)
        if seen.sum() >= CAPACITY:
            assert held.sum() == CAPACITY
            assert water_filling_holds(held, seen), (held, seen)
            fair = math.ceil(CAPACITY / np.count_nonzero(seen))
            assert held.max() <= fair or np.any(seen < fair)
    assert seen[4] == 2 and held[4] == 2
    assert held[:4].min() >= held.max() - 1  # the frequent classes split the rest evenly


def test_class_balanced_vs_reservoir_on_an_imbalanced_stream():
    """A plain reservoir holds classes in stream proportion; CBRS evens them out."""
    labels = np.where(np.arange(25 * BATCH) % 10 == 0, 1, 0).astype(np.int32)  # 90% class 0
    held = {}
    for kind in ("reservoir", "class_balanced"):
        policy, add, _ = compiled(kind)
        state = empty(policy)
        for b in range(0, labels.size, BATCH):
            x, _, mask = stream_batch(b)
            state = add(state, x, labels[b : b + BATCH], mask, jax.random.key(b))
        held[kind] = np.asarray(state.class_counts).tolist()
    assert held["class_balanced"] == [CAPACITY // 2, CAPACITY // 2, 0, 0, 0]
    assert held["reservoir"][1] < 4


@pytest.mark.parametrize("kind", ["reservoir", "class_balanced"])
def test_old_examples_survive_a_long_balanced_stream(kind):
    """On a class-balanced stream, CBRS keeps old examples as a reservoir does.

    Every class soon becomes "full" and is then sampled by Algorithm R within the class,
    so about half of the buffer still comes from the first half of a 400-example
    stream. (Replacing a largest class's example whenever the new example's class is not
    the largest *right now* would hold almost only the newest examples: that rule is
    not CBRS, and this test is what catches it.)
    """
    old_share = [np.mean(held_ids(fill(kind, 25, seed=seed)) <= 200) for seed in range(8)]
    assert 0.35 < np.mean(old_share) < 0.75


def test_class_balanced_pinned_outcome():
    state = fill("class_balanced", 6, seed=0)
    assert held_ids(state).tolist() == PINNED_CLASS_BALANCED


PINNED_CLASS_BALANCED = [31, 95, 3, 49, 85, 88, 17, 34, 29, 60, 36, 47]  # slot order
