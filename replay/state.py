"""The replay buffer's state and the pieces every replay policy shares.

A replay buffer is a fixed-capacity block of device arrays plus counters, so it lives
inside the learner's PyTree, is saved whole by Orbax and never changes shape (nothing
recompiles as it fills). A policy is a bundle of pure functions over that state, in the
style of `optax.GradientTransformation`:

    policy = replay.reservoir(capacity=1000)
    state = policy.init(example=jax.ShapeDtypeStruct((8, 8, 1), jnp.float32),
                        label=jax.ShapeDtypeStruct((), jnp.int32), buckets=10)
    state = policy.add(state, x, y, mask, key, bucket=y)   # inside the jitted train step
    x, y, valid = policy.sample(state, key, n=32)           # n is static

An example's features are one array or any PyTree of arrays (a dict of named fields, of
any dtype: integer token ids stay integers); a label is an array of any shape and dtype.
Each stored example also carries a *bucket*, the counter it counts in: its class for
classification, which class-balanced replay shares memory out by; labels without classes
(regression targets, multi-hot vectors) all fall in one bucket. The counters have
`buckets` entries (at least 1: Orbax refuses to save empty arrays).

Invariants every policy keeps (the shared contract suite in tests/test_replay.py checks
them): the filled slots are always the prefix [0, size), so sampling needs no occupancy
mask; `class_counts` equals the bucket histogram of the filled prefix; randomness comes
only from the `key` argument.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Counters saturate here instead of wrapping. An always-on service offering ~10k
# examples/s would overflow int32 (2**31 - 1) in under three days, and a wrapped
# negative count would break every probability computed from it. At 2**30 the
# saturated count still leaves headroom for `count + batch_size` in int32, and the
# only effect of saturating is that reservoir acceptance stops shrinking (capacity /
# 2**30 is already ~1e-6 per example for a 1000-slot buffer).
COUNT_LIMIT = 2**30


class ReplayState(NamedTuple):
    """A replay buffer: fixed-capacity example storage plus the counters policies need."""

    x: Any  # PyTree of arrays, each shape=(capacity, *feature_shape), the feature's dtype. Slots >= size are zeros.
    y: jax.Array  # shape=(capacity, *label_shape), the label's dtype.
    bucket: jax.Array  # shape=(capacity,), dtype=int32: the counter each held example counts in (its class).
    size: jax.Array  # shape=(), dtype=int32: filled slots, always the prefix [0, size).
    seen: jax.Array  # shape=(), dtype=int32: valid examples offered so far, saturating at COUNT_LIMIT.
    class_counts: jax.Array  # shape=(buckets,), dtype=int32: examples of each bucket held.
    class_seen: jax.Array  # shape=(buckets,), dtype=int32: valid examples offered per bucket, saturating.
    cursor: jax.Array  # shape=(), dtype=int32: FIFO's next slot to write (its oldest example once full); 0 for others.
    full_classes: jax.Array  # shape=(buckets,), dtype=bool: class-balanced's "full" buckets; False for others.


class ReplayPolicy(NamedTuple):
    """A replay policy as a bundle of pure, jit-able functions (like optax's transforms).

    init(example, label, buckets=1) -> ReplayState
        `example`: one example's features, a jax.ShapeDtypeStruct (anything with shape and
        dtype) or a PyTree of them; `label`: one example's label, likewise. `buckets`: the
        number of label buckets (classes) counted; class-balanced replay needs 2 or more.
    add(state, x, y, mask, key, bucket=None) -> ReplayState
        x: the PyTree of features with a leading batch axis B; y[B, ...]; mask[B] bool;
        bucket[B] int32, each row's bucket (None: all in bucket 0). Rows whose mask is
        False, whose bucket is outside [0, buckets), or whose float label is not finite,
        are ignored. B may be any static size; different mask contents never recompile.
        Row i's randomness is fold_in(key, n_i) for its stream position n_i, so adding a
        batch equals adding its rows one at a time with the same key; still pass a fresh
        key per call (fold_in(rng, step)), as positions repeat once `seen` saturates.
    sample(state, key, n) -> (x[n, ...], y[n, ...], valid[n] bool)
        n is a static Python int. Uniform with replacement over the filled slots; never
        returns an empty slot. An empty buffer gives zeros with valid all False.
    capacity: the examples it holds in all.
    shards: 1, or the shards of a buffer split per device (replay/sharded.py), every state
        leaf then with a leading shard axis.
    """

    init: Callable[..., ReplayState]
    add: Callable[..., ReplayState]
    sample: Callable[..., tuple[Any, jax.Array, jax.Array]]
    capacity: int
    shards: int = 1


def check_capacity(capacity) -> int:
    """Return `capacity` as an int, or raise ValueError saying what is accepted."""
    if not _is_static_int(capacity) or capacity < 1:
        raise ValueError(f"Replay `capacity` must be an integer >= 1. Got {capacity!r}.")
    return int(capacity)


def _is_static_int(value) -> bool:
    """A Python or NumPy integer (not a bool, not a traced array)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _spec(name: str, value) -> tuple[tuple[int, ...], jnp.dtype]:
    """(shape, dtype) of one feature or label spec, or ValueError naming what is wrong."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or not all(_is_static_int(d) and d >= 0 for d in shape):
        raise ValueError(
            f"`{name}` must describe one example: a jax.ShapeDtypeStruct with a shape of non-negative "
            f"integers (or a PyTree of them). Got {value!r}."
        )
    return tuple(int(d) for d in shape), jnp.dtype(dtype)


def _is_spec(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def make_init(capacity: int, *, min_buckets: int = 1) -> Callable[..., ReplayState]:
    """Build the `init` shared by all policies: an empty buffer of `capacity` slots.

    `min_buckets`: the policy works per bucket (class) and refuses fewer.
    """

    def init(example, label, buckets: int = 1) -> ReplayState:
        leaves, treedef = jax.tree.flatten(example, is_leaf=_is_spec)
        if not leaves:
            raise ValueError(f"`example` must describe at least one feature array. Got {example!r}.")
        features = [_spec("example", leaf) for leaf in leaves]
        label_shape, label_dtype = _spec("label", label)
        if not _is_static_int(buckets) or buckets < 1:
            raise ValueError(f"`buckets` must be an integer >= 1 (the number of label classes). Got {buckets!r}.")
        if buckets < min_buckets:
            raise ValueError(
                f"this replay policy shares memory out by class and needs labels in {min_buckets} or more "
                f"buckets (classes); labels without classes (regression targets, multi-hot labels) need "
                f"'reservoir' or 'fifo'. Got {buckets} bucket(s)."
            )
        zero = jnp.zeros((), jnp.int32)
        return ReplayState(
            x=jax.tree.unflatten(treedef, [jnp.zeros((capacity, *shape), dtype) for shape, dtype in features]),
            y=jnp.zeros((capacity, *label_shape), label_dtype),
            bucket=jnp.zeros((capacity,), jnp.int32),
            size=zero,
            seen=zero,
            class_counts=jnp.zeros((buckets,), jnp.int32),
            class_seen=jnp.zeros((buckets,), jnp.int32),
            cursor=zero,
            full_classes=jnp.zeros((buckets,), bool),
        )

    return init


def buffer_bytes(policy: ReplayPolicy, example, label, buckets: int = 1) -> int:
    """The bytes `policy.init(example, label, buckets)` allocates, counted without allocating them
    (`jax.eval_shape`): what a capacity costs, for checking it against memory before a buffer is built."""
    shapes = jax.eval_shape(lambda: policy.init(example, label, buckets))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def rows_where(mask: jax.Array, value: jax.Array, other) -> jax.Array:
    """`value` where the row's `mask` is set, else `other`, for rows of any shape (mask: shape (B,))."""
    return jnp.where(mask.reshape(mask.shape + (1,) * (value.ndim - 1)), value, jnp.asarray(other, value.dtype))


