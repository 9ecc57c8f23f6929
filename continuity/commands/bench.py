"""`continuity bench ...`: reproducible learning-quality and speed benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

from continuity.benchmarks import STRATEGIES
from continuity.benchmarks.guard_suite import SUITE_STREAMS
from continuity.commands.arguments import add_set_argument, device_counts, positive_int, replay_layouts
from continuity.commands.ingest import add_ingest_parser
from continuity.commands.results import write_json
from continuity.stream.damage import DAMAGE_KINDS, PLACEMENTS
from continuity.stream.drift import DRIFT_SCENARIOS
from continuity.stream.scenarios import GUARD_EVERY_EXAMPLES, SCENARIOS


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark and write its JSON result")
    kinds = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", parser_class=type(bench))
    kinds.required = True

    cl = kinds.add_parser("cl", help="continual-learning quality: accuracy matrix, forgetting, BWT")
    cl.add_argument("--scenario", required=True, choices=SCENARIOS)
    cl.add_argument("--strategy", required=True, choices=STRATEGIES)
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--passes", type=positive_int, default=1, help="epochs over each segment (default 1)")
    cl.add_argument("--segments", type=positive_int, default=None, help="number of segments (scenario default)")
    cl.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    cl.add_argument(
        "--replay-capacity",
        type=positive_int,
        default=None,
        help="replay buffer size for replay strategies (default 200)",
    )
    cl.add_argument("--replay-kind", choices=("reservoir", "class_balanced", "fifo"), default="reservoir")
    cl.add_argument(
        "--ewc-strength", type=float, default=None, help="EWC lambda (default 1000 for ewc, 10 for ewc+replay)"
    )
    cl.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the result here")
    cl.set_defaults(handler=run_cl)

    step = kinds.add_parser(
        "step", help="samples/s of the full continual step at K and K = 1 vs a plain scanned step at K"
    )
    step.add_argument("--batch-size", type=positive_int, default=32)
    step.add_argument("--replay-batch-size", type=positive_int, default=16, help="replayed rows per step")
    step.add_argument(
        "--steps-per-dispatch", type=positive_int, default=8, metavar="K", help="updates per dispatch (default 8)"
    )
    step.add_argument("--steps", type=positive_int, default=512, help="updates per timed repeat")
    step.add_argument("--repeats", type=positive_int, default=5)
    step.add_argument("--json", type=Path, default=None, metavar="PATH")
    step.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="trace one more repeat of the continual step into DIR (jax.profiler) and print where its time went",
    )
    step.set_defaults(handler=run_step)

    guard = kinds.add_parser(
        "guard", help="a clean stream guarded vs unguarded; with --poison-kind, damaged too (vs clean and unguarded)"
    )
    guard.add_argument(
        "--scenario",
        choices=SUITE_STREAMS,
        default="permuted-digits",
        metavar="STREAM",
        help=f"{', '.join(SUITE_STREAMS)} (default permuted-digits)",
    )
    guard.add_argument(
        "--segments",
        type=positive_int,
        default=None,
        help="digits streams: segments (default: permuted 60, rotated 20, split 5, stationary 6)",
    )
    guard.add_argument("--examples", type=positive_int, default=None, help="drift streams: examples (default 20,000)")
    guard.add_argument(
        "--poison-kind", choices=DAMAGE_KINDS, default=None, metavar="KIND", help=f"damage: {', '.join(DAMAGE_KINDS)}"
    )
    guard.add_argument(
        "--poison",
        type=int,
        default=None,
        metavar="SEGMENT",
        help="the segment the damage replaces or bursts into (default: the last); alone, means --poison-kind shuffle",
    )
    guard.add_argument(
        "--placement", choices=PLACEMENTS, default="segment", help="a whole segment, or a burst inside one"
    )
    guard.add_argument(
        "--poison-source", type=int, default=0, metavar="SEGMENT", help="the segment whose inputs the damage reuses"
    )
    guard.add_argument("--seed", type=int, default=0)
    guard.add_argument(
        "--every-examples",
        type=positive_int,
        default=GUARD_EVERY_EXAMPLES,
        metavar="N",
        help=f"judge every N trained examples (default {GUARD_EVERY_EXAMPLES:,}: the digits' segments last ~1,400)",
    )
    guard.add_argument("--json", type=Path, default=None, metavar="PATH")
    guard.set_defaults(handler=run_guard)

    pipeline = kinds.add_parser(
        "pipeline", help="examples/s through serve vs the ingest and compute limits; RSS growth"
    )
    pipeline.add_argument("--examples", type=positive_int, default=1_000_000)
    pipeline.add_argument("--json", type=Path, default=None, metavar="PATH")
    add_set_argument(
        pipeline, "override the service config, e.g. --set probe.every_examples=1000000 (guard off)", dest="overrides"
    )
    pipeline.add_argument(
        "--compare-k1",
        action="store_true",
        help="run it again at learner.steps_per_dispatch = 1 on the same topic and report both",
    )
    pipeline.set_defaults(handler=run_pipeline)

    scale = kinds.add_parser(
        "scale", help="examples/s and step time of one model over 1, 2, 4... devices at a fixed per-device batch"
    )
    scale.add_argument(
        "--devices",
        type=device_counts,
        default=(1, 2, 4),
        metavar="N,N,...",
        help="device counts, each run in its own process (faked CPU devices where too few) (default 1,2,4)",
    )
    scale.add_argument(
        "--processes",
        type=device_counts,
        default=(1,),
        metavar="P,P,...",
        help="also run each device count N that P divides as P processes of N/P devices, over gloo (default 1)",
    )
    scale.add_argument("--per-device-batch", type=positive_int, default=32, help="rows per device per step")
    scale.add_argument(
        "--steps-per-dispatch", type=positive_int, default=8, metavar="K", help="updates per dispatch (default 8)"
    )
    scale.add_argument("--steps", type=positive_int, default=256, help="updates per timed repeat")
    scale.add_argument("--repeats", type=positive_int, default=3)
    scale.add_argument(
        "--check-dispatches",
        type=positive_int,
        default=32,
        help="dispatches trained on N devices and on one before comparing params (default 32)",
    )
    scale.add_argument(
        "--replay",
        type=replay_layouts,
        default=("replicated",),
        metavar="LAYOUT,...",
        help="replay layouts ([scale] replay_layout) each device count runs with: replicated, sharded "
        "(default replicated)",
    )
    scale.add_argument("--json", type=Path, default=None, metavar="PATH")
    scale.set_defaults(handler=run_scale)

    predict = kinds.add_parser("predict", help="POST /predict latency of the default model, in-process HTTP")
    predict.add_argument("--rows", type=positive_int, default=32, help="instances per request (default 32)")
    predict.add_argument("--requests", type=positive_int, default=1000, help="timed requests (default 1000)")
    predict.add_argument("--json", type=Path, default=None, metavar="PATH")
    predict.set_defaults(handler=run_predict)

    prequential = kinds.add_parser(
        "prequential", help="the service's learner over a drift stream: test-then-train accuracy, per concept"
    )
    prequential.add_argument("--scenario", required=True, choices=DRIFT_SCENARIOS)
    prequential.add_argument("--seed", type=int, default=0)
    prequential.add_argument(
        "--examples", type=positive_int, default=20_000, help="examples in the stream (default 20,000)"
    )
    add_set_argument(prequential, "override the service config, e.g. --set model.hidden=[64]", dest="overrides")
    prequential.add_argument(
        "--keep", type=Path, default=None, metavar="DIR", help="leave the recording, config and events.jsonl here"
    )
    prequential.add_argument("--json", type=Path, default=None, metavar="PATH")
    prequential.set_defaults(handler=run_prequential)

    add_ingest_parser(kinds)


def _write_json(path: Path | None, result: dict) -> None:
    if path is None:
        return
    write_json(path, result)
    print(f"wrote {path}")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_cl(args) -> int:
    from continuity.benchmarks.continual import DEFAULT_REPLAY_CAPACITY, format_result, run_continual, strategy_config
    from continuity.errors import UsageError
    from continuity.learner import LearnerConfig, ModelConfig
    from continuity.stream.scenarios import make_scenario

    try:
        scenario = make_scenario(args.scenario, seed=args.seed, segments=args.segments)
        config = strategy_config(
            args.strategy,
            base=LearnerConfig(model=ModelConfig(kind=args.model)),
            replay_capacity=args.replay_capacity or DEFAULT_REPLAY_CAPACITY,
            replay_kind=args.replay_kind,
            ewc_strength=args.ewc_strength,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    result = run_continual(
        scenario, args.strategy, seed=args.seed, passes=args.passes, config=config, progress=_progress
    )
    print(format_result(result))
    _write_json(args.json, result)
    return 0


def run_step(args) -> int:
    from continuity.benchmarks.step import run_step_benchmark

    result = run_step_benchmark(
        batch_size=args.batch_size,
        replay_batch_size=args.replay_batch_size,
        steps_per_dispatch=args.steps_per_dispatch,
        steps=args.steps,
        repeats=args.repeats,
        profile=args.profile,
    )
    k = result["steps_per_dispatch"]
    print(
        f"batch {result['batch_size']}, K = {k} updates per dispatch: plain step "
        f"{result['plain_samples_per_second']:,.0f} samples/s, continual step (replay + EWC) "
        f"{result['samples_per_second']:,.0f} samples/s (ratio {result['ratio']:.2f}); continual at K = 1 "
        f"{result['k1_samples_per_second']:,.0f} samples/s (K = {k}: {result['speedup_over_k1']:.2f} x); "
        f"compilations after warm-up {result['compilations_after_warmup']}"
    )
    cpu = result["cpu"]
    print(
        f"per CPU second of this process: plain {cpu['plain_samples_per_cpu_second']:,.0f}, continual "
        f"{cpu['samples_per_cpu_second']:,.0f} (ratio {cpu['ratio']:.2f}), at K = 1 "
        f"{cpu['k1_samples_per_cpu_second']:,.0f} (K = {k}: {cpu['speedup_over_k1']:.2f} x)"
    )
    if "profile" in result:
        traced = result["profile"]
        print(f"where the continual step's time went ({traced['updates']} updates traced; {traced['trace']}):")
        if "device" in traced:
            device = traced["device"]
            print(
                f"  on the device: {device['kernels_per_update']:.1f} kernels and copies per update, "
                f"{device['busy_us_per_update']:.1f} us of them"
            )
        for op in traced["top"]:
            computes = f"  ({op['op']})" if op["op"] else ""
            print(
                f"  {op['us_per_update']:9.1f} us/update  {op['calls_per_update']:6.2f} calls/update  "
                f"{op['name']}{computes}"
            )
    _write_json(args.json, result)
    return 0


def run_scale(args) -> int:
    from continuity.benchmarks.scale import format_result, run_scale_benchmark

    result = run_scale_benchmark(
        args.devices,
        processes=args.processes,
        per_device_batch=args.per_device_batch,
        steps_per_dispatch=args.steps_per_dispatch,
        steps=args.steps,
        repeats=args.repeats,
        check_dispatches=args.check_dispatches,
        replays=args.replay,
        progress=_progress,
    )
    print(format_result(result))
    _write_json(args.json, result)
    return 0


def run_predict(args) -> int:
    from continuity.benchmarks.predict import run_predict_benchmark

    result = run_predict_benchmark(rows=args.rows, requests=args.requests)
    http, alone = result["http"], result["predictor_only"]
    print(
        f"/predict, {result['rows']} rows of the default model ({result['model']}), {result['requests']} requests: "
        f"median {http['median_ms']:.2f} ms (p90 {http['p90_ms']:.2f}, p99 {http['p99_ms']:.2f}) over HTTP; "
        f"predictor alone median {alone['median_ms']:.2f} ms"
    )
    _write_json(args.json, result)
    return 0


def run_guard(args) -> int:
    from dataclasses import replace

    from continuity.benchmarks.guard import DIGITS_GUARD
    from continuity.benchmarks.guard_suite import format_case, public, run_guard_suite_case
    from continuity.errors import UsageError

    kind = args.poison_kind or ("shuffle" if args.poison is not None else None)
    guard = replace(DIGITS_GUARD, every_examples=args.every_examples)
    try:
        result = run_guard_suite_case(
            args.scenario,
            seed=args.seed,
            segments=args.segments,
            examples=args.examples,
            damage=kind,
            at=args.poison,
            source=args.poison_source,
            placement=args.placement,
            guard=guard,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(format_case(result))
    _write_json(args.json, public(result))
    return 0


def run_pipeline(args) -> int:
    from continuity.benchmarks.pipeline import format_result, run_pipeline_benchmark

    result = run_pipeline_benchmark(
        examples=args.examples, progress=_progress, overrides=tuple(args.overrides or ()), compare_k1=args.compare_k1
    )
    print(format_result(result))
    _write_json(args.json, result)
    return 0


def run_prequential(args) -> int:
    from continuity.benchmarks.prequential import format_result, run_prequential_benchmark
    from continuity.errors import UsageError

    try:
        result = run_prequential_benchmark(
            args.scenario,
            seed=args.seed,
            examples=args.examples,
            overrides=tuple(args.overrides or ()),
            keep=args.keep,
            progress=_progress,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(format_result(result))
    _write_json(args.json, result)
    return 0
