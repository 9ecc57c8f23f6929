"""`bench guard`: does the guard let clean drift through and stop every kind of damage?

Two questions, each answered through the real loop (in-memory source, real Orbax store):

- **Clean streams** (`SUITE_STREAMS`): the stream runs guarded and unguarded (every
  candidate accepted). `clean_quarantined_share` is the share of its records the guard
  quarantined (target: at most 1%); `clean_guarded_vs_unguarded` the guarded final
  accuracy over the unguarded one (target: at least the unguarded one minus 0.01).
- **Damage** (`stream.damage`: a kind, injected as a segment or as a burst inside one):
  the damaged stream runs guarded and unguarded beside the clean one.
  `guarded_vs_clean` and `unguarded_vs_clean` compare final accuracy on the segments
  clean in both streams with the clean run's (target: at least 0.98); `caught` says when
  the guard first rolled back after the damage began (in windows and in records trained
  by then), and how many damaged records ended in accepted windows anyway (leaked).

Final accuracy is the final model's mean test accuracy over the scored segments. For the
drift streams, whose concepts contradict each other (SEA's thresholds, Agrawal's
functions), it is the newest concept's: a drifting learner should follow the stream,
not its history.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from continuity.stream.damage import DAMAGE_KINDS, DEFAULT_BURST_EXAMPLES, PLACEMENTS, damage_scenario
from continuity.stream.scenarios import NUM_CLASSES, Scenario, make_scenario

if TYPE_CHECKING:  # the loop, the learner and JAX load only when a benchmark runs, not with the CLI
    from continuity.guard import GuardConfig
    from continuity.learner import Learner

DIGITS_STREAMS = ("permuted-digits", "rotated-digits", "split-digits", "stationary-digits")
DRIFT_STREAMS = ("sea-abrupt", "sea-gradual", "agrawal-abrupt", "agrawal-gradual")
SUITE_STREAMS = DIGITS_STREAMS + DRIFT_STREAMS
# Segments of each digits stream: 60 permutations (the stream today's rule quarantined 18% of);
# a rotation growing 9 degrees per segment; five class pairs (three passes each); six passes over
# unchanging digits.
DEFAULT_SEGMENTS = {"permuted-digits": 60, "rotated-digits": 20, "split-digits": 5, "stationary-digits": 6}
SPLIT_PASSES = 3  # split-digits' class pairs hold ~288 examples each: 1,438 in all would be under two windows
DRIFT_EXAMPLES = 20_000  # per drift stream: 4 concepts of 5,000 examples, 20 windows of 1,000
# The damage matrix runs on short digits streams (their last segment damaged), so each run is seconds.
DAMAGE_SEGMENTS = 6


def suite_scenario(name: str, *, seed: int, segments: int | None = None, examples: int | None = None) -> Scenario:
    """The clean stream `name` of the suite (one of SUITE_STREAMS)."""
    if name not in SUITE_STREAMS:
        raise ValueError(f"guard suite stream must be one of {', '.join(map(repr, SUITE_STREAMS))}. Got {name!r}.")
    if name in DRIFT_STREAMS:
        from continuity.stream.drift import drift_scenario, make_drift_stream

        generator, drift = name.split("-")
        stream = make_drift_stream(generator, examples=examples or DRIFT_EXAMPLES, seed=seed, drift=drift)
        return drift_scenario(stream, test_examples=1_000)
    count = segments or DEFAULT_SEGMENTS[name]
    if name == "stationary-digits":
        return _stationary(seed, count)
    if name == "split-digits":  # five class pairs of ~288 examples: each pass three times, as `bench cl` does
        return _passes(make_scenario(name, seed=seed), SPLIT_PASSES, seed)
    return make_scenario(name, seed=seed, segments=count)


def _passes(scenario: Scenario, passes: int, seed: int) -> Scenario:
    """Each segment's train examples `passes` times over, each pass in a fresh seeded order."""
    rng = np.random.default_rng([seed, 0x9A55])
    segments = []
    for segment in scenario.segments:
        order = np.concatenate([rng.permutation(len(segment.train_y)) for _ in range(passes)])
        segments.append(replace(segment, train_x=segment.train_x[order], train_y=segment.train_y[order]))
    return replace(scenario, segments=tuple(segments))


