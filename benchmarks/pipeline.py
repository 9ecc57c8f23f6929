"""`bench pipeline`: examples trained per second through the service, against its two limits.

On one topic of the embedded broker (batched binary records, uint8 features):
- the ingest limit: a bare kafka-python poll loop reading the topic (examples/s);
- the compute limit: the service's own jitted train step on host batches, alone (examples
  trained/s, a batch's held-out share left untrained as in the service);
- the pipeline: `Service` (the code `continuity serve` runs: Kafka source, decode thread,
  batcher, train step, guard, checkpoints) training the whole topic, its steady-state rate
  measured from the first progress snapshot past `warmup_examples` to the last one before
  the stream ran out. The records are a stationary, learnable stream (a fixed random linear
  teacher labels uint8 features): the steady state, where the guard accepts every window.
Target: pipeline >= 0.8 x the lower limit (issue 13; 0.7 x before it). Memory: resident set
size when `rss_from` examples are trained vs at the end; target growth under 5%.

The service trains `learner.steps_per_dispatch` (K) micro-batches per dispatch, as
configured; `compare_k1` runs it again on the same topic (another consumer group, another
checkpoint directory) at K = 1, so the two rates come from one run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (8, 8, 1)
EXAMPLES_PER_RECORD = 256
IDLE_TIMEOUT_S = 10.0  # the service stops once the topic is drained and quiet this long


def teacher_examples(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` examples of a stationary, learnable stream: uint8 features in [0, 16] (as the
    digits' pixels), labels from a fixed random linear teacher. (x, y): uint8 (n, 8, 8, 1), int32 (n,)."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(int(np.prod(SHAPE)), 10))
    x = rng.integers(0, 17, (n, *SHAPE)).astype(np.uint8)
    return x, np.argmax(x.reshape(n, -1) @ teacher, axis=1).astype(np.int32)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _step_rate(config, steps: int = 320, repeats: int = 5) -> float:
    """Trained examples/s of the service's train step alone: full stacks of K host micro-batches,
    each put on the device before its dispatch as the loop does; the median of `repeats` timings
    of `steps` updates (one short timing swung 33-49k/s on the shared 2-core machine).

    Its unit is the pipeline's: examples trained. In the service a batch's rows include the
    ones held out for the probe (`probe.holdout_fraction`, masked out of training), so the
    batches here hold out as many, at random, and only their trained rows are counted."""
    import jax

    from continuity.learner import Batch
    from continuity.service import build_learner

    learner = build_learner(config)
    state = learner.init(0)
    rng = np.random.default_rng(0)
    batch_size, k = config.learner.batch_size, learner.steps_per_dispatch
    pool = [
        Batch(
            rng.integers(0, 17, (batch_size, *SHAPE)).astype(np.float32),
            rng.integers(0, 10, batch_size).astype(np.int32),
            rng.random(batch_size) >= config.probe.holdout_fraction,
        )
        for _ in range(8)
    ]
    stacks = [learner.stack([pool[(i + j) % len(pool)] for j in range(k)]) for i in range(len(pool))]
    trained = [int(np.sum(stack.mask)) for stack in stacks]  # rows trained per dispatch
    for stack in stacks:
        state, _ = learner.train_steps(state, learner.put_stack(stack))
    jax.block_until_ready(state)
    dispatches = -(-steps // k)
    trained_per_timing = sum(trained[i % len(stacks)] for i in range(dispatches))
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(dispatches):
            state, _ = learner.train_steps(state, learner.put_stack(stacks[i % len(stacks)]))
        jax.block_until_ready(state)
        rates.append(trained_per_timing / (time.perf_counter() - started))
    return statistics.median(rates)


def run_pipeline_benchmark(
    *,
    examples: int = 1_000_000,
    warmup_examples: int = 50_000,
    rss_from: int = 100_000,
    progress=None,
    overrides: tuple[str, ...] = (),
    compare_k1: bool = False,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> dict:
    from continuity.benchmarks.ingest import _bare_loop
    from continuity.config import load_config
    from continuity.stream import EmbeddedBroker, create_topic, encode_binary, produce_records
    from continuity.stream.broker import SHORT_SESSION_TIMEOUT_MS

    say = progress or (lambda message: None)
    records = max(1, examples // EXAMPLES_PER_RECORD)
    # A stationary, learnable stream: the steady state of a service, where the guard accepts
    # every window. (Random labels would make the guard roll back and quarantine as the model
    # memorises and forgets noise.)
    teacher = teacher_examples(64 * EXAMPLES_PER_RECORD)
    blocks = [encode_binary(x, y, dtype="uint8") for x, y in zip(*(np.split(a, 64) for a in teacher))]
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="continuity-bench-pipeline-") as scratch:
        topic = "pipeline"
        create_topic(broker.bootstrap, topic, 1)
        say(f"producing {records:,} records of {EXAMPLES_PER_RECORD} examples")
        produce_records(broker.bootstrap, topic, ((None, blocks[i % len(blocks)]) for i in range(records)))
        bare_seconds, _ = _bare_loop(broker.bootstrap, topic, records, 2000)
        ingest_rate = records * EXAMPLES_PER_RECORD / bare_seconds
        base = [
            f'stream.bootstrap="{broker.bootstrap}"',
            f'stream.topics=["{topic}"]',
            f"stream.session_timeout_ms={SHORT_SESSION_TIMEOUT_MS}",  # the embedded broker's (see stream.broker)
            'stream.dtype="uint8"',
            "service.progress_every_s=0.25",
        ]
        config = load_config(None, [*base, f'checkpoints.dir="{Path(scratch) / "ck"}"', *overrides])
        result = _through_the_service(config, say, warmup_examples, rss_from, idle_timeout_s)
        if compare_k1 and config.learner.steps_per_dispatch != 1:
            say("again at learner.steps_per_dispatch = 1, from the topic's start (another consumer group)")
            k1 = load_config(
                None,
                [
                    *base,
                    f'checkpoints.dir="{Path(scratch) / "ck-k1"}"',
                    'stream.group="continuity-k1"',
                    *overrides,
                    "learner.steps_per_dispatch=1",
                ],
            )
            result["k1"] = _through_the_service(k1, say, warmup_examples, rss_from, idle_timeout_s)
    limit = min(ingest_rate, result["step_limit_examples_per_s"])
    summary = {
        "records": records,
        "steps_per_dispatch": config.learner.steps_per_dispatch,
        "ingest_limit_examples_per_s": ingest_rate,
        **result,
        "ratio_to_lower_limit": result["pipeline_examples_per_s"] / limit,
    }
    if "k1" in result:
        summary["k1_pipeline_examples_per_s"] = result["k1"]["pipeline_examples_per_s"]
        summary["speedup_over_k1"] = result["pipeline_examples_per_s"] / result["k1"]["pipeline_examples_per_s"]
    return summary


def _through_the_service(config, say, warmup_examples: int, rss_from: int, idle_timeout_s: float) -> dict:
    """The train step's rate alone, then `Service` over the whole topic: its steady-state rate and memory."""
    from continuity.service import Service

    say(f"timing the bare train step (K = {config.learner.steps_per_dispatch})")
    step_rate = _step_rate(config)
    snapshots: list[tuple[float, int, int]] = []  # (time, examples trained, rss)

    def on_progress(p, _lag):
        snapshots.append((time.perf_counter(), p.examples_trained, _rss_bytes()))
        if len(snapshots) % 8 == 1:  # snapshots every 0.25 s for the rate; a line every 2 s
            say(
                f"  {p.examples_trained:,} examples, {p.examples_per_second:,.0f}/s, "
                f"rss {_rss_bytes() / 2**20:,.0f} MiB"
            )

    service = Service(config, http=False, idle_timeout_s=idle_timeout_s, progress=on_progress)
    summary = service.run()
    snapshots.append((time.perf_counter(), summary.examples_trained, _rss_bytes()))
    # Steady state: past the warm-up, and before the last examples were trained: snapshots are
    # taken between batches, so the one that saw the final count may come only after the
    # service waited out its idle timeout, which is no part of the rate.
    steady = [s for s in snapshots if warmup_examples <= s[1] < summary.examples_trained]
    pipeline_rate = (
        (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
        if len(steady) >= 2 and steady[-1][0] > steady[0][0]
        else float("nan")
    )
    rss_start = next((s[2] for s in snapshots if s[1] >= rss_from), None)
    rss_end = snapshots[-1][2]
    return {
        "examples": summary.examples_trained,
        "step_limit_examples_per_s": step_rate,
        "pipeline_examples_per_s": pipeline_rate,
        "guard_seconds": summary.guard_seconds,
        "wall_seconds": summary.wall_seconds,
        "idle_timeout_s": idle_timeout_s,
        "windows": summary.windows,
        "rss_at_rss_from_mib": None if rss_start is None else rss_start / 2**20,
        "rss_at_end_mib": rss_end / 2**20,
        "rss_growth": None if rss_start is None else rss_end / rss_start - 1,
    }


def format_result(result: dict) -> str:
    growth = result["rss_growth"]
    return "\n".join(
        [
            f"ingest limit   {result['ingest_limit_examples_per_s']:>12,.0f} examples/s (bare kafka-python poll loop)",
            f"compute limit  {result['step_limit_examples_per_s']:>12,.0f} examples/s (train step alone, "
            f"K = {result['steps_per_dispatch']} updates per dispatch)",
            f"pipeline       {result['pipeline_examples_per_s']:>12,.0f} examples/s through the service "
            f"(ratio to the lower limit {result['ratio_to_lower_limit']:.2f}; target >= 0.8)",
            f"guard          {result['guard_seconds']:.1f} s over {result['windows']} windows, the first with its "
            f"compilations ({result['wall_seconds']:.1f} s in all, "
            f"with the {result['idle_timeout_s']:g} s idle timeout)",
            f"memory         rss {result['rss_at_rss_from_mib'] or float('nan'):,.0f} MiB"
            f" -> {result['rss_at_end_mib']:,.0f} MiB "
            f"({'n/a' if growth is None else f'{100 * growth:+.1f}%'}; target < +5%)",
        ]
        + (
            [
                f"at K = 1        {result['k1_pipeline_examples_per_s']:>12,.0f} examples/s through the service "
                f"(compute limit {result['k1']['step_limit_examples_per_s']:,.0f}); "
                f"K = {result['steps_per_dispatch']}: {result['speedup_over_k1']:.2f} x"
            ]
            if "k1" in result
            else []
        )
    )
