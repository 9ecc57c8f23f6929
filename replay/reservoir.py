"""Reservoir replay: every example offered so far is held with equal probability.

Vitter (1985), "Random sampling with a reservoir", Algorithm R: the n-th example goes
to slot n - 1 while n <= capacity; after that it replaces slot j ~ U{0, ..., n - 1}
when j < capacity and is dropped otherwise. Each held set of `capacity` examples is
then a uniform sample of the stream, so old segments keep their share of the buffer
however long the service runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from continuity.replay.state import (
    ReplayPolicy,
    ReplayState,
    check_capacity,
    class_histogram,
    make_init,
    offer_numbers,
    sample_uniform,
    saturating_add,
    valid_rows,
    write_rows,
)


def reservoir(capacity: int) -> ReplayPolicy:
    """Uniform reservoir sampling over the whole stream (Vitter 1985, Algorithm R)."""
    capacity = check_capacity(capacity)

    def add(state: ReplayState, x, y, mask, key, bucket=None) -> ReplayState:
        # Vectorised Algorithm R. Where the n-th example goes (slot n - 1, or slot
        # j ~ U{0..n-1} if j < capacity) never depends on the buffer's contents, so all
        # rows' slots are drawn at once. Only rows of one batch that land in the same
        # slot need the sequential order, in which the later row overwrites the earlier.
        x, y, bucket, valid = valid_rows(state, x, y, mask, bucket)
        batch = y.shape[0]
        offered = offer_numbers(state, valid)  # n_i: row i is the n_i-th example offered
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, offered)
        draw = jax.vmap(lambda k, n: jax.random.randint(k, (), 0, jnp.maximum(n, 1)))(row_keys, offered)
        slot = jnp.where(offered <= capacity, offered - 1, draw)
        rows = jnp.arange(batch)
        kept = valid & (slot < capacity)
        # Row i loses its slot when a later kept row of this batch targets the same slot.
        later = rows[None, :] > rows[:, None]
        overwritten = jnp.any((slot[:, None] == slot[None, :]) & later & kept[None, :], axis=1)
        kept = kept & ~overwritten
        # Dropped rows get distinct out-of-range slots so the scatter's indices are unique.
        slots = jnp.where(kept, slot, capacity + rows)
        state = write_rows(state, slots, x, y, bucket)
        total = jnp.sum(valid, dtype=jnp.int32)
        return state._replace(
            size=jnp.minimum(state.size + total, capacity),
            seen=saturating_add(state.seen, total),
            class_seen=saturating_add(state.class_seen, class_histogram(bucket, valid, state.class_seen.shape[0])),
        )

    return ReplayPolicy(init=make_init(capacity), add=add, sample=sample_uniform, capacity=capacity)