def _stationary(seed: int, passes: int) -> Scenario:
    """Unchanging digits: `passes` passes over one train split, each in a fresh order, all one segment."""
    base = make_scenario("permuted-digits", seed=seed, segments=1).segments[0]  # segment 0: no permutation
    rng = np.random.default_rng([seed, 0x57A7])
    parts = []
    for _ in range(passes):
        order = rng.permutation(len(base.train_y))
        parts.append(replace(base, name="digits", train_x=base.train_x[order], train_y=base.train_y[order]))
    return Scenario("stationary-digits", tuple(parts), NUM_CLASSES, base.train_x.shape[1:], seed)


class _Learners:
    """One Learner per example shape and class count, so the runs of a benchmark compile once."""

    def __init__(self):
        self._made: dict = {}

    def __call__(self, scenario: Scenario) -> Learner:
        from continuity.benchmarks.guard import GUARD_LEARNER
        from continuity.factory import learner_for

        key = (scenario.example_shape, scenario.num_classes)
        if key not in self._made:
            self._made[key] = learner_for(GUARD_LEARNER, scenario.example_shape, scenario.num_classes)
        return self._made[key]


def final_accuracy(run: dict, scenario: Scenario, scored: list[int]) -> float:
    """Mean test accuracy over the `scored` segments; the newest concept's alone for drift streams."""
    if scenario.name in ("sea", "agrawal", "hyperplane", "rbf-drift"):
        return float(run["test_accuracy"][scored[-1]])
    return float(np.mean([run["test_accuracy"][i] for i in scored]))


def _records(scenario: Scenario) -> int:
    return sum(len(s.train_y) for s in scenario.segments)


def _damaged_offsets(scenario: Scenario) -> np.ndarray:
    """Record offsets (one example per record, in segment order) of the damaged examples."""
    flags = [s.damaged if s.damaged is not None else np.zeros(len(s.train_y), bool) for s in scenario.segments]
    return np.flatnonzero(np.concatenate(flags))


def _trained(run: dict, records: int) -> np.ndarray:
    """Which records (one example each, by offset) ended in the surviving lineage: in an accepted
    window and not in a quarantined span (an excision quarantines part of an accepted window)."""
    trained = np.zeros(records, bool)
    for window in run["judged"]:
        if not window["regressed"]:
            trained[window["from"] : window["to"]] = True
    for start, end in run["quarantined_spans"]:
        trained[start:end] = False
    return trained


def caught(run: dict, damaged: np.ndarray, records: int) -> dict:
    """When the guard caught the damage at `damaged` (record offsets), from the run's judged windows.

    windows: judged windows from the first one holding damage to the first that regressed
    while holding damage, both counted (1: caught in the window the damage began in);
    None when none regressed. records_trained_before: damaged records in those windows.
    leaked: damaged records in the surviving lineage (trained and kept), over the whole run.
    fired: what fired in that first regressed window.
    """
    first, last = int(damaged.min()), int(damaged.max()) + 1
    leaked = int(_trained(run, records)[damaged].sum())

    def damaged_in(window: dict) -> int:
        lo, hi = max(window["from"], first), min(window["to"], last)
        return 0 if hi <= lo else int(np.searchsorted(damaged, hi) - np.searchsorted(damaged, lo))

    judged = run["judged"]
    touched = [i for i, w in enumerate(judged) if damaged_in(w)]
    rolled_back = next((i for i in touched if judged[i]["regressed"]), None)
    if rolled_back is None:
        return {"windows": None, "records_trained_before": None, "leaked": leaked, "fired": []}
    start = touched[0]
    return {
        "windows": rolled_back - start + 1,
        "records_trained_before": sum(damaged_in(w) for w in judged[start : rolled_back + 1]),
        "leaked": leaked,
        "fired": sorted(set(judged[rolled_back]["fired"] or judged[rolled_back]["scopes"])),
    }


def _summary(run: dict) -> dict:
    """A run's figures without its per-window list (kept out of the JSON: it grows with the stream)."""
    return {k: v for k, v in run.items() if k not in ("judged", "quarantined_spans")}


