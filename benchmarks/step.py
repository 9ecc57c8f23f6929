"""`bench step`: what replay + EWC cost per update, what K updates per dispatch save, and
proof that nothing recompiles.

The plain step is the textbook jitted update on the same model and optimizer: forward,
backward, Optax update, nothing else, `lax.scan`ned over K micro-batches per dispatch. Its
micro-batches hold as many rows as the continual step's loss sees (fresh + replayed), so
the ratio compares updates of the same size; its samples/s count `batch_size` examples
per update, as the continual step's do. The continual step is `Learner.train_steps` with replay (sampling + insertion)
and an active EWC penalty, plus the masking and finite checks it always does, at K and at
K = 1 (what the loop runs for each). All donate their state; every stack is put on the
device right before its dispatch, as the loop does. Each is timed over `steps` updates
(`steps / K` dispatches), `repeats` times interleaved in one process; medians are reported.
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

# An HLO instruction and the JAX op its metadata names: `%ynn_fusion.20 = ... op_name="jit(...)/dot_general"`.
_OP_NAMES = re.compile(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"")


def random_batches(rng: np.random.Generator, batch_size: int, example_shape, num_classes: int, count: int = 16):
    """`count` distinct full micro-batches of random inputs and labels, for timing a step."""
    return [
        Batch(
            rng.random((batch_size, *example_shape), dtype=np.float32),
            rng.integers(0, num_classes, batch_size).astype(np.int32),
            np.ones(batch_size, bool),
        )
        for _ in range(count)
    ]


def _plain_steps(learner: Learner):
    """The plain update scanned over a stack's micro-batches: one dispatch per stack."""
    optimizer = learner.optimizer

    def update(carry, batch: Batch):
        params, opt_state = carry

        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(learner.logits(p, batch.x), batch.y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(lambda carry, stack: jax.lax.scan(update, carry, stack), donate_argnums=(0,))


def run_step_benchmark(
    *,
    batch_size: int = 32,
    hidden: tuple[int, ...] = (256, 256),
    replay_capacity: int = 1000,
    replay_batch_size: int = 16,
    steps_per_dispatch: int = 8,
    steps: int = 512,
    repeats: int = 5,
    seed: int = 0,
    profile: Path | None = None,
) -> dict:
    """`steps`: updates per timed repeat, rounded up to whole stacks of `steps_per_dispatch`.
    `profile`: a directory to trace one more repeat of the continual step at K into (`step_profile`)."""
    example_shape, num_classes = (8, 8, 1), 10
    k = steps_per_dispatch
    dispatches = -(-steps // k)

    def learner_with(steps_per_dispatch: int) -> Learner:
        config = LearnerConfig(
            model=ModelConfig(kind="mlp", hidden=hidden),
            batch_size=batch_size,
            replay=ReplayConfig(kind="reservoir", capacity=replay_capacity, batch_size=replay_batch_size),
            ewc=EWCConfig(enabled=True, strength=100.0),
            steps_per_dispatch=steps_per_dispatch,
        )
        return learner_for(config, example_shape, num_classes)

    learners = {"k": learner_with(k), "k1": learner_with(1)}
    rng = np.random.default_rng(seed)
    # A pool of distinct host micro-batches, so the buffer sees varied data; cycled during timing.
    pool = random_batches(rng, batch_size, example_shape, num_classes)
    stacks = {
        name: [learner.stack([pool[(i + j) % len(pool)] for j in range(learner.steps_per_dispatch)]) for i in range(16)]
        for name, learner in learners.items()
    }
    # The plain step's micro-batches: the fresh rows and as many more as the continual step replays.
    plain_rows = batch_size + replay_batch_size
    plain_stacks = [
        Batch(
            rng.random((k, plain_rows, *example_shape), dtype=np.float32),
            rng.integers(0, num_classes, (k, plain_rows)).astype(np.int32),
            np.ones((k, plain_rows), bool),
        )
        for _ in range(4)
    ]
    device = jax.devices()[0]
    states = {name: learner.init(seed) for name, learner in learners.items()}
    plain = _plain_steps(learners["k"])
    params = states["k"].params
    # On the device from the start, like the learner's state, so its first call is its only compile.
    carry = jax.device_put((jax.tree.map(jnp.copy, params), learners["k"].optimizer.init(params)), device)

    # Warm-up: compile each, fill the buffer a little, and make the EWC penalty live.
    for name, learner in learners.items():
        state = states[name]
        for stack in stacks[name][: max(1, 16 // learner.steps_per_dispatch)]:
            state, _ = learner.train_steps(state, jax.device_put(stack, device))
        state = learner.consolidate(state)
        states[name], _ = learner.train_steps(state, jax.device_put(stacks[name][0], device))
    carry, _ = plain(carry, jax.device_put(plain_stacks[0], device))
    jax.block_until_ready((states, carry))
    compiles_before = compilation_count()

    def continual(name: str):
        learner, host = learners[name], stacks[name]
        count = steps if name == "k1" else dispatches

        def run():
            state = states[name]
            for i in range(count):
                state, _ = learner.train_steps(state, jax.device_put(host[i % len(host)], device))
            states[name] = jax.block_until_ready(state)

        return run

    def run_plain():
        nonlocal carry
        for i in range(dispatches):
            carry, _ = plain(carry, jax.device_put(plain_stacks[i % len(plain_stacks)], device))
        jax.block_until_ready(carry)

    runs = {"plain": run_plain, "k": continual("k"), "k1": continual("k1")}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in runs}  # this process's, all threads
    for _ in range(repeats):  # interleaved, so machine noise hits all alike
        for name, run in runs.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            run()
            seconds[name].append(time.perf_counter() - started)
            cpu_seconds[name].append(time.process_time() - cpu_started)
    # A partly filled stack (a quiet stream, a window's end) runs on the same compiled step.
    short = learners["k"].stack(pool[: max(1, k // 2)])
    states["k"], _ = learners["k"].train_steps(states["k"], jax.device_put(short, device))
    jax.block_until_ready(states["k"])
    compiles_after_warmup = compilation_count() - compiles_before

    traced = None
    if profile is not None:
        # The compiled program names what each traced kernel computes (its ops' metadata); the
        # step is a jax.jit function (the placement's jit_step), typed as a plain callable.
        jitted: Any = learners["k"].train_steps
        program = jitted.lower(states["k"], jax.device_put(stacks["k"][0], device)).compile().as_text()
        traced = step_profile(profile, runs["k"], dispatches * k, program=program)
        # Beside the trace, the compiled program it names: which fusion holds which ops.
        program_path = Path(traced["trace"]).with_name("train_steps.hlo.txt")
        program_path.write_text(program)
        traced["program"] = str(program_path)
    rows = {"plain": batch_size * dispatches * k, "k": batch_size * dispatches * k, "k1": batch_size * steps}
    rate = {name: rows[name] / statistics.median(seconds[name]) for name in runs}
    # On a loaded machine wall time mostly measures the other processes; CPU time per example
    # still shows what a dispatch costs this one.
    cpu_rate = {name: rows[name] / statistics.median(cpu_seconds[name]) for name in runs}
    return {
        "batch_size": batch_size,
        "steps_per_dispatch": k,
        "model": {"kind": "mlp", "hidden": list(hidden), "parameters": count_parameters(params)},
        "replay_capacity": replay_capacity,
        "replay_batch_size": replay_batch_size,
        "plain_rows_per_update": plain_rows,
        "updates_per_repeat": dispatches * k,
        "repeats": repeats,
        "samples_per_second": rate["k"],
        "k1_samples_per_second": rate["k1"],
        "plain_samples_per_second": rate["plain"],
        "ratio": rate["k"] / rate["plain"],
        "speedup_over_k1": rate["k"] / rate["k1"],
        "cpu": {
            "samples_per_cpu_second": cpu_rate["k"],
            "k1_samples_per_cpu_second": cpu_rate["k1"],
            "plain_samples_per_cpu_second": cpu_rate["plain"],
            "ratio": cpu_rate["k"] / cpu_rate["plain"],
            "speedup_over_k1": cpu_rate["k"] / cpu_rate["k1"],
        },
        "compilations_after_warmup": compiles_after_warmup,
        "backend": jax.default_backend(),
        "device": str(device.device_kind),
        "skipped_updates": int(states["k"].skipped_updates),
        **({"profile": traced} if traced is not None else {}),
    }


def device_activity(events: list[dict], updates: int) -> dict | None:
    """What a trace's device rows say per update: how many kernels and copies ran there, and
    their durations summed. On a GPU a small model's update is bound by the count of its
    kernels, each ~1-2 us, more than by their arithmetic (BENCHMARKS.md, issue 13), so these
    two figures are what a change to the step is judged by there. None where the trace has no
    device rows (the CPU's thunks run on host threads)."""
    devices = {
        event["pid"]
        for event in events
        if event.get("ph") == "M"
        and event.get("name") == "process_name"
        and str(event.get("args", {}).get("name", "")).startswith("/device:")
    }
    ran = [event for event in events if event.get("ph") == "X" and event.get("pid") in devices]
    if not ran:
        return None
    return {
        "kernels_per_update": len(ran) / updates,
        "busy_us_per_update": sum(event.get("dur", 0) for event in ran) / updates,
    }


def step_profile(directory: Path, run: Callable[[], None], updates: int, *, program: str = "", top: int = 30) -> dict:
    """Trace `run` (`updates` continual updates) with `jax.profiler` into `directory`, and sum the
    trace's events by name: on a GPU its kernels and copies, on the CPU XLA's thunks, beside the
    runtime's own spans (Python frames left out). The `top` by time, per update, as the step-time
    profile of BENCHMARKS.md, each with the op it computes where `program` (the compiled HLO's
    text) names it; the trace itself opens in Perfetto (ui.perfetto.dev) or TensorBoard."""
    # An instruction's metadata says which JAX op made it: "jit(_train_steps)/while/body/.../dot_general".
    ops = {name: op.rsplit("closed_call/", 1)[-1] for name, op in _OP_NAMES.findall(program)}
    directory.mkdir(parents=True, exist_ok=True)
    before = set(directory.rglob("perfetto_trace.json.gz"))
    jax.profiler.start_trace(str(directory), create_perfetto_trace=True)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    (trace,) = set(directory.rglob("perfetto_trace.json.gz")) - before
    with gzip.open(trace) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    seconds: Counter = Counter()
    calls: Counter = Counter()
    computes: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and not name.startswith("$"):  # "$...": the Python tracer's frames
            seconds[name] += event.get("dur", 0) / 1e6
            calls[name] += 1
            computes.setdefault(name, ops.get(event.get("args", {}).get("hlo_op", name), ""))
    device = device_activity(events, updates)
    return {
        "trace": str(trace),
        "updates": updates,
        **({"device": device} if device is not None else {}),
        "top": [
            {
                "name": name,
                "op": computes[name],
                "us_per_update": 1e6 * total / updates,
                "calls_per_update": calls[name] / updates,
            }
            for name, total in seconds.most_common(top)
        ],
    }
