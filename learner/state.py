"""The learner's whole state as one PyTree, and the batch the train step consumes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from continuity.learner.ewc import EWCState


class Batch(NamedTuple):
    """A fixed-shape micro-batch; rows whose `mask` is False are padding and have no effect.

    Built from host NumPy arrays (the batcher's); inside the jitted train step they are jax.Arrays.
    """

    x: Any  # one array shape=(B, *feature_shape), or a dict (PyTree) of them; each in its feature's dtype
    y: jax.Array | np.ndarray  # shape=(B, *label_shape), the task's label dtype (Task.labels)
    mask: jax.Array | np.ndarray  # shape=(B,), bool


class StepTotals(NamedTuple):
    """Running sums of the train steps' figures, kept on the device: the step adds to them, and
    the host reads them when it reports progress (`Learner.take_totals`), never once per step."""

    steps: jax.Array  # shape=(), int32: train steps since the last take
    skipped: jax.Array  # shape=(), int32: of those, steps whose loss or gradient was non-finite (no update)
    loss: jax.Array  # shape=(), float32: sum of the total loss of the steps that updated
    grad_norm: jax.Array  # shape=(), float32: sum of the global gradient norm of the steps that updated
    fresh_rows: jax.Array  # shape=(), int32: valid fresh rows in the losses
    replayed_rows: jax.Array  # shape=(), int32: valid replayed rows in the losses

    @classmethod
    def zeros(cls) -> StepTotals:
        count, total = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
        return cls(count, count, total, total, count, count)


class LearnerState(struct.PyTreeNode):
    """Everything that changes while learning, saved and restored whole.

    Static parts (model graph, optimizer, replay policy) live in `Learner`, so this tree
    holds arrays only: a checkpoint of it is complete, and jit donation reuses its buffers.
    """

    step: jax.Array  # shape=(), int32: train steps dispatched; randomness is fold_in(rng, step)
    rng: jax.Array  # shape=(2,), uint32: the run's base key
    params: dict  # nested dict of arrays: the model's nnx.Param variables (nnx.to_pure_dict)
    opt_state: optax.OptState
    replay: object  # replay.ReplayState, or None when replay is off
    ewc: EWCState
    skipped_updates: jax.Array  # shape=(), int32: steps non-finite even without their non-finite rows
    nonfinite_rows: jax.Array  # shape=(), int32: fresh rows masked out of a step for a non-finite loss or input
    totals: StepTotals  # the steps' figures since the host last took them