def run_guard_suite_case(
    stream: str,
    *,
    seed: int = 0,
    segments: int | None = None,
    examples: int | None = None,
    damage: str | None = None,
    at: int | None = None,
    source: int = 0,
    placement: str = "segment",
    burst_examples: int = DEFAULT_BURST_EXAMPLES,
    guard: GuardConfig | None = None,
    learners: _Learners | None = None,
    clean_runs: dict | None = None,
) -> dict:
    """One row of the suite: `stream` clean (guarded, unguarded) and, with `damage`, damaged (both ways).

    `clean_runs` (the clean pair of an earlier call with the same stream and seed) is reused.
    """
    from continuity.benchmarks.guard import DIGITS_GUARD, run_scenario_through_loop

    guard = guard or DIGITS_GUARD
    learners = learners or _Learners()
    clean = suite_scenario(stream, seed=seed, segments=segments, examples=examples)

    def through_loop(scenario: Scenario, enabled: bool) -> dict:
        return run_scenario_through_loop(
            scenario, guard=replace(guard, enabled=enabled), seed=seed, learner=learners(scenario)
        )

    if clean_runs is None:
        clean_runs = {"guarded": through_loop(clean, True), "unguarded": through_loop(clean, False)}
    every = list(range(len(clean.segments)))
    records = _records(clean)
    result = {
        "scenario": stream,
        "seed": seed,
        "segments": len(clean.segments),
        "records": records,
        "guard": {
            "every_examples": guard.every_examples,
            "tolerance": guard.tolerance,
            "alpha": guard.alpha,
            "on_regression": guard.on_regression,
        },
        "clean": {name: _summary(run) for name, run in clean_runs.items()},
        "clean_quarantined_share": clean_runs["guarded"]["quarantined_records"] / records,
        "clean_rollbacks": clean_runs["guarded"]["rollbacks"],
        "clean_final_accuracy": {name: final_accuracy(run, clean, every) for name, run in clean_runs.items()},
        "clean_guarded_vs_unguarded": final_accuracy(clean_runs["guarded"], clean, every)
        / final_accuracy(clean_runs["unguarded"], clean, every),
        "clean_guarded_minus_unguarded": final_accuracy(clean_runs["guarded"], clean, every)
        - final_accuracy(clean_runs["unguarded"], clean, every),
        "guard_seconds": clean_runs["guarded"]["guard_seconds"],
        "wall_seconds": clean_runs["guarded"]["wall_seconds"],
        "damage": None,
        "guarded_vs_clean": None,
        "unguarded_vs_clean": None,
    }
    result["_clean_runs"] = clean_runs  # for the next damage kind on the same stream; dropped from the JSON
    if damage is None:
        return result
    at = len(clean.segments) - 1 if at is None else at
    damaged = damage_scenario(clean, damage, at=at, source=source, placement=placement, burst_examples=burst_examples)
    runs = {"guarded": through_loop(damaged, True), "unguarded": through_loop(damaged, False)}
    # The segment a "segment" placement replaced differs between the streams; a burst leaves every one.
    scored = [i for i in every if placement == "burst" or i != at]
    base = final_accuracy(clean_runs["guarded"], clean, scored)
    offsets = _damaged_offsets(damaged)
    result.update(
        {
            "damage": {
                "kind": damage,
                "placement": placement,
                "at": at,
                "source": source,
                "damaged_records": len(offsets),
                "records": _records(damaged),
            },
            "runs": {name: _summary(run) for name, run in runs.items()},
            "clean_segments_accuracy": {
                "clean": base,
                "clean_unguarded": final_accuracy(clean_runs["unguarded"], clean, scored),
                **{name: final_accuracy(run, damaged, scored) for name, run in runs.items()},
            },
            "guarded_vs_clean": final_accuracy(runs["guarded"], damaged, scored) / base,
            "unguarded_vs_clean": final_accuracy(runs["unguarded"], damaged, scored) / base,
            "caught": caught(runs["guarded"], offsets, _records(damaged)),
            "quarantined_records": runs["guarded"]["quarantined_records"],
            "clean_records_quarantined": _clean_quarantined(runs["guarded"], offsets, _records(damaged)),
            "rollbacks": runs["guarded"]["rollbacks"],
        }
    )
    result["_runs"] = runs
    return result


def _clean_quarantined(run: dict, damaged: np.ndarray, records: int) -> int:
    """Clean records the guard quarantined (the price of catching the damage with what surrounded it)."""
    quarantined = np.zeros(records, bool)
    for start, end in run["quarantined_spans"]:
        quarantined[start:end] = True
    quarantined[damaged] = False
    return int(quarantined.sum())


