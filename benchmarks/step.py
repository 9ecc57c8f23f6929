"""`bench step`: what replay + EWC cost per step, and proof that nothing recompiles.

The plain step is the textbook jitted update on the same model, optimizer and batch:
forward, backward, Optax update, nothing else. The continual step is `Learner.train_step`
with replay (sampling + insertion) and an active EWC penalty, plus the masking and
finite checks it always does. Both donate their state. Each is timed over `steps`
dispatches, `repeats` times, in one process; the median is reported.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from continuity.factory import learner_for
from continuity.learner import (
    Batch,
    EWCConfig,
    Learner,
    LearnerConfig,
    ModelConfig,
    ReplayConfig,
    compilation_count,
    count_parameters,
)


def _plain_step(learner: Learner):
    optimizer = learner.optimizer

    def step(carry, x, y):
        params, opt_state = carry

        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(learner.logits(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=(0,))


def _time(run, steps: int, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps)
        seconds.append(time.perf_counter() - start)
    return seconds


def run_step_benchmark(
    *,
    batch_size: int = 32,
    hidden: tuple[int, ...] = (256, 256),
    replay_capacity: int = 1000,
    replay_batch_size: int = 16,
    steps: int = 500,
    repeats: int = 5,
    seed: int = 0,
) -> dict:
    example_shape, num_classes = (8, 8, 1), 10
    config = LearnerConfig(
        model=ModelConfig(kind="mlp", hidden=hidden),
        batch_size=batch_size,
        replay=ReplayConfig(kind="reservoir", capacity=replay_capacity, batch_size=replay_batch_size),
        ewc=EWCConfig(enabled=True, strength=100.0),
    )
    learner = learner_for(config, example_shape, num_classes)
    rng = np.random.default_rng(seed)
    # A pool of distinct host batches, so the buffer sees varied data; cycled during timing.
    pool = [
        Batch(
            rng.random((batch_size, *example_shape), dtype=np.float32),
            rng.integers(0, num_classes, batch_size).astype(np.int32),
            np.ones(batch_size, bool),
        )
        for _ in range(16)
    ]

    state = learner.init(seed)
    plain = _plain_step(learner)
    # On the device from the start, like the learner's state, so its first call is its only compile.
    carry = jax.device_put(
        (jax.tree.map(jnp.copy, state.params), learner.optimizer.init(state.params)), jax.devices()[0]
    )

    # Warm-up: compile both, fill the buffer a little, and make the EWC penalty live.
    for batch in pool:
        state, _ = learner.train_step(state, batch)
    state = learner.consolidate(state)
    state, _ = learner.train_step(state, pool[0])
    carry, _ = plain(carry, pool[0].x, pool[0].y)
    jax.block_until_ready((state, carry))
    compiles_before = compilation_count()

    def run_continual(n):
        nonlocal state
        for i in range(n):
            state, metrics = learner.train_step(state, pool[i % len(pool)])
        jax.block_until_ready(state)

    def run_plain(n):
        nonlocal carry
        for i in range(n):
            batch = pool[i % len(pool)]
            carry, loss = plain(carry, batch.x, batch.y)
        jax.block_until_ready(carry)

    # Interleave the repeats so machine noise hits both alike.
    plain_seconds, continual_seconds = [], []
    for _ in range(repeats):
        plain_seconds += _time(run_plain, steps, 1)
        continual_seconds += _time(run_continual, steps, 1)
    compiles_after_warmup = compilation_count() - compiles_before

    plain_rate = batch_size * steps / statistics.median(plain_seconds)
    continual_rate = batch_size * steps / statistics.median(continual_seconds)
    return {
        "batch_size": batch_size,
        "model": {"kind": "mlp", "hidden": list(hidden), "parameters": count_parameters(state.params)},
        "replay_capacity": replay_capacity,
        "replay_batch_size": config.replay.batch_size,
        "steps_per_repeat": steps,
        "repeats": repeats,
        "plain_samples_per_second": plain_rate,
        "continual_samples_per_second": continual_rate,
        "ratio": continual_rate / plain_rate,
        "compilations_after_warmup": compiles_after_warmup,
        "backend": jax.default_backend(),
        "skipped_updates": int(state.skipped_updates),
    }
