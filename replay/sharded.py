"""A replay buffer split into shards, one per device, each sampling only its own examples.

`sharded(policy, shards)` runs `shards` copies of a policy side by side: its state is the
policy's `ReplayState` with a leading shard axis (every leaf shape (shards, ...)), and
`init` / `add` / `sample` are `jax.vmap`s of the policy's over that axis. A batch's rows
(B, ...) are dealt out in contiguous blocks: shard s takes rows [s * B/shards, (s + 1) *
B/shards), the rows a data-parallel mesh puts on its device s, with its own key
(fold_in(key, s)). `sample(n)` draws n/shards rows from each shard and lays them out the same
way, shard 0's first. Laid out on a mesh with the shard axis on the devices
(learner/devices.py), each device inserts and samples its own shard and no row crosses
between devices.

What capacity then means: `policy.capacity` is one shard's; the buffer holds `shards` times
that in all (`capacity` of the sharded policy is the total). Each shard keeps its policy's
guarantee over the rows it was offered: a reservoir shard is a uniform sample of its devices'
share of the stream, a class-balanced shard balances its own classes, a FIFO shard holds its
newest rows. Sampling is uniform within each shard and equal across shards, so it is not the
one-buffer draw: a run with a sharded buffer replays other rows than one device would.

`reshard(state, shards)` re-deals a host copy of a buffer of any layout to `shards` shards (1:
one buffer, no shard axis), for a checkpoint restored onto another device count or layout.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from continuity.replay.state import COUNT_LIMIT, ReplayPolicy, ReplayState


def _shard_keys(key: jax.Array, shards: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(shards))


def sharded(policy: ReplayPolicy, shards: int) -> ReplayPolicy:
    """`shards` copies of `policy` (its capacity per shard), each fed its own block of every batch
    (one shard: the policy itself)."""
    if not isinstance(shards, numbers.Integral) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"Replay `shards` must be an integer >= 1. Got {shards!r}.")
    if policy.shards != 1:
        raise ValueError(f"the replay policy is sharded already ({policy.shards} shards).")
    shards = int(shards)
    if shards == 1:
        return policy

    @functools.wraps(policy.init)
    def init(example, label, buckets: int = 1) -> ReplayState:
        one = policy.init(example, label, buckets)
        return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (shards, *leaf.shape)), one)

    # Wrapped: the sharded add keeps the policy's name, which is what a learner's description
    # records (the layout, like the device count, does not change what the policy is).
    @functools.wraps(policy.add)
    def add(state: ReplayState, x, y, mask, key, bucket=None) -> ReplayState:
        mask = jnp.asarray(mask)
        batch = mask.shape[0] if mask.ndim else -1
        rows = [jnp.asarray(leaf) for leaf in (*jax.tree.leaves(x), y)]
        if batch < 0 or batch % shards or any(leaf.ndim < 1 or leaf.shape[0] != batch for leaf in rows):
            raise ValueError(
                f"Replay `x`, `y` and `mask` of a {shards}-shard buffer must share a leading batch axis that "
                f"divides by {shards}. Got mask {mask.shape} and leading axes {[r.shape[:1] for r in rows]}."
            )
        bucket = jnp.zeros((batch,), jnp.int32) if bucket is None else jnp.asarray(bucket)

        def split(leaf):
            leaf = jnp.asarray(leaf)
            return leaf.reshape((shards, batch // shards, *leaf.shape[1:]))

        return jax.vmap(policy.add)(
            state, jax.tree.map(split, x), split(y), split(mask), _shard_keys(key, shards), split(bucket)
        )

    def sample(state: ReplayState, key: jax.Array, n: int) -> tuple[Any, jax.Array, jax.Array]:
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            policy.sample(jax.tree.map(lambda leaf: leaf[0], state), key, n)  # raises the policy's own error
        per = -(-int(n) // shards)  # n / shards from each; a draw that does not divide keeps the first n
        drawn = jax.vmap(lambda one, k: policy.sample(one, k, per))(state, _shard_keys(key, shards))
        return jax.tree.map(lambda leaf: leaf.reshape((shards * per, *leaf.shape[2:]))[:n], drawn)

    sample.__doc__ = policy.sample.__doc__
    return ReplayPolicy(init=init, add=add, sample=sample, capacity=policy.capacity * shards, shards=shards)


def shard_count(state: ReplayState) -> int:
    """The shards a buffer's state holds: 1 for one buffer (no shard axis)."""
    size = np.shape(state.size)
    return int(size[0]) if size else 1


