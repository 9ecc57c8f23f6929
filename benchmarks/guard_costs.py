"""What the guard costs: rollback from the on-device copy, blocking time of an async save, overhead.

- rollback: `Guard.roll_back()` (a device-to-device copy of the whole learner state plus
  the lambda boost) for an MLP of about 1M parameters; median of 20.
- save blocking: how long `CheckpointStore.save` holds the caller for that state (the
  write itself continues in the background); median of 10, one every 0.5 s.
- overhead: share of a loop run's wall time spent judging, consolidating and starting
  saves, at the default cadence, on permuted-digits through the real loop.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import jax
import numpy as np

from checkpoints import CheckpointStore
from continuity.guard import Guard, GuardConfig
from learner import Batch, EWCConfig, Learner, LearnerConfig, ModelConfig, ReplayConfig, count_parameters


def _million_parameter_state():
    config = LearnerConfig(model=ModelConfig(hidden=(1024, 896)),
                           replay=ReplayConfig(capacity=1000, batch_size=16),
                           ewc=EWCConfig(enabled=True))
    learner = Learner(config, (8, 8, 1), 10)
    state = learner.init(0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = Batch(rng.random((32, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 32).astype(np.int32),
                      np.ones(32, bool))
        state, _ = learner.train_step(state, batch)
    return learner, jax.block_until_ready(state)


def measure_rollback(repeats: int = 20) -> dict:
    learner, state = _million_parameter_state()
    guard = Guard(learner, GuardConfig())
    guard.mark_good(state)
    jax.block_until_ready(guard.roll_back())  # warm-up: compiles the copy
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(guard.roll_back())
        seconds.append(time.perf_counter() - started)
    return {"parameters": count_parameters(state.params), "rollback_ms_median": 1000 * statistics.median(seconds),
            "rollback_ms_max": 1000 * max(seconds)}


def measure_save_blocking(repeats: int = 10) -> dict:
    learner, state = _million_parameter_state()
    probe = {"s0": {"x": np.zeros((200, 8, 8, 1), np.float32), "y": np.zeros(200, np.int32)}}
    seconds = []
    with tempfile.TemporaryDirectory(prefix="continuity-bench-save-") as directory:
        store = CheckpointStore(directory, keep_last=2)
        store.save(state, probe, {"status": "good"})  # warm-up
        store.wait()
        for _ in range(repeats):
            time.sleep(0.5)  # the previous write finishes in the background, as between guard windows
            started = time.perf_counter()
            store.save(state, probe, {"status": "good"})
            seconds.append(time.perf_counter() - started)
        store.close()
    return {"save_blocking_ms_median": 1000 * statistics.median(seconds), "save_blocking_ms_max": 1000 * max(seconds)}


def measure_overhead(every_examples: int | None = None, *, segments: int = 60, seed: int = 0) -> dict:
    """Guard share of wall time over a long permuted-digits stream, after a warm-up run.

    The service's defaults: judge every `probe.every_examples` trained examples (unless
    `every_examples` is given), checkpoint at most every `checkpoints.every_seconds`.
    60 segments fill the probe to ~8,000 examples, as a long-running service's would be.
    """
    from dataclasses import replace

    from benchmarks.guard import GUARD_LEARNER, run_scenario_through_loop
    from continuity.config import CheckpointsConfig
    from stream.scenarios import make_scenario

    guard = GuardConfig() if every_examples is None else replace(GuardConfig(), every_examples=every_examples)
    checkpoint_every_s = CheckpointsConfig().every_seconds
    learner = Learner(GUARD_LEARNER, (8, 8, 1), 10)
    # Warm-up on a short stream: compiles the step, evaluation and Fisher, as a service does once.
    run_scenario_through_loop(make_scenario("permuted-digits", segments=2, seed=seed), guard=guard, seed=seed,
                              learner=learner, checkpoint_every_s=checkpoint_every_s)
    run = run_scenario_through_loop(make_scenario("permuted-digits", segments=segments, seed=seed), guard=guard,
                                    seed=seed, learner=learner, checkpoint_every_s=checkpoint_every_s)
    return {"every_examples": guard.every_examples, "checkpoint_every_s": checkpoint_every_s,
            "guard_overhead_fraction": run["guard_seconds"] / run["wall_seconds"],
            "windows": run["windows"], "guard_seconds": run["guard_seconds"], "wall_seconds": run["wall_seconds"],
            "examples_trained": run["examples_trained"]}


def run_guard_costs() -> dict:
    return {**measure_rollback(), **measure_save_blocking(), "backend": jax.default_backend(),
            "overhead": [measure_overhead(every) for every in (1000, 5000, 20000)]}
