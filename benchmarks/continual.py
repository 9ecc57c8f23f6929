"""`bench cl`: train a learner segment by segment through a scenario and measure forgetting.

After each segment the model is evaluated on every segment's held-out test split, giving
the accuracy matrix R[i][j]; from it come average accuracy, forgetting and backward
transfer. `joint` is the offline upper bound: one model trained on the shuffled union
of all segments for the same number of passes, evaluated once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import jax
import numpy as np

from continuity.benchmarks import STRATEGIES
from continuity.factory import learner_for
from continuity.learner import Batch, Learner, LearnerConfig
from continuity.learner.cl_metrics import continual_metrics
from continuity.stream.scenarios import Scenario

# Defaults chosen on permuted- and split-digits (see BENCHMARKS.md); overridable per run.
DEFAULT_REPLAY_CAPACITY = 200
# EWC alone must hold old segments by itself and needs a strong penalty; beside replay,
# which already rehearses them, a strong penalty only costs plasticity (BENCHMARKS.md).
DEFAULT_EWC_STRENGTH = {"ewc": 1000.0, "ewc+replay": 10.0}


def strategy_config(
    strategy: str,
    *,
    base: LearnerConfig | None = None,
    replay_capacity: int = DEFAULT_REPLAY_CAPACITY,
    replay_kind: str = "reservoir",
    ewc_strength: float | None = None,
) -> LearnerConfig:
    """The learner configuration a strategy means: which of replay and EWC are switched on."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}. Got {strategy!r}.")
    base = base or LearnerConfig()
    use_replay = strategy in ("replay", "ewc+replay")
    use_ewc = strategy in ("ewc", "ewc+replay")
    if ewc_strength is None:
        ewc_strength = DEFAULT_EWC_STRENGTH.get(strategy, base.ewc.strength)
    return replace(
        base,
        replay=replace(
            base.replay,
            kind=replay_kind,  # type: ignore[arg-type] # ReplayConfig checks it
            capacity=replay_capacity if use_replay else 0,
        ),
        ewc=replace(
            base.ewc,
            enabled=use_ewc,
            strength=ewc_strength,
            strength_min=min(base.ewc.strength_min, ewc_strength),
            strength_max=max(base.ewc.strength_max, ewc_strength),
        ),
    )


def batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Fixed-shape batches over (x, y); the last one is padded and masked, never smaller."""
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        valid = len(xb)
        if valid < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - valid, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(batch_size - valid, yb.dtype)])
        yield Batch(xb, yb, np.arange(batch_size) < valid)


def _train_passes(learner: Learner, state, x, y, passes: int, rng: np.random.Generator):
    """`passes` shuffled epochs over (x, y); returns the state and the examples trained."""
    trained = 0
    for _ in range(passes):
        order = rng.permutation(len(x))
        for batch in batches(x[order], y[order], learner.batch_size):
            state, _ = learner.train_step(state, batch)
        trained += len(x)
    return state, trained


def run_continual(
    scenario: Scenario,
    strategy: str,
    *,
    seed: int = 0,
    passes: int = 1,
    config: LearnerConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train `strategy` through `scenario` and return the JSON-ready result."""
    config = config or strategy_config(strategy)
    learner = learner_for(config, scenario.example_shape, scenario.num_classes)
    state = learner.init(seed)
    rng = np.random.default_rng(seed)
    tests = [(s.test_x, s.test_y) for s in scenario.segments]
    say = progress or (lambda _message: None)

    started = time.perf_counter()
    train_seconds = 0.0
    trained = 0
    rows: list[list[float]] = []

    def evaluate_all(state) -> list[float]:
        return [learner.evaluate(state.params, x, y).accuracy for x, y in tests]

    if strategy == "joint":
        x = np.concatenate([s.train_x for s in scenario.segments])
        y = np.concatenate([s.train_y for s in scenario.segments])
        t0 = time.perf_counter()
        state, trained = _train_passes(learner, state, x, y, passes, rng)
        jax.block_until_ready(state.params)
        train_seconds = time.perf_counter() - t0
        rows.append(evaluate_all(state))
        say(f"joint: trained {trained} examples")
    else:
        for index, segment in enumerate(scenario.segments):
            t0 = time.perf_counter()
            state, n = _train_passes(learner, state, segment.train_x, segment.train_y, passes, rng)
            if config.ewc.enabled:
                # Task boundary: anchor here, with a Fisher estimated on this segment's data.
                order = rng.permutation(len(segment.train_x))
                state = learner.consolidate(state, segment.train_x[order], segment.train_y[order])
            jax.block_until_ready(state.params)
            train_seconds += time.perf_counter() - t0
            trained += n
            rows.append(evaluate_all(state))
            say(
                f"segment {index + 1}/{len(scenario.segments)} {segment.name}: "
                f"accuracy on it {rows[-1][index]:.3f}, mean so far {np.mean(rows[-1][: index + 1]):.3f}"
            )

    if strategy == "joint":
        avg_accuracy, forgetting, bwt = float(np.mean(rows[0])), None, None
    else:
        metrics = continual_metrics(np.array(rows))
        avg_accuracy, forgetting, bwt = metrics.avg_accuracy, metrics.forgetting, metrics.bwt
    return {
        "scenario": scenario.name,
        "strategy": strategy,
        "seed": seed,
        "passes": passes,
        "segments": [s.name for s in scenario.segments],
        "accuracy_matrix": rows,
        "avg_accuracy": avg_accuracy,
        "forgetting": forgetting,
        "bwt": bwt,
        "examples_trained": trained,
        "examples_per_second": trained / train_seconds if train_seconds else None,
        "wall_seconds": time.perf_counter() - started,
        "skipped_updates": int(state.skipped_updates),
        "config": {
            "model": config.model.kind,
            "hidden": list(config.model.hidden),
            "optimizer": config.optimizer,
            "learning_rate": config.learning_rate,
            "batch_size": config.batch_size,
            "replay_kind": config.replay.kind,
            "replay_capacity": config.replay.capacity,
            "replay_batch_size": config.replay.batch_size,
            "ewc_enabled": config.ewc.enabled,
            "ewc_strength": config.ewc.strength,
            "ewc_gamma": config.ewc.gamma,
        },
    }


def format_result(result: dict) -> str:
    """A readable accuracy matrix and the summary figures."""
    names = result["segments"]
    width = max(6, *(len(n) for n in names))
    row_names = ["joint"] if result["strategy"] == "joint" else [f"after {n}" for n in names]
    label = max(len(n) for n in row_names) + 2
    lines = [f"{result['scenario']} / {result['strategy']} / seed {result['seed']} / {result['passes']} pass(es)"]
    lines.append(" " * label + " ".join(f"{n:>{width}}" for n in names))
    for row_name, row in zip(row_names, result["accuracy_matrix"]):
        lines.append(f"{row_name:<{label}}" + " ".join(f"{a:>{width}.3f}" for a in row))

    def fmt(value):
        return "n/a" if value is None else f"{value:.3f}"

    lines.append(
        f"avg accuracy {fmt(result['avg_accuracy'])}  forgetting {fmt(result['forgetting'])}  "
        f"bwt {fmt(result['bwt'])}  {result['examples_per_second'] or 0:.0f} examples/s  "
        f"{result['wall_seconds']:.1f} s"
    )
    return "\n".join(lines)
