"""`bench guard`: what the guard saves when a labeler breaks.

The same scenario runs through the training loop three ways: clean; poisoned without
the guard (every candidate accepted); poisoned with the guard. The poisoned segment is
a broken upstream labeler: inputs drawn like an earlier segment's, labels corrupted.
Each run's final model is scored on the held-out test split of every segment that is
clean in both streams (the poisoned slot differs between them, so it is left out);
`guarded_vs_clean` and `unguarded_vs_clean` are the ratios of those mean accuracies.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace

import numpy as np

from continuity.checkpoints import CheckpointStore
from continuity.factory import learner_for
from continuity.guard import GuardConfig
from continuity.learner import EWCConfig, Learner, LearnerConfig, ReplayConfig
from continuity.loop import StreamInput, TrainingLoop
from continuity.probe import ProbeConfig
from continuity.stream import FeatureSpec, MemoryDeadLetters, ScenarioSource, make_codec
from continuity.stream.scenarios import GUARD_EVERY_EXAMPLES, make_scenario

# The learner and guard settings the demo uses (see BENCHMARKS.md for why these).
GUARD_LEARNER = LearnerConfig(
    replay=ReplayConfig(kind="reservoir", capacity=1000, batch_size=32),
    ewc=EWCConfig(enabled=True, strength=100.0, strength_min=10.0),
)
GUARD_PROBE = ProbeConfig(holdout_fraction=0.1)
# The guard at the digits scenarios' cadence (their segments last ~1,400 examples).
DIGITS_GUARD = GuardConfig(every_examples=GUARD_EVERY_EXAMPLES)


def run_scenario_through_loop(
    scenario,
    *,
    guard: GuardConfig,
    seed: int,
    learner_config: LearnerConfig = GUARD_LEARNER,
    probe: ProbeConfig = GUARD_PROBE,
    directory=None,
    learner: Learner | None = None,
    checkpoint_every_s: float = 0.0,
    examples_per_record: int = 1,
) -> dict:
    """One scenario through the real loop (in-memory source, real Orbax store); final test accuracies.

    Pass a `learner` already used once to measure without its compilations.
    """
    codec = make_codec("binary", FeatureSpec(scenario.example_shape, "float32", scenario.num_classes))
    quarantine = MemoryDeadLetters()

    def open_source(positions):
        return ScenarioSource(scenario, codec, start=positions, examples_per_record=examples_per_record)

    stream = StreamInput(open_source=open_source, codec=codec, dead_letters=MemoryDeadLetters(), quarantine=quarantine)
    learner = learner or learner_for(learner_config, scenario.example_shape, scenario.num_classes)
    with tempfile.TemporaryDirectory(prefix="continuity-bench-guard-") as scratch:
        store = CheckpointStore(directory or scratch)
        loop = TrainingLoop(
            stream, learner, store, probe=probe, guard=guard, seed=seed, checkpoint_every_s=checkpoint_every_s
        )
        started = time.perf_counter()
        summary = loop.run()
        seconds = time.perf_counter() - started
        ledger = store.ledger.read()
        windows = [_window(event) for event in ledger if event["event"] == "probe"]
        quarantined = [(_offset(e["from"]), _offset(e["to"])) for e in ledger if e["event"] == "quarantine"]
        store.close()
    accuracy = [learner.evaluate(loop.final_state.params, s.test_x, s.test_y).accuracy for s in scenario.segments]
    return {
        "segments": [s.name for s in scenario.segments],
        "test_accuracy": accuracy,
        "probe_accuracy": summary.probe_accuracy,
        "rollbacks": summary.rollbacks,
        "retries": summary.retries,
        "quarantined_records": summary.quarantined_records,
        "windows": summary.windows,
        "examples_trained": summary.examples_trained,
        # The surviving lineage's trained examples: the last checkpoint's (the stream's end is always saved).
        "lineage_examples": ([0] + [e["lineage_examples"] for e in ledger if e["event"] == "accept"])[-1],
        "prequential_accuracy": summary.prequential_accuracy,
        "prequential_examples": summary.prequential_examples,
        "wall_seconds": seconds,
        "guard_seconds": summary.guard_seconds,
        "judged": windows,
        "quarantined_spans": quarantined,
    }


def _window(probe_event: dict) -> dict:
    """One judged window from its ledger line: the records it covered, and whether it regressed and why."""
    verdict = probe_event["verdict"]
    return {
        "window": probe_event["window"],
        "from": _offset(probe_event["from"]),
        "to": _offset(probe_event["to"]),
        "regressed": verdict["regressed"],
        "scopes": verdict["regressed_scopes"],
        "fired": [_label(test) for test in verdict.get("fired", [])],
        "window_checks": verdict.get("window"),
        "probe": {
            name: (scope["good_accuracy"], scope["candidate_accuracy"])
            for name, scope in verdict["segments"].items()
            if "good_accuracy" in scope
        },
    }


def _offset(positions: list) -> int:
    """The offset of a one-partition stream's position (JSON), 0 before the first record."""
    return positions[0]["offset"] if positions else 0


