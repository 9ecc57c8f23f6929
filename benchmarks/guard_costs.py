"""What the guard costs: rollback from the on-device copy, blocking time of an async save, overhead.

- rollback: `Guard.roll_back()` (a device-to-device copy of the whole learner state plus
  the lambda boost) for an MLP of about 1M parameters; median of 20.
- save blocking: how long `CheckpointStore.save` holds the caller for that state (the
  write itself continues in the background); median of 10, one every 0.5 s.
- overhead: share of a loop run's wall time spent judging, consolidating and starting
  saves, through the real loop: at the default cadence on a steady stream with a full
  probe (the target's figure), and at the digits' cadence of 1,000 for comparison.
- judgement in training examples: a judgement's own compute (the candidate on a full
  probe, the Fisher refresh) over that of training one example, for four models (the
  MLP presets, the CNN, an embedding model): the overhead at windows of N is about this
  / N, whatever the hardware. With it, each model's Fisher alone, and what it would cost
  with per-example gradients for every parameter.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from continuity import replay
from continuity.checkpoints import CheckpointStore
from continuity.factory import build_model, learner_for
from continuity.guard import Guard, GuardConfig
from continuity.learner import (
    Batch,
    Classification,
    EWCConfig,
    Learner,
    LearnerConfig,
    ModelConfig,
    ReplayConfig,
    count_parameters,
    ewc,
)
from continuity.learner.learner import FISHER_CHUNK


def _million_parameter_state():
    config = LearnerConfig(
        model=ModelConfig(hidden=(1024, 896)),
        replay=ReplayConfig(capacity=1000, batch_size=16),
        ewc=EWCConfig(enabled=True),
    )
    learner = learner_for(config, (8, 8, 1), 10)
    state = learner.init(0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = Batch(
            rng.random((32, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 32).astype(np.int32), np.ones(32, bool)
        )
        state, _ = learner.train_step(state, batch)
    return learner, jax.block_until_ready(state)


def _median_ms(work, repeats: int = 5) -> float:
    work()  # compiles
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds)


class TokenBag(nnx.Module):
    """An embedding model, as a user would bring one: the mean of `tokens` token embeddings, a
    ReLU layer, a head. Its embedding table needs per-example gradients for the Fisher; its
    dense layers take the one-pass path (learner/fisher.py)."""

    def __init__(self, *, rngs: nnx.Rngs, inputs, outputs: int, vocab: int = 1000, dim: int = 64, hidden: int = 256):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.hidden = nnx.Linear(dim, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, outputs, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(jax.nn.relu(self.hidden(self.embed(tokens).mean(axis=1))))


def _judged_models() -> dict:
    """name -> (model factory, one example's features, n -> n examples' features): what `judgement` measures."""
    images = jax.ShapeDtypeStruct((8, 8, 1), jnp.float32)
    tokens = jax.ShapeDtypeStruct((32,), jnp.int32)

    def image_rows(n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.random((n, 8, 8, 1), dtype=np.float32)

    def token_rows(n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, 1000, (n, 32)).astype(np.int32)

    return {
        "mlp 256x256": (build_model(ModelConfig()), images, image_rows),
        "cnn": (build_model(ModelConfig(kind="cnn")), images, image_rows),
        "mlp 1024x896": (build_model(ModelConfig(hidden=(1024, 896))), images, image_rows),
        "embedding bag 1000x64 + 256": (TokenBag, tokens, token_rows),
    }


def measure_judgement_cost(name: str, *, probe_rows: int = 64 * 200, steps: int = 32) -> dict:
    """How many examples' training one judgement costs: the candidate on a full probe plus the Fisher refresh.

    The service's learner otherwise (adam, 32 fresh + 32 replayed rows per step, EWC, 256
    Fisher samples). Also the Fisher of those 256 rows on its own, and what it would cost
    with per-example gradients for every parameter (no one-pass path for dense layers).
    """
    from continuity.benchmarks.guard import GUARD_LEARNER

    model, inputs, rows_of = _judged_models()[name]
    replay_config = GUARD_LEARNER.replay
    learner = Learner(
        model,
        optax.adam(GUARD_LEARNER.learning_rate),
        Classification(10),
        inputs=inputs,
        batch_size=GUARD_LEARNER.batch_size,
        replay=replay.make(replay_config.kind, replay_config.capacity),
        replay_batch_size=replay_config.batch_size,
        ewc=GUARD_LEARNER.ewc,
    )
    rng = np.random.default_rng(0)
    x = rows_of(probe_rows, rng)
    y = rng.integers(0, 10, probe_rows).astype(np.int32)
    rows = learner.batch_size
    batches = [
        Batch(x[i * rows : (i + 1) * rows], y[i * rows : (i + 1) * rows], np.ones(rows, bool)) for i in range(steps)
    ]
    held = {"state": learner.init(0)}

    def train():
        for batch in batches:
            held["state"], _ = learner.train_step(held["state"], batch)
        jax.block_until_ready(held["state"])

    def consolidate():
        held["state"] = jax.block_until_ready(learner.consolidate(held["state"]))

    train_ms = _median_ms(train)
    evaluate_ms = _median_ms(lambda: learner.evaluate(held["state"].params, x, y))
    fisher_ms = _median_ms(consolidate)
    samples = learner.ewc.fisher_samples if learner.ewc is not None else 256
    fisher_args = (held["state"].params, jnp.asarray(x[:samples]), jnp.asarray(y[:samples]), jnp.ones(samples, bool))
    fast = jax.jit(learner.fisher)
    per_example = jax.jit(functools.partial(ewc.fisher_diagonal, learner.logits, learner.task.nll, chunk=FISHER_CHUNK))
    per_example_ms = train_ms / (steps * rows)
    return {
        "model": name,
        "parameters": count_parameters(held["state"].params),
        "probe_rows": probe_rows,
        "evaluate_ms": evaluate_ms,
        "fisher_ms": fisher_ms,
        "fisher_samples": samples,
        "fisher_only_ms": _median_ms(lambda: jax.block_until_ready(fast(*fisher_args))),
        "fisher_all_per_example_ms": _median_ms(lambda: jax.block_until_ready(per_example(*fisher_args))),
        "train_example_us": 1000 * per_example_ms,
        "judgement_in_training_examples": (evaluate_ms + fisher_ms) / per_example_ms,
    }


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
    return {
        "parameters": count_parameters(state.params),
        "rollback_ms_median": 1000 * statistics.median(seconds),
        "rollback_ms_max": 1000 * max(seconds),
    }


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


def steady_scenario(*, segments: int = 64, examples_per_segment: int = 8_000, seed: int = 0):
    """A service's steady state with a full probe: a stationary, learnable stream in named segments.

    The examples are `bench pipeline`'s (labels from a fixed linear teacher), scaled to
    [0, 1] like the digits. 64 segments of 8,000 examples fill the probe to 64 x 200, its
    largest at the defaults, so a judgement costs its most; nothing drifts, so every window
    is accepted and what is measured is the guard's price, not a reaction's.
    """
    from continuity.benchmarks.pipeline import teacher_examples
    from continuity.stream.scenarios import Scenario, Segment

    x, y = teacher_examples(segments * examples_per_segment, seed)
    x = (x / np.float32(16)).astype(np.float32)
    parts = []
    for k in range(segments):
        rows = slice(k * examples_per_segment, (k + 1) * examples_per_segment)
        parts.append(Segment(name=f"part-{k}", train_x=x[rows], train_y=y[rows], test_x=x[:0], test_y=y[:0]))
    return Scenario(name="steady", segments=tuple(parts), num_classes=10, example_shape=x.shape[1:], seed=seed)


def measure_overhead(scenario, every_examples: int | None = None, *, seed: int = 0) -> dict:
    """Guard share of a loop run's wall time over `scenario`, after a warm-up on its first segments.

    The service's defaults: judge every `probe.every_examples` trained examples (unless
    `every_examples` is given), checkpoint at most every `checkpoints.every_seconds`.
    Records carry 256 examples each, as `bench pipeline`'s do, so decoding is not what
    dilutes the guard's share.
    """
    from dataclasses import replace

    from continuity.benchmarks.guard import GUARD_LEARNER, run_scenario_through_loop
    from continuity.config import CheckpointsConfig

    guard = GuardConfig() if every_examples is None else replace(GuardConfig(), every_examples=every_examples)
    checkpoint_every_s = CheckpointsConfig().every_seconds
    learner = learner_for(GUARD_LEARNER, scenario.example_shape, scenario.num_classes)
    through_loop = functools.partial(
        run_scenario_through_loop,
        guard=guard,
        seed=seed,
        learner=learner,
        checkpoint_every_s=checkpoint_every_s,
        examples_per_record=256,
    )
    # Warm-up: compiles the step, evaluation and Fisher, as a service does once.
    through_loop(replace(scenario, segments=scenario.segments[:2]))
    run = through_loop(scenario)
    return {
        "stream": scenario.name,
        "segments": len(scenario.segments),
        "every_examples": guard.every_examples,
        "checkpoint_every_s": checkpoint_every_s,
        "guard_overhead_fraction": run["guard_seconds"] / run["wall_seconds"],
        "windows": run["windows"],
        "rollbacks": run["rollbacks"],
        "quarantined_records": run["quarantined_records"],
        "guard_seconds": run["guard_seconds"],
        "wall_seconds": run["wall_seconds"],
        "examples_trained": run["examples_trained"],
    }


def run_guard_costs() -> dict:
    from continuity.stream.scenarios import GUARD_EVERY_EXAMPLES, make_scenario

    steady = steady_scenario()
    return {
        **measure_rollback(),
        **measure_save_blocking(),
        "backend": jax.default_backend(),
        # The target's figure (the default cadence), then what finer windows cost: on the
        # same stream, and on drifting digits at the demo's cadence (with its reactions).
        "overhead": [
            measure_overhead(steady),
            measure_overhead(steady, GUARD_EVERY_EXAMPLES),
            measure_overhead(make_scenario("permuted-digits", segments=60), GUARD_EVERY_EXAMPLES),
        ],
        "judgement": [measure_judgement_cost(name) for name in _judged_models()],
    }