def valid_rows(state: ReplayState, x, y, mask, bucket) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    """Check a batch's static shapes against the buffer; return (x, y, bucket, valid) ready to store.

    Shapes are static, so a mismatch raises here at trace time with a message naming
    both shapes, instead of an opaque broadcasting error deep inside a scatter.
    A row is valid when its mask is set, its bucket indexes `class_counts` and its label,
    if a float, is finite: the codec dead-letters bad labels before they get here, and
    dropping any that slip through keeps `class_counts` equal to the held buckets (a
    scatter-add would silently lose them).
    """
    y = jnp.asarray(y)
    mask = jnp.asarray(mask)
    leaves, treedef = jax.tree.flatten(x)
    held, held_treedef = jax.tree.flatten(state.x)
    if str(treedef) != str(held_treedef):
        raise ValueError(f"Replay `x` must have the buffer's structure {held_treedef}. Got {treedef}.")
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    batch = leaves[0].shape[0] if leaves[0].ndim else -1
    for leaf, stored in zip(leaves, held):
        if leaf.ndim < 1 or leaf.shape[1:] != stored.shape[1:] or leaf.shape[0] != batch:
            raise ValueError(
                f"Replay `x` must have shape (batch, *{stored.shape[1:]}) to match the buffer. Got {leaf.shape}."
            )
    if y.shape != (batch, *state.y.shape[1:]) or mask.shape != (batch,):
        raise ValueError(
            f"Replay `y` and `mask` must have shapes ({batch}, *{state.y.shape[1:]}) and ({batch},) to match `x`. "
            f"Got y {y.shape} and mask {mask.shape}."
        )
    bucket = jnp.zeros((batch,), jnp.int32) if bucket is None else jnp.asarray(bucket).astype(jnp.int32)
    if bucket.shape != (batch,):
        raise ValueError(f"Replay `bucket` must have shape ({batch},) to match `x`. Got {bucket.shape}.")
    y = y.astype(state.y.dtype)
    buckets = state.class_counts.shape[0]
    valid = mask.astype(bool) & (bucket >= 0) & (bucket < buckets)
    if jnp.issubdtype(y.dtype, jnp.floating):
        valid = valid & jnp.all(jnp.isfinite(y.reshape(batch, -1)), axis=1)
    x = jax.tree.unflatten(treedef, [leaf.astype(stored.dtype) for leaf, stored in zip(leaves, held)])
    return x, y, bucket, valid


