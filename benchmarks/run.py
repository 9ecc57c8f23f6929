"""`make bench`: run every benchmark, write raw JSON to bench-results/, print the summary tables.

Learning quality is reported as mean and std over three seeds; speed as medians and
ratios measured within one run (these machines are noisy, absolute rates are not
comparable across runs). Usage: python -m continuity.benchmarks.run
[--only cl|step|guard|ingest|pipeline|reliability|scale|prequential] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from continuity.benchmarks import STRATEGIES

SEEDS = (0, 1, 2)
PASSES = 3

# Replay buffer size per scenario: split-digits uses the 200 its target names; permuted-digits,
# ten domains of ~1,440 examples, uses 1,000 (7% of its stream; 200 is reported too).
CL_SUITES = {
    "permuted-digits": {"replay_capacity": 1000},
    "split-digits": {"replay_capacity": 200},
}


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def run_cl(out: Path) -> list[str]:
    from continuity.benchmarks.continual import run_continual, strategy_config
    from continuity.stream.scenarios import make_scenario

    lines = []
    for scenario_name, options in CL_SUITES.items():
        results: dict[str, list[dict]] = {}  # strategy -> one result per seed
        for strategy in STRATEGIES:
            for seed in SEEDS:
                scenario = make_scenario(scenario_name, seed=seed)
                config = strategy_config(strategy, replay_capacity=options["replay_capacity"])
                result = run_continual(scenario, strategy, seed=seed, passes=PASSES, config=config)
                results.setdefault(strategy, []).append(result)
                (out / f"cl-{scenario_name}-{strategy}-seed{seed}.json").write_text(json.dumps(result, indent=2))
                print(
                    f"  {scenario_name} {strategy} seed {seed}: avg accuracy {result['avg_accuracy']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
        joint = statistics.mean(r["avg_accuracy"] for r in results["joint"])
        naive_forgetting = statistics.mean(r["forgetting"] for r in results["naive"])
        lines += [
            f"### {scenario_name} ({len(scenario.segments)} segments, {PASSES} passes, seeds {list(SEEDS)}, "
            f"replay buffer {options['replay_capacity']})",
            "",
            "| strategy | avg accuracy | forgetting | BWT | avg acc / joint | forgetting / naive | examples/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for strategy, runs in results.items():
            acc = [r["avg_accuracy"] for r in runs]
            fgt = [r["forgetting"] for r in runs]
            rel_fgt = "n/a" if strategy == "joint" else f"{statistics.mean(fgt) / naive_forgetting:.2f}"
            lines.append(
                f"| {strategy} | {_mean_std(acc)} | {_mean_std(fgt)} | {_mean_std(r['bwt'] for r in runs)} | "
                f"{statistics.mean(acc) / joint:.3f} | {rel_fgt} | "
                f"{statistics.median(r['examples_per_second'] for r in runs):,.0f} |"
            )
        lines.append("")
    return lines


def run_step(out: Path) -> list[str]:
    from continuity.benchmarks.step import run_step_benchmark

    result = run_step_benchmark()
    (out / "step.json").write_text(json.dumps(result, indent=2))
    return [
        f"### bench step (batch {result['batch_size']}, K = {result['steps_per_dispatch']}, MLP 256x256, "
        f"reservoir replay {result['replay_batch_size']} rows/step, EWC on)",
        "",
        "| plain step samples/s | continual, K | continual, K = 1 | continual / plain | K / K = 1 "
        "| compilations after warm-up |",
        "|---|---|---|---|---|---|",
        f"| {result['plain_samples_per_second']:,.0f} | {result['samples_per_second']:,.0f} | "
        f"{result['k1_samples_per_second']:,.0f} | {result['ratio']:.2f} | {result['speedup_over_k1']:.2f} | "
        f"{result['compilations_after_warmup']} |",
        "",
    ]


def run_ingest(out: Path) -> list[str]:
    from continuity.benchmarks.ingest import format_result, run_ingest_benchmark

    result = run_ingest_benchmark()
    (out / "ingest.json").write_text(json.dumps(result, indent=2))
    return ["### bench ingest (embedded Tansu broker)", "", "```", format_result(result), "```", ""]


def run_guard(out: Path) -> list[str]:
    from continuity.benchmarks.guard_costs import run_guard_costs
    from continuity.benchmarks.guard_suite import format_case, format_matrix, run_guard_matrix

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    matrix = run_guard_matrix(seeds=SEEDS, progress=lambda row: progress(format_case(row)))
    (out / "guard-matrix.json").write_text(json.dumps(matrix, indent=2))
    lines = [
        f"### bench guard (windows of 1,000, seeds {list(SEEDS)}; damage on permuted-digits, 6 segments, "
        "the last damaged)",
        "",
        *format_matrix(matrix),
    ]
    costs = run_guard_costs()
    (out / "guard-costs.json").write_text(json.dumps(costs, indent=2))
    lines += [
        "",
        f"- rollback from the on-device copy ({costs['parameters']:,} parameters): median "
        f"{costs['rollback_ms_median']:.1f} ms, max {costs['rollback_ms_max']:.1f} ms",
        f"- blocking time of an async save (same state): median {costs['save_blocking_ms_median']:.1f} ms, "
        f"max {costs['save_blocking_ms_max']:.1f} ms",
    ]
    for overhead in costs["overhead"]:
        lines.append(
            f"- guard share of wall time, {overhead['stream']} stream ({overhead['segments']} segments), "
            f"windows of {overhead['every_examples']:,} examples: "
            f"{100 * overhead['guard_overhead_fraction']:.1f}% ({overhead['windows']} windows, "
            f"{overhead['guard_seconds']:.2f} s of {overhead['wall_seconds']:.2f} s; "
            f"{overhead['rollbacks']} rollbacks, {overhead['quarantined_records']:,} records quarantined)"
        )
    for cost in costs["judgement"]:
        lines.append(
            f"- one judgement, {cost['model']} ({cost['parameters']:,} parameters): candidate on "
            f"{cost['probe_rows']:,} probe rows {cost['evaluate_ms']:.1f} ms + Fisher {cost['fisher_ms']:.1f} ms "
            f"= training {cost['judgement_in_training_examples']:,.0f} examples "
            f"({cost['train_example_us']:.1f} us each); the Fisher of {cost['fisher_samples']} rows alone "
            f"{cost['fisher_only_ms']:.1f} ms, with per-example gradients for every parameter "
            f"{cost['fisher_all_per_example_ms']:.1f} ms"
        )
    lines.append("")
    return lines


def run_pipeline(out: Path) -> list[str]:
    from continuity.benchmarks.pipeline import format_result, run_pipeline_benchmark

    result = run_pipeline_benchmark()
    (out / "pipeline.json").write_text(json.dumps(result, indent=2))
    return ["### bench pipeline (serve from Kafka, 1M examples)", "", "```", format_result(result), "```", ""]


def run_reliability(out: Path) -> list[str]:
    from continuity.benchmarks.reliability import format_result, run_reliability_benchmark

    result = run_reliability_benchmark()
    (out / "reliability.json").write_text(json.dumps(result, indent=2))
    return ["### checkpoint integrity (default config)", "", "```", format_result(result), "```", ""]


def run_scale(out: Path) -> list[str]:
    from continuity.benchmarks.scale import format_result, run_scale_benchmark

    result = run_scale_benchmark(processes=(1, 2))
    (out / "scale.json").write_text(json.dumps(result, indent=2))
    return [
        "### one model over 1, 2, 4 devices, in one process and in 2 (faked CPU devices where fewer)",
        "",
        "```",
        format_result(result),
        "```",
        "",
    ]


# The best of a short search on seed 100 (BENCHMARKS.md, "Prequential accuracy"), per stream.
PREQUENTIAL_TUNED: dict[str, tuple[str, ...]] = {
    "sea": ("learner.learning_rate=0.01", "learner.batch_size=8", 'replay.kind="fifo"', "model.hidden=[32,32]"),
    "hyperplane": (
        "learner.learning_rate=0.005",
        "learner.batch_size=2",
        'replay.kind="fifo"',
        "replay.asymmetric=false",
        "model.hidden=[8,8]",
        "probe.holdout_fraction=0.02",
    ),
    "rbf-drift": ("learner.batch_size=8", 'replay.kind="fifo"'),
    "agrawal": ("learner.learning_rate=0.01", "learner.batch_size=8", 'replay.kind="fifo"'),
}


def run_prequential(out: Path) -> list[str]:
    from continuity.benchmarks.prequential import run_prequential_benchmark
    from continuity.stream.drift import DRIFT_SCENARIOS

    lines = [
        "### bench prequential (20,000 examples, test-then-train accuracy, mean ± std over seeds 0-2)",
        "",
        "| stream | default MLP | tuned | tuned config |",
        "|---|---|---|---|",
    ]
    for scenario in DRIFT_SCENARIOS:
        figures: dict[str, list[float]] = {}
        for label, overrides in (("default", ()), ("tuned", PREQUENTIAL_TUNED.get(scenario, ()))):
            for seed in SEEDS:
                result = run_prequential_benchmark(scenario, seed=seed, overrides=overrides)
                (out / f"prequential-{scenario}-{label}-seed{seed}.json").write_text(json.dumps(result, indent=2))
                figures.setdefault(label, []).append(result["prequential_accuracy"])
        tuned = " ".join(PREQUENTIAL_TUNED.get(scenario, ())) or "(default)"
        lines.append(f"| {scenario} | {_mean_std(figures['default'])} | {_mean_std(figures['tuned'])} | {tuned} |")
    return [*lines, ""]


BENCHMARKS = {
    "cl": run_cl,
    "step": run_step,
    "guard": run_guard,
    "ingest": run_ingest,
    "pipeline": run_pipeline,
    "reliability": run_reliability,
    "scale": run_scale,
    "prequential": run_prequential,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in args.only or list(BENCHMARKS):
        started = time.perf_counter()
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        lines += BENCHMARKS[name](args.out)
        print(f"bench {name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    summary = "\n".join(lines)
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
