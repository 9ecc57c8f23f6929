"""The replay buffer's state and the pieces every replay policy shares.

A replay buffer is a fixed-capacity block of device arrays plus counters, so it lives
inside the learner's PyTree, is saved whole by Orbax and never changes shape (nothing
recompiles as it fills). A policy is a bundle of pure functions over that state, in the
style of `optax.GradientTransformation`:

    policy = replay.reservoir(capacity=1000)
    state = policy.init(example_shape=(8, 8, 1), num_classes=10)
    state = policy.add(state, x, y, mask, key)      # inside the jitted train step
    x, y, valid = policy.sample(state, key, n=32)   # n is static

Labels are integer classes, or float32 regression targets when `init` gets
num_classes=None: then the class counters have one entry, a single bucket that every
target falls in (length 1, not 0: Orbax refuses to save empty arrays), and only
reservoir and FIFO apply (class-balanced replay needs classes).

Invariants every policy keeps (the shared contract suite in tests/test_replay.py checks
them): the filled slots are always the prefix [0, size), so sampling needs no occupancy
mask; `class_counts` equals the label histogram of the filled prefix; randomness comes
only from the `key` argument.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

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

    x: jax.Array  # shape=(capacity, *example_shape), example dtype. Slots >= size are zeros.
    y: jax.Array  # shape=(capacity,), dtype=int32 (classes) or float32 (regression targets).
    size: jax.Array  # shape=(), dtype=int32: filled slots, always the prefix [0, size).
    seen: jax.Array  # shape=(), dtype=int32: valid examples offered so far, saturating at COUNT_LIMIT.
    class_counts: jax.Array  # shape=(num_classes,), dtype=int32: examples of each class held; (1,) for targets.
    class_seen: jax.Array  # shape=(num_classes,), dtype=int32: valid examples offered per class, saturating.
    cursor: jax.Array  # shape=(), dtype=int32: FIFO's next slot to write (its oldest example once full); 0 for others.
    full_classes: jax.Array  # shape=(num_classes,), dtype=bool: class-balanced's "full" classes; False for others.


class ReplayPolicy(NamedTuple):
    """A replay policy as a bundle of pure, jit-able functions (like optax's transforms).

    init(example_shape, num_classes, dtype=jnp.float32) -> ReplayState
        num_classes None: labels are float32 regression targets (not for class-balanced).
    add(state, x[B, ...], y[B] int32 (or float32 targets), mask[B] bool, key) -> ReplayState
        Rows whose mask is False, or whose label is outside [0, num_classes) (a target:
        not finite), are ignored.
        B may be any static size; different mask contents never recompile. Row i's
        randomness is fold_in(key, n_i) for its stream position n_i, so adding a batch
        equals adding its rows one at a time with the same key; still pass a fresh key
        per call (fold_in(rng, step)), as positions repeat once `seen` saturates.
    sample(state, key, n) -> (x[n, ...], y[n] int32 or float32, valid[n] bool)
        n is a static Python int. Uniform with replacement over the filled slots; never
        returns an empty slot. An empty buffer gives zeros with valid all False.
    """

    init: Callable[..., ReplayState]
    add: Callable[..., ReplayState]
    sample: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    capacity: int


def check_capacity(capacity) -> int:
    """Return `capacity` as an int, or raise ValueError saying what is accepted."""
    if not _is_static_int(capacity) or capacity < 1:
        raise ValueError(f"Replay `capacity` must be an integer >= 1. Got {capacity!r}.")
    return int(capacity)


def _is_static_int(value) -> bool:
    """A Python or NumPy integer (not a bool, not a traced array)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def make_init(capacity: int, *, needs_classes: bool = False) -> Callable[..., ReplayState]:
    """Build the `init` shared by all policies: an empty buffer of `capacity` slots.

    `needs_classes`: the policy works per class, so num_classes=None (regression
    targets) is refused.
    """

    def init(example_shape: tuple[int, ...], num_classes: int | None, dtype=jnp.float32) -> ReplayState:
        shape = tuple(example_shape)
        if not all(_is_static_int(d) and d >= 0 for d in shape):
            raise ValueError(f"`example_shape` must be a tuple of non-negative integers. Got {example_shape!r}.")
        if num_classes is None and needs_classes:
            raise ValueError(
                "this replay policy shares memory out by class and needs `num_classes`; "
                "regression targets (num_classes=None) need 'reservoir' or 'fifo'. Got None."
            )
        if num_classes is not None and (not _is_static_int(num_classes) or num_classes < 1):
            raise ValueError(
                f"`num_classes` must be an integer >= 1, or None for regression targets. Got {num_classes!r}."
            )
        zero = jnp.zeros((), jnp.int32)
        shape = tuple(int(d) for d in shape)
        classes = 1 if num_classes is None else int(num_classes)  # targets: one bucket
        return ReplayState(
            x=jnp.zeros((capacity, *shape), dtype),
            y=jnp.zeros((capacity,), jnp.int32 if num_classes is not None else jnp.float32),
            size=zero,
            seen=zero,
            class_counts=jnp.zeros((classes,), jnp.int32),
            class_seen=jnp.zeros((classes,), jnp.int32),
            cursor=zero,
            full_classes=jnp.zeros((classes,), bool),
        )

    return init


def holds_classes(state: ReplayState) -> bool:
    """True when labels are integer classes; False for float regression targets (static)."""
    return jnp.issubdtype(state.y.dtype, jnp.integer)


def _buckets(labels: jax.Array) -> jax.Array:
    """The class counter each label counts in: the class itself, or bucket 0 for every target."""
    return labels if jnp.issubdtype(labels.dtype, jnp.integer) else jnp.zeros(labels.shape, jnp.int32)


def valid_rows(state: ReplayState, x, y, mask) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Check a batch's static shapes against the buffer; return (x, y, valid) ready to store.

    Shapes are static, so a mismatch raises here at trace time with a message naming
    both shapes, instead of an opaque broadcasting error deep inside a scatter.
    A row is valid when its mask is set and its label indexes `class_counts`: the codec
    dead-letters bad labels before they get here, and dropping any that slip through
    keeps `class_counts` equal to the held labels (a scatter-add would silently lose them).
    A regression target is valid when it is finite.
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    mask = jnp.asarray(mask)
    example_shape = state.x.shape[1:]
    if x.ndim < 1 or x.shape[1:] != example_shape:
        raise ValueError(f"Replay `x` must have shape (batch, *{example_shape}) to match the buffer. Got {x.shape}.")
    batch = x.shape[0]
    if y.shape != (batch,) or mask.shape != (batch,):
        raise ValueError(
            f"Replay `y` and `mask` must have shape ({batch},) to match `x`. Got y {y.shape} and mask {mask.shape}."
        )
    if not holds_classes(state):
        y = y.astype(state.y.dtype)
        return x.astype(state.x.dtype), y, mask.astype(bool) & jnp.isfinite(y)
    num_classes = state.class_counts.shape[0]
    y = y.astype(jnp.int32)
    valid = mask.astype(bool) & (y >= 0) & (y < num_classes)
    return x.astype(state.x.dtype), y, valid


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


def class_histogram(y: jax.Array, valid: jax.Array, num_classes: int) -> jax.Array:
    """Count the valid rows of each class: shape=(num_classes,), int32 (targets: all in bucket 0)."""
    labels = jnp.where(valid, _buckets(y), num_classes)
    return jnp.zeros((num_classes,), jnp.int32).at[labels].add(1, mode="drop")


def write_rows(state: ReplayState, slots: jax.Array, x: jax.Array, y: jax.Array) -> ReplayState:
    """Store row i of (x, y) in slot `slots[i]`; slots >= capacity are dropped.

    `slots` must hold no duplicates, dropped rows included (give them distinct
    out-of-range indices such as capacity + i): XLA leaves the winner among duplicate
    scatter indices unspecified, so policies resolve collisions before calling this,
    and uniqueness lets the scatter skip atomics on accelerators.
    Updates `class_counts`; `size`, `seen` and the cursor are the caller's.
    """
    capacity, num_classes = state.y.shape[0], state.class_counts.shape[0]
    written = slots < capacity
    # A written slot below the old size held an example that is now evicted.
    evicted = written & (slots < state.size)
    evicted_labels = _buckets(state.y[jnp.minimum(slots, capacity - 1)])
    counts = state.class_counts.at[jnp.where(evicted, evicted_labels, num_classes)].add(-1, mode="drop")
    counts = counts.at[jnp.where(written, _buckets(y), num_classes)].add(1, mode="drop")
    return state._replace(
        x=state.x.at[slots].set(x, mode="drop", unique_indices=True),
        y=state.y.at[slots].set(y, mode="drop", unique_indices=True),
        class_counts=counts,
    )


def sample_uniform(state: ReplayState, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw `n` held examples uniformly with replacement: (x[n, ...], y[n], valid[n]).

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
    x = state.x[index]
    x = jnp.where(valid.reshape((n,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
    y = jnp.where(valid, state.y[index], 0)
    return x, y, valid
