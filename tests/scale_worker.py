"""Runs in a subprocess with faked CPU devices (XLA_FLAGS set by the parent before JAX starts):
trains the same stacks on one device and on a mesh of all of them, and prints JSON.

`python tests/scale_worker.py DISPATCHES` prints {"devices", "max_param_diff",
"max_param", "compiles_after_first", "examples"}.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from continuity.learner import (
    Batch,
    Classification,
    EWCConfig,
    Learner,
    LearnerConfig,
    ModelConfig,
    ReplayConfig,
    compilation_count,
)

BATCH, K, SHAPE, CLASSES = 32, 4, (8, 8, 1), 10


def learner(devices: int) -> Learner:
    from continuity.factory import build_learner

    config = LearnerConfig(
        model=ModelConfig(kind="mlp", hidden=(64,)),
        batch_size=BATCH,
        replay=ReplayConfig(capacity=256, batch_size=16),
        ewc=EWCConfig(enabled=True, strength=100.0),
        steps_per_dispatch=K,
    )
    inputs = jax.ShapeDtypeStruct(SHAPE, np.float32)
    return build_learner(config, inputs=inputs, task=Classification(CLASSES), devices=devices)


def stacks(dispatches: int) -> list[Batch]:
    """Host stacks of a learnable problem (the label is the argmax of a fixed projection), some rows
    padding, the last stack short: what the loop sends."""
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(int(np.prod(SHAPE)), CLASSES)).astype(np.float32)
    one = learner(1)
    out = []
    for i in range(dispatches):
        batches = []
        for _ in range(K if i < dispatches - 1 else K // 2):
            x = rng.random((BATCH, *SHAPE), dtype=np.float32)
            y = (x.reshape(BATCH, -1) @ projection).argmax(axis=1).astype(np.int32)
            batches.append(Batch(x, y, rng.random(BATCH) < 0.9))
        out.append(one.stack(batches))
    return out


def train(devices: int, host: list[Batch]) -> tuple[dict, int, int]:
    """Params after every stack (a consolidation halfway), compilations by the dispatches after
    the first, examples trained."""
    model = learner(devices)
    state = model.init(0)
    recompiles = 0
    for i, stack in enumerate(host):
        before = compilation_count()
        state, _ = model.train_steps(state, model.put_stack(stack))
        jax.block_until_ready(state)
        if i > 0:
            recompiles += compilation_count() - before
        if i == len(host) // 2:
            state = model.consolidate(state)
    totals, state = model.take_totals(state)
    return jax.tree.map(np.asarray, state.params), recompiles, int(totals.fresh_rows)


def main() -> None:
    host = stacks(int(sys.argv[1]))
    devices = len(jax.local_devices())
    one, _, examples_one = train(1, host)
    many, recompiles, examples = train(devices, host)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))
    print(
        json.dumps(
            {
                "devices": devices,
                "max_param_diff": diff,
                "max_param": max(float(np.max(np.abs(a))) for a in jax.tree.leaves(one)),
                "compiles_after_first": recompiles,
                "examples": [examples_one, examples],
            }
        )
    )


if __name__ == "__main__":
    main()