def reshard(state: ReplayState, shards: int) -> ReplayState:
    """A host (NumPy) copy of `state`, of any layout, re-dealt to `shards` shards of the same total
    capacity (1: one buffer without a shard axis).

    The held examples (each shard's filled prefix; a full FIFO shard's from its oldest) are
    joined oldest first, the old shards interleaved, and dealt out round robin: every new shard
    holds a like share of every old one, in the order of age (what a FIFO evicts by). The
    counters follow: `class_counts` from the dealt buckets; `seen` and `class_seen`, the
    examples offered, split evenly (a reservoir's acceptance odds stay what they were); a
    class full in any old shard is full in every new one; the FIFO cursor after the newest row.
    Raises ValueError when the total capacity does not divide by `shards`.
    """
    old = shard_count(state)
    lead = (lambda leaf: np.asarray(leaf)) if old > 1 else (lambda leaf: np.asarray(leaf)[None])
    host: Any = ReplayState(*(jax.tree.map(lead, field) for field in state))  # NumPy leaves
    total = host.bucket.shape[0] * host.bucket.shape[1]
    if total % shards:
        raise ValueError(f"a replay buffer of {total} slots cannot be split into {shards} equal shards.")
    per = total // shards

    # The held rows, oldest first within each old shard (a full FIFO shard's from its cursor),
    # interleaved by age: every old shard's oldest, then every one's second oldest, and so on.
    order = []
    for s in range(old):
        size, cursor = int(host.size[s]), int(host.cursor[s])
        ages = np.arange(size) if size < host.bucket.shape[1] else (cursor + np.arange(size)) % size
        order += [(rank, s, slot) for rank, slot in enumerate(ages)]
    order.sort()
    shard_of, slot_of = np.array([s for _, s, _ in order], int), np.array([slot for *_, slot in order], int)

    def held(leaf: np.ndarray) -> np.ndarray:
        return leaf[shard_of, slot_of]

    deal = [np.arange(s, len(order), shards) for s in range(shards)]  # held row i to shard i % shards

    def dealt(leaf: np.ndarray) -> np.ndarray:
        rows = held(leaf)
        out = np.zeros((shards, per, *leaf.shape[2:]), leaf.dtype)
        for s, index in enumerate(deal):
            out[s, : len(index)] = rows[index]
        return out

    def split_evenly(count: np.ndarray) -> np.ndarray:
        """(shards, ...) int32: `count` (summed over the old shards) in `shards` near-equal parts."""
        whole = np.minimum(count.sum(axis=0, dtype=np.int64), COUNT_LIMIT)
        parts = np.stack([(whole + shards - 1 - s) // shards for s in range(shards)])
        return parts.astype(np.int32)

    buckets = host.class_counts.shape[1]
    bucket = dealt(host.bucket)
    sizes = np.array([len(index) for index in deal], np.int32)
    counts = np.stack([np.bincount(bucket[s, : sizes[s]], minlength=buckets) for s in range(shards)])
    fields: dict[str, Any] = dict(
        x=jax.tree.map(dealt, host.x),
        y=dealt(host.y),
        bucket=bucket,
        size=sizes,
        seen=split_evenly(host.seen),
        class_counts=counts.astype(np.int32),
        class_seen=split_evenly(host.class_seen),
        # FIFO's cursor: after the newest dealt row (0 when full: the oldest is first); 0 for others.
        cursor=(sizes % per if host.cursor.any() else np.zeros(shards)).astype(np.int32),
        full_classes=np.broadcast_to(host.full_classes.any(axis=0), (shards, buckets)).copy(),
    )
    out = ReplayState(**fields)
    return out if shards > 1 else ReplayState(*(jax.tree.map(lambda leaf: leaf[0], field) for field in out))
