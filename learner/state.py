"""The learner's whole state as one PyTree, and the batch the train step consumes."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import optax
from flax import struct

from continuity.learner.ewc import EWCState


class Batch(NamedTuple):
    """A fixed-shape micro-batch; rows whose `mask` is False are padding and have no effect.

    Built from host NumPy arrays (the batcher's); inside the jitted train step they are jax.Arrays.
    """

    x: jax.Array | np.ndarray  # shape=(B, *example_shape), float32
    y: jax.Array | np.ndarray  # shape=(B,), int32 class; float32 target for regression (Learner.label_dtype)
    mask: jax.Array | np.ndarray  # shape=(B,), bool


class LearnerState(struct.PyTreeNode):
    """Everything that changes while learning, saved and restored whole.

    Static parts (model graph, optimizer, replay policy) live in `Learner`, so this tree
    holds arrays only: a checkpoint of it is complete, and jit donation reuses its buffers.
    """

    step: jax.Array  # shape=(), int32: train steps dispatched; randomness is fold_in(rng, step)
    rng: jax.Array  # shape=(2,), uint32: the run's base key
    params: dict  # nested dict of float32 arrays (nnx.to_pure_dict of the model)
    opt_state: optax.OptState
    replay: object  # replay.ReplayState, or None when replay is off
    ewc: EWCState
    skipped_updates: jax.Array  # shape=(), int32: steps non-finite even without their non-finite rows
    nonfinite_rows: jax.Array  # shape=(), int32: fresh rows masked out of a step for a non-finite loss or input