def offer_numbers(state: ReplayState, valid: jax.Array) -> jax.Array:
    """The running count n_i of each row: valid row i is the n_i-th example ever offered.

    Policies draw row i's randomness from `fold_in(key, n_i)`, so a draw depends only on
    the key and the example's place in the stream, not on batch size or padding: adding
    a batch at once equals adding its rows one at a time with the same key.
    """
    return state.seen + jnp.cumsum(valid, dtype=jnp.int32)


def saturating_add(count: jax.Array, increment: jax.Array) -> jax.Array:
    """`count + increment` held at COUNT_LIMIT (see COUNT_LIMIT for why)."""
    return jnp.minimum(count + increment.astype(jnp.int32), COUNT_LIMIT)


def class_histogram(bucket: jax.Array, valid: jax.Array, buckets: int) -> jax.Array:
    """Count the valid rows of each bucket: shape=(buckets,), int32."""
    return jnp.zeros((buckets,), jnp.int32).at[jnp.where(valid, bucket, buckets)].add(1, mode="drop")


def write_rows(state: ReplayState, slots: jax.Array, x, y: jax.Array, bucket: jax.Array) -> ReplayState:
    """Store row i of (x, y, bucket) in slot `slots[i]`; slots >= capacity are dropped.

    `slots` must hold no duplicates, dropped rows included (give them distinct
    out-of-range indices such as capacity + i): XLA leaves the winner among duplicate
    scatter indices unspecified, so policies resolve collisions before calling this,
    and uniqueness lets the scatter skip atomics on accelerators.
    Updates `class_counts`; `size`, `seen` and the cursor are the caller's.
    """
    capacity, buckets = state.bucket.shape[0], state.class_counts.shape[0]
    written = slots < capacity
    # A written slot below the old size held an example that is now evicted.
    evicted = written & (slots < state.size)
    evicted_buckets = state.bucket[jnp.minimum(slots, capacity - 1)]
    counts = state.class_counts.at[jnp.where(evicted, evicted_buckets, buckets)].add(-1, mode="drop")
    counts = counts.at[jnp.where(written, bucket, buckets)].add(1, mode="drop")

    def scatter(stored, rows):
        return stored.at[slots].set(rows, mode="drop", unique_indices=True)

    return state._replace(
        x=jax.tree.map(scatter, state.x, x),
        y=scatter(state.y, y),
        bucket=scatter(state.bucket, bucket),
        class_counts=counts,
    )


def sample_uniform(state: ReplayState, key: jax.Array, n: int) -> tuple[Any, jax.Array, jax.Array]:
    """Draw `n` held examples uniformly with replacement: (x[n, ...], y[n, ...], valid[n]).

    Indices come from [0, size), the filled prefix, so an empty slot is never returned.
    When the buffer is empty every row is zeros and `valid` is all False, so the caller
    can mask the replay half of its loss without a host-side branch.
    """
    if not _is_static_int(n) or n < 0:
        raise ValueError(
            f"Replay sample size `n` must be a static non-negative Python int "
            f"(under jax.jit mark it static, e.g. static_argnums=2). Got {n!r}."
        )
    n = int(n)
    index = jax.random.randint(key, (n,), 0, jnp.maximum(state.size, 1))
    valid = jnp.broadcast_to(state.size > 0, (n,))
    x = jax.tree.map(lambda stored: rows_where(valid, stored[index], 0), state.x)
    y = rows_where(valid, state.y[index], 0)
    return x, y, valid