def public(result: dict) -> dict:
    """The result as written to JSON (without the cached clean runs)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def format_case(result: dict) -> str:
    lines = [
        f"{result['scenario']} ({result['segments']} segments, {result['records']:,} records), seed {result['seed']}"
    ]
    clean = result["clean"]
    lines.append(
        f"  clean: quarantined {result['clean_quarantined_share']:.1%} ({clean['guarded']['quarantined_records']:,} "
        f"records, {result['clean_rollbacks']} rollbacks); final accuracy guarded "
        f"{result['clean_final_accuracy']['guarded']:.3f} vs unguarded "
        f"{result['clean_final_accuracy']['unguarded']:.3f} "
        f"({result['clean_guarded_minus_unguarded']:+.3f}); guard {result['guard_seconds']:.1f} s of "
        f"{result['wall_seconds']:.1f} s"
    )
    damage = result["damage"]
    if damage is not None:
        c = result["caught"]
        when = "not caught" if c["windows"] is None else f"caught in {c['windows']} window(s)"
        lines.append(
            f"  damage {damage['kind']} ({damage['placement']} at {damage['at']}, {damage['damaged_records']:,} "
            f"records): guarded_vs_clean {result['guarded_vs_clean']:.3f}, unguarded_vs_clean "
            f"{result['unguarded_vs_clean']:.3f}; {when}, leaked {c['leaked']:,}; {result['rollbacks']} rollbacks, "
            f"{result['clean_records_quarantined']:,} clean records quarantined; fired: {', '.join(c['fired']) or '-'}"
        )
    return "\n".join(lines)


# ---- the matrix (python -m continuity.benchmarks.run --only guard) --------------------------------


def run_guard_matrix(
    *, seeds=(0, 1, 2), streams=SUITE_STREAMS, kinds=DAMAGE_KINDS, placements=PLACEMENTS, progress=None
) -> dict:
    """Every clean stream, and every damage kind and placement on permuted-digits, for each seed."""
    learners = _Learners()
    clean_rows, damage_rows = [], []
    for seed in seeds:
        for stream in streams:
            row = run_guard_suite_case(stream, seed=seed, learners=learners)
            clean_rows.append(public(row))
            if progress:
                progress(row)
        pair = None
        for placement in placements:
            for kind in kinds:
                row = run_guard_suite_case(
                    "permuted-digits",
                    seed=seed,
                    segments=DAMAGE_SEGMENTS,
                    damage=kind,
                    placement=placement,
                    learners=learners,
                    clean_runs=pair,
                )
                pair = row["_clean_runs"]
                damage_rows.append(public(row))
                if progress:
                    progress(row)
    return {"clean": clean_rows, "damage": damage_rows}


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def format_matrix(matrix: dict) -> list[str]:
    """The two tables BENCHMARKS.md records."""
    lines = [
        "| clean stream | quarantined share (per seed) | rollbacks | final acc. guarded | unguarded | "
        "guarded - unguarded | guard s / wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    by_stream: dict[str, list[dict]] = {}
    for row in matrix["clean"]:
        by_stream.setdefault(row["scenario"], []).append(row)
    for stream, rows in by_stream.items():
        lines.append(
            f"| {stream} | {', '.join(format(r['clean_quarantined_share'], '.1%') for r in rows)} | "
            f"{', '.join(str(r['clean_rollbacks']) for r in rows)} | "
            f"{_mean_std(r['clean_final_accuracy']['guarded'] for r in rows)} | "
            f"{_mean_std(r['clean_final_accuracy']['unguarded'] for r in rows)} | "
            f"{_mean_std(r['clean_guarded_minus_unguarded'] for r in rows)} | "
            f"{sum(r['guard_seconds'] for r in rows):.0f} / {sum(r['wall_seconds'] for r in rows):.0f} |"
        )
    lines += [
        "",
        "| damage (placement) | guarded / clean | unguarded / clean | caught in windows (per seed) | "
        "damaged records leaked | clean records quarantined | fired |",
        "|---|---|---|---|---|---|---|",
    ]
    by_damage: dict[tuple, list[dict]] = {}
    for row in matrix["damage"]:
        by_damage.setdefault((row["damage"]["kind"], row["damage"]["placement"]), []).append(row)
    for (kind, placement), rows in by_damage.items():
        fired = sorted({f for r in rows for f in r["caught"]["fired"]})
        lines.append(
            f"| {kind} ({placement}) | {_mean_std(r['guarded_vs_clean'] for r in rows)} | "
            f"{_mean_std(r['unguarded_vs_clean'] for r in rows)} | "
            f"{', '.join('-' if r['caught']['windows'] is None else str(r['caught']['windows']) for r in rows)} | "
            f"{', '.join(str(r['caught']['leaked']) for r in rows)} | "
            f"{', '.join(str(r['clean_records_quarantined']) for r in rows)} | {', '.join(fired) or '-'} |"
        )
    return lines
