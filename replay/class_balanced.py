"""Class-balanced replay: the buffer's memory is shared out evenly between classes.

Chrysakis & Moens (2020), "Online Continual Learning from Imbalanced Data" (ICML),
class-balancing reservoir sampling (CBRS). A plain reservoir holds classes in the
proportion the stream delivered them, so a class that is 90% of the stream takes 90% of
the memory and rare classes are forgotten. CBRS appends while the buffer has room;
once it is full, a class becomes *full* as soon as it is among the largest in memory,
and stays full. Then:

- an example of a class that is not full replaces a random held example of a largest
  class (ties between largest classes broken at random);
- an example of a full class c replaces a random held example of c with probability
  m_c / n_c (held / seen of class c): Algorithm R within the class (Vitter 1985), so
  the held examples of c stay a uniform sample of the c stream.

Why "has been largest" and not "is largest now": on a balanced stream (every segment
of permuted- or rotated-digits holds all ten classes) the largest class changes with
almost every example, and the "is largest now" rule would send most examples down the
first branch, replacing held examples at random regardless of age. That forgets old
segments nearly as fast as FIFO. With the paper's rule every class soon becomes full
and the buffer is a per-class reservoir over the whole stream.

Either way the result is the water-filling allocation within one slot: with L the
largest held count, every class either holds every example of it seen so far (it never
became full), or holds at least L - 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from continuity.replay.state import (
    ReplayPolicy,
    ReplayState,
    check_capacity,
    make_init,
    offer_numbers,
    sample_uniform,
    saturating_add,
    valid_rows,
)


def _pick_uniform(candidates: jax.Array, key: jax.Array) -> jax.Array:
    """Index of a uniformly chosen True entry of the bool vector `candidates`.

    Draws a rank r in [0, count) and returns the position of the (r+1)-th True entry:
    exact and integer-only (an argmax over random floats can tie). Returns 0 when
    nothing is True; callers only use the result when something is.
    """
    count = jnp.sum(candidates, dtype=jnp.int32)
    rank = jax.random.randint(key, (), 0, jnp.maximum(count, 1))
    running = jnp.cumsum(candidates, dtype=jnp.int32)
    return jnp.argmax(candidates & (running == rank + 1))


def class_balanced(capacity: int) -> ReplayPolicy:
    """Class-balancing reservoir sampling (CBRS, Chrysakis & Moens 2020)."""
    capacity = check_capacity(capacity)

    def add(state: ReplayState, x, y, mask, key, bucket=None) -> ReplayState:
        x, y, bucket, valid = valid_rows(state, x, y, mask, bucket)
        num_classes = state.class_counts.shape[0]
        # Each decision depends on the counts the previous row left behind, so rows are
        # processed in order with a scan; a row's randomness comes from fold_in(key, n_i),
        # as in the reservoir, so a batch equals its rows added one at a time.
        offered = offer_numbers(state, valid)
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, offered)

        def offer(buffer: ReplayState, row):
            xi, yi, bi, vi, ki = row
            class_key, slot_key, accept_key = jax.random.split(ki, 3)
            label = jnp.where(vi, bi, 0)  # the row's class; a safe index for ignored rows
            class_seen = saturating_add(buffer.class_seen, vi & (jnp.arange(num_classes) == label))
            counts = buffer.class_counts
            full = buffer.size >= capacity
            is_largest = counts == jnp.max(counts)
            full_classes = buffer.full_classes | (is_largest & full & vi)
            own_class_full = full_classes[label]
            # A class that is not full takes a slot from a largest class; a full class
            # competes only with itself (Algorithm R within the class: accept w.p. m_c / n_c).
            victim_class = jnp.where(own_class_full, label, _pick_uniform(is_largest, class_key))
            victim_slot = _pick_uniform(buffer.bucket == victim_class, slot_key)
            draw = jax.random.randint(accept_key, (), 0, jnp.maximum(class_seen[label], 1))
            accept = ~own_class_full | (draw < counts[label])
            slot = jnp.where(full, jnp.where(accept, victim_slot, capacity), buffer.size)
            written = vi & (slot < capacity)
            evicted = written & full
            counts = counts.at[buffer.bucket[jnp.minimum(slot, capacity - 1)]].add(-evicted.astype(jnp.int32))
            counts = counts.at[label].add(written.astype(jnp.int32))
            slot = jnp.where(written, slot, capacity)  # out of range: the scatter drops it
            return buffer._replace(
                x=jax.tree.map(lambda stored, value: stored.at[slot].set(value, mode="drop"), buffer.x, xi),
                y=buffer.y.at[slot].set(yi, mode="drop"),
                bucket=buffer.bucket.at[slot].set(label, mode="drop"),
                size=buffer.size + (written & ~full).astype(jnp.int32),
                class_counts=counts,
                class_seen=class_seen,
                full_classes=full_classes,
            ), None

        state, _ = jax.lax.scan(offer, state, (x, y, bucket, valid, row_keys))
        return state._replace(seen=saturating_add(state.seen, jnp.sum(valid, dtype=jnp.int32)))

    return ReplayPolicy(init=make_init(capacity, min_buckets=2), add=add, sample=sample_uniform, capacity=capacity)
