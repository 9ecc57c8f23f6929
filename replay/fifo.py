"""FIFO replay: the buffer holds the newest `capacity` examples of the stream.

A ring buffer. It is the baseline the other policies are measured against: it forgets
an old segment as soon as `capacity` newer examples have arrived, which is exactly the
failure replay exists to prevent, but it tracks the current distribution closely.
"""

from __future__ import annotations

import jax.numpy as jnp

from continuity.replay.state import (
    ReplayPolicy,
    ReplayState,
    check_capacity,
    class_histogram,
    make_init,
    sample_uniform,
    saturating_add,
    valid_rows,
    write_rows,
)


def fifo(capacity: int) -> ReplayPolicy:
    """Keep the newest `capacity` examples (ring buffer; `key` is accepted and unused)."""
    capacity = check_capacity(capacity)

    def add(state: ReplayState, x, y, mask, key, bucket=None) -> ReplayState:
        del key  # FIFO is deterministic; the argument keeps the policy interface uniform.
        x, y, bucket, valid = valid_rows(state, x, y, mask, bucket)
        batch = y.shape[0]
        rank = jnp.cumsum(valid, dtype=jnp.int32) - 1  # order of each valid row in the batch
        total = jnp.sum(valid, dtype=jnp.int32)
        # With more than `capacity` valid rows, only the newest `capacity` survive; the
        # older ones are dropped up front rather than left as colliding scatter indices.
        kept = valid & (rank >= total - capacity)
        # While filling, cursor == size, so writes extend the prefix [0, size); once full
        # the cursor points at the oldest example, which the next write replaces.
        slots = jnp.where(kept, (state.cursor + rank) % capacity, capacity + jnp.arange(batch))
        state = write_rows(state, slots, x, y, bucket)
        return state._replace(
            size=jnp.minimum(state.size + total, capacity),
            seen=saturating_add(state.seen, total),
            class_seen=saturating_add(state.class_seen, class_histogram(bucket, valid, state.class_seen.shape[0])),
            cursor=(state.cursor + total) % capacity,
        )

    return ReplayPolicy(init=make_init(capacity), add=add, sample=sample_uniform, capacity=capacity)
