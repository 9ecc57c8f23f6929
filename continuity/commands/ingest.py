"""`continuity broker | produce | record` and `continuity bench ingest`: Kafka ingestion commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from continuity.commands.arguments import bootstrap, partitions, port, positive_int, rate, topic
from continuity.commands.results import write_json
from continuity.errors import UsageError
from continuity.stream.drift import DRIFT_SCENARIOS
from continuity.stream.scenarios import REGRESSION_SCENARIOS, SCENARIOS


def register(subparsers) -> None:
    broker = subparsers.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu) in the foreground")
    broker.add_argument("--port", type=port, default=9092, help="loopback port to listen on (default 9092)")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on and advertise (default 127.0.0.1)")
    broker.set_defaults(handler=run_broker)

    produce = subparsers.add_parser(
        "produce", help="write a synthetic scenario's stream (digits scenarios, drift streams) to a Kafka topic"
    )
    produce.add_argument("--bootstrap", type=bootstrap, required=True, metavar="HOST:PORT")
    produce.add_argument("--topic", required=True, type=topic)
    produce.add_argument(
        "--scenario",
        required=True,
        choices=(*SCENARIOS, *REGRESSION_SCENARIOS, *DRIFT_SCENARIOS),
        help="a digits scenario, the regression scenario, or a drift stream",
    )
    produce.add_argument(
        "--codec",
        choices=("events", "json", "binary"),
        default=None,
        help="wire format: events (named-field JSON, drift streams only; their default), "
        "json or binary (digits default; a drift stream's array encoding)",
    )
    produce.add_argument(
        "--rate",
        type=rate,
        default=None,
        metavar="N/s",
        help="records per second (default: as fast as possible); '200/s' or '200'",
    )
    produce.add_argument(
        "--poison",
        type=int,
        default=None,
        metavar="SEGMENT",
        help="digits scenarios: index k >= 1 of a segment to replace by a broken-labeler copy of segment 0",
    )
    produce.add_argument("--seed", type=int, default=0)
    produce.add_argument(
        "--partitions", type=partitions, default=1, help="partitions when creating the topic (default 1)"
    )
    produce.add_argument(
        "--examples-per-record",
        type=positive_int,
        default=1,
        help="examples per record; > 1 needs --codec binary (default 1)",
    )
    drift = produce.add_argument_group("drift streams (sea, hyperplane, rbf-drift, agrawal)")
    drift.add_argument("--examples", type=positive_int, default=None, help="examples in the stream (default 50,000)")
    drift.add_argument("--drift", choices=("abrupt", "gradual"), default=None, help="sea, agrawal (default abrupt)")
    drift.add_argument(
        "--width", type=positive_int, default=None, help="sea, agrawal: examples a gradual drift takes (default 1,000)"
    )
    drift.add_argument(
        "--noise", type=float, default=None, help="sea, hyperplane: share of labels flipped (default 0.1, 0.05)"
    )
    drift.add_argument(
        "--magnitude", type=float, default=None, help="hyperplane: weight change per example (default 0.001)"
    )
    drift.add_argument(
        "--speed", type=float, default=None, help="rbf-drift: centroid travel per example (default 0.0001)"
    )
    drift.add_argument(
        "--perturbation", type=float, default=None, help="agrawal: numeric perturbation fraction (default 0.05)"
    )
    produce.set_defaults(handler=run_produce)

    record = subparsers.add_parser("record", help="record a topic's raw records to a Parquet file")
    record.add_argument("--bootstrap", type=bootstrap, required=True, metavar="HOST:PORT")
    record.add_argument("--topic", required=True, type=topic)
    record.add_argument("--out", required=True, type=Path, metavar="FILE")
    record.add_argument("--from-beginning", action="store_true", help="start at the earliest offset (default: newest)")
    stop = record.add_mutually_exclusive_group()
    stop.add_argument("--until-end", action="store_true", help="stop at the end offsets seen at start")
    stop.add_argument("--max-records", type=positive_int, default=None, metavar="N")
    record.add_argument(
        "--connect-timeout",
        type=positive_int,
        default=60,
        metavar="SECONDS",
        help="give up when the broker or topic is not reached in this long (default 60); the file is left as it was",
    )
    record.set_defaults(handler=run_record)


def add_ingest_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Adds `ingest` to the `continuity bench` group (called by continuity.commands.bench)."""
    parser = bench_subparsers.add_parser(
        "ingest", help="records/s: bare kafka-python poll loop vs KafkaSource + decode + batch"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the result here")
    parser.add_argument("--records", type=positive_int, default=50_000, help="single-example records per topic")
    parser.add_argument(
        "--batched-records",
        type=positive_int,
        default=2000,
        help="batched records per topic (a read long enough that the reader's start does not show)",
    )
    parser.add_argument("--examples-per-record", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--bootstrap",
        type=bootstrap,
        default=None,
        metavar="HOST:PORT",
        help="an existing broker (default: start the embedded one)",
    )
    parser.set_defaults(handler=run_bench_ingest)
    return parser


# ---------------------------------------------------------------------------- argument types


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- handlers


def run_broker(args) -> int:
    from continuity.stream.broker import BrokerError, EmbeddedBroker, answers_metadata

    if answers_metadata(args.host, args.port, timeout_s=0.3):
        raise UsageError(f"something already answers Kafka requests on {args.host}:{args.port}; choose another --port")
    try:
        with EmbeddedBroker(args.port, host=args.host, quiet=False) as broker:
            print(f"broker listening on {broker.bootstrap} (memory storage; Ctrl-C stops it)", flush=True)
            return broker.wait()
    except BrokerError as error:
        raise UsageError(str(error)) from None
    except KeyboardInterrupt:
        return 0


# The `produce` options a drift stream may take, named as its generator's options (stream.drift).
_DRIFT_OPTIONS = ("drift", "width", "noise", "magnitude", "speed", "perturbation")


def run_produce(args) -> int:
    from kafka.errors import KafkaError

    from continuity.stream.kafka import create_topic, produce_records

    try:
        if args.scenario in DRIFT_SCENARIOS:
            records, total, codec, segments = _drift_records(args)
        else:
            records, total, codec, segments = _scenario_records(args)
    except MemoryError:  # a drift stream is generated whole before it is sent
        if args.examples is None:
            raise
        raise UsageError(
            f"--examples {args.examples:,}: the stream does not fit in this machine's memory; produce fewer"
        ) from None
    try:
        created = create_topic(args.bootstrap, args.topic, args.partitions)
    except KafkaError as error:
        raise UsageError(
            f"cannot reach Kafka at {args.bootstrap} ({type(error).__name__}); is the broker running?"
        ) from None
    unchanged = (
        ""
        if created or args.partitions == 1
        else f" (its partitions as they are: --partitions {args.partitions} applies to a new topic)"
    )
    _err(
        f"{'created' if created else 'using existing'} topic {args.topic!r}{unchanged}; "
        f"producing {total} {codec} records of scenario {args.scenario!r} ({len(segments)} segments)"
    )

    def progress(sent: int) -> None:
        _err(f"  {sent}/{total} records")

    try:
        sent = produce_records(
            args.bootstrap,
            args.topic,
            records,
            rate=args.rate,
            progress=progress,
            progress_every=max(1000, total // 10),
        )
    except KafkaError as error:
        raise UsageError(f"producing to {args.bootstrap} failed ({type(error).__name__}: {error})") from None
    print(
        json.dumps(
            {"topic": args.topic, "records": sent, "codec": codec, "scenario": args.scenario, "segments": segments}
        )
    )
    return 0


def _scenario_records(args) -> tuple[Iterator[tuple[bytes, bytes]], int, str, list[str]]:
    """A digits (or regression) scenario's records: (records, how many, codec, segment names)."""
    from continuity.stream.codecs import CodecError, FeatureSpec, make_codec
    from continuity.stream.sources import ScenarioSource, SourceError

    misplaced = [f"--{name}" for name in ("examples", *_DRIFT_OPTIONS) if getattr(args, name) is not None]
    if misplaced:
        raise UsageError(f"{misplaced[0]} applies to the drift streams only (sea, hyperplane, rbf-drift, agrawal)")
    codec = args.codec or "binary"
    if codec == "events":
        raise UsageError("--codec events applies to the drift streams only (sea, hyperplane, rbf-drift, agrawal)")
    try:
        from continuity.stream.scenarios import make_scenario

        scenario = make_scenario(args.scenario, seed=args.seed, poison=args.poison)
        spec = FeatureSpec(tuple(scenario.example_shape), "float32", scenario.num_classes)  # None: regression
        source = ScenarioSource(
            scenario, make_codec(codec, spec), topic=args.topic, examples_per_record=args.examples_per_record
        )
    except (ValueError, KeyError, SourceError, CodecError) as error:
        raise UsageError(str(error).strip("'\"")) from None
    records = (source.encode_record(i) for i in range(len(source)))
    return records, len(source), codec, [s.name for s in scenario.segments]


def _drift_records(args) -> tuple[Iterator[tuple[bytes, bytes]], int, str, list[str]]:
    """A drift stream's records: named-field JSON events, or its array encoding through a codec."""
    from continuity.stream.codecs import CodecError, FeatureSpec, make_codec
    from continuity.stream.drift import DEFAULT_EXAMPLES, drift_scenario, make_generator, options
    from continuity.stream.sources import ScenarioSource, SourceError

    takes = options(args.scenario)
    given = {name: getattr(args, name) for name in _DRIFT_OPTIONS if getattr(args, name) is not None}
    for name in given:
        if name not in takes:
            own = ", ".join(f"--{n}" for n in _DRIFT_OPTIONS if n in takes)
            raise UsageError(f"--{name} does not apply to {args.scenario!r} (it takes {own})")
    if args.poison is not None:
        raise UsageError("--poison applies to the digits scenarios only")
    codec = args.codec or "events"
    if codec == "events" and args.examples_per_record > 1:
        raise UsageError("--examples-per-record > 1 needs --codec binary")
    try:
        generator = make_generator(args.scenario, **given)
        examples = args.examples or DEFAULT_EXAMPLES
        _check_draw_fits(args.scenario, generator, examples)
        stream = generator.stream(examples, seed=args.seed)
        if codec == "events":
            return stream.records(), len(stream), codec, list(stream.concepts)
        # The array encoding, segment by concept block, exactly as the guard's ScenarioSource reads it
        # (the scenario's test splits are not produced: one example each keeps them cheap).
        scenario = drift_scenario(stream, test_examples=1)
        spec = FeatureSpec(scenario.example_shape, "float32", scenario.num_classes)
        source = ScenarioSource(
            scenario, make_codec(codec, spec), topic=args.topic, examples_per_record=args.examples_per_record
        )
    except (ValueError, SourceError, CodecError) as error:
        raise UsageError(str(error)) from None
    return (source.encode_record(i) for i in range(len(source))), len(source), codec, list(stream.concepts)


def _check_draw_fits(scenario: str, generator, examples: int) -> None:
    """A UsageError when drawing `examples` of the stream would need more than this machine's
    memory: the stream is drawn whole before it is sent, and a draw past memory is otherwise
    killed by the kernel partway (numpy's own MemoryError comes only for one array too large)."""
    from continuity.memory import byte_size, host_memory

    have = host_memory()
    if have is None:
        return
    need = generator.peak_bytes(examples)
    if need > have:
        raise UsageError(
            f"--examples {examples:,}: the {scenario!r} stream is drawn whole before it is sent and would "
            f"need about {byte_size(need)}, more than this machine's {byte_size(have)}; produce fewer "
            f"(the draw alone fills it at ~{have * examples // need:,})"
        )


def run_record(args) -> int:
    from kafka.errors import KafkaError

    from continuity.stream.kafka import KafkaSettings, KafkaSourceError
    from continuity.stream.recording import record_topic

    if not args.until_end and args.max_records is None:
        _err("recording until Ctrl-C (use --until-end or --max-records N to stop by itself)")
    try:
        settings = KafkaSettings(args.bootstrap, (args.topic,))
        written = record_topic(
            settings,
            args.out,
            from_beginning=args.from_beginning,
            until_end=args.until_end,
            max_records=args.max_records,
            progress=None,
            connect_timeout_s=args.connect_timeout,
        )
    except KafkaSourceError as error:
        raise UsageError(str(error)) from None
    except KafkaError as error:
        raise UsageError(
            f"cannot read {args.topic!r} from {args.bootstrap} ({type(error).__name__}: {error})"
        ) from None
    except OSError as error:  # the file: a directory, a read-only place, a full disk (nothing replaced)
        raise UsageError(f"cannot write the recording {str(args.out)!r}: {error.strerror or error}") from None
    print(json.dumps({"out": str(args.out), "records": written}))
    return 0


def run_bench_ingest(args) -> int:
    from continuity.benchmarks.ingest import format_result, run_ingest_benchmark

    result = run_ingest_benchmark(
        records=args.records,
        batched_records=args.batched_records,
        examples_per_record=args.examples_per_record,
        batch_size=args.batch_size,
        repeats=args.repeats,
        bootstrap=args.bootstrap,
        progress=_err,
    )
    print(format_result(result))
    if args.json is not None:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