def _label(test: dict) -> str:
    """A fired test in a few words: "probe:<scope>" or "window.<indicator>"."""
    return f"probe:{test['scope']}" if test["check"] == "probe" else test["check"]


def run_guard_benchmark(
    scenario_name: str = "permuted-digits",
    *,
    poison: int = 5,
    seed: int = 0,
    segments: int | None = 6,
    guard: GuardConfig | None = None,
) -> dict:
    """Three runs (four with the retry comparison); the poison should sit late, so its damage lasts to the end."""
    guard = guard or DIGITS_GUARD
    clean = make_scenario(scenario_name, seed=seed, segments=segments)
    poisoned = make_scenario(scenario_name, seed=seed, segments=segments, poison=poison)
    runs = {
        "clean": run_scenario_through_loop(clean, guard=guard, seed=seed),
        "poisoned_unguarded": run_scenario_through_loop(poisoned, guard=replace(guard, enabled=False), seed=seed),
        "poisoned_guarded": run_scenario_through_loop(poisoned, guard=guard, seed=seed),
    }
    if guard.on_regression != "retry":
        # The other reaction, for comparison: retry the window with a boosted lambda first.
        runs["poisoned_guarded_retry"] = run_scenario_through_loop(
            poisoned, guard=replace(guard, on_regression="retry"), seed=seed
        )
    shared = [i for i in range(len(clean.segments)) if i != poison]
    for run in runs.values():
        run["clean_segments_accuracy"] = float(np.mean([run["test_accuracy"][i] for i in shared]))
    base = runs["clean"]["clean_segments_accuracy"]
    return {
        "scenario": scenario_name,
        "poison": poison,
        "poisoned_segment": poisoned.segments[poison].name,
        "seed": seed,
        "guard": {
            "every_examples": guard.every_examples,
            "tolerance": guard.tolerance,
            "alpha": guard.alpha,
            "on_regression": guard.on_regression,
            "max_retries": guard.max_retries,
        },
        "runs": runs,
        "guarded_vs_clean": runs["poisoned_guarded"]["clean_segments_accuracy"] / base,
        "unguarded_vs_clean": runs["poisoned_unguarded"]["clean_segments_accuracy"] / base,
    }


def format_result(result: dict) -> str:
    lines = [
        f"{result['scenario']}, poisoned segment {result['poison']} ({result['poisoned_segment']}), "
        f"seed {result['seed']}"
    ]
    lines.append(f"{'run':<20} {'clean-segment acc':>17} {'probe acc':>9} {'rollbacks':>9} {'quarantined':>11}")
    for name, run in result["runs"].items():
        probe = "n/a" if run["probe_accuracy"] is None else f"{run['probe_accuracy']:.3f}"
        lines.append(
            f"{name:<20} {run['clean_segments_accuracy']:>17.3f} {probe:>9} {run['rollbacks']:>9} "
            f"{run['quarantined_records']:>11}"
        )
    lines.append(
        f"guarded_vs_clean {result['guarded_vs_clean']:.3f}   unguarded_vs_clean {result['unguarded_vs_clean']:.3f}"
    )
    return "\n".join(lines)
