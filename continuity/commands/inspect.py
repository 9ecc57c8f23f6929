"""`continuity inspect`: sample a topic's (or a recording's) named-field events and print a draft config.

The draft is a `[stream]` section with `codec = "fields"` and a `[stream.fields]` spec
(stream/fields.py), each line commented with what was seen, so a user starts from their
own events instead of a blank page:
- numbers -> numeric, standardised (the observed range in the comment); integers with
  few distinct values -> categorical with that vocabulary (order may not matter);
- strings with few distinct values -> categorical vocabulary; many -> hashed buckets;
- lists of strings -> tokens, `length` the observed 95th percentile of list lengths;
- a field named like a label (label, y, target, clicked, ...) -> the label; `segment`
  or `concept` -> the segment; a field missing from some records gets a default.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from continuity.commands.arguments import positive_int
from continuity.errors import UsageError

LABEL_NAMES = ("label", "y", "target", "clicked", "class", "outcome", "is_fraud", "converted")
SEGMENT_NAMES = ("segment", "concept")
KEY_NAMES = ("key",)
VOCABULARY_MAX = 50  # distinct strings a vocabulary lists; more are hashed
INTEGER_CATEGORIES_MAX = 12  # integers with at most this many distinct values are drafted as categories
TOKEN_VOCABULARY_MAX = 200


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="sample named-field JSON events and print a draft [stream.fields] config for them"
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bootstrap", metavar="HOST:PORT", help="read the topic from this broker (with --topic)")
    where.add_argument("--file", type=Path, metavar="FILE", help="a recording (`continuity record`) instead")
    parser.add_argument("--topic", help="the topic to sample (required with --bootstrap)")
    parser.add_argument("--records", type=positive_int, default=1000, help="records to sample (default 1,000)")
    parser.set_defaults(handler=run_inspect)


def run_inspect(args) -> int:
    if args.bootstrap is not None and not args.topic:
        raise UsageError("--bootstrap needs --topic: the topic to sample")
    values = _sample_file(args.file, args.records) if args.file is not None else _sample_kafka(args)
    events = []
    for value in values:
        try:
            event = json.loads(value) if value else None
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    where = f"recording {args.file}" if args.file is not None else f"topic {args.topic!r}"
    if not events:
        raise UsageError(f"no JSON object among the {len(values)} records sampled from {where}")
    topic = args.topic
    print(draft_config(events, source=f"{len(events)} events of {where}", topic=topic, bootstrap=args.bootstrap))
    return 0


def _sample_file(path: Path, limit: int) -> list:
    from continuity.stream.sources import FileSource, SourceError

    try:
        source = FileSource(path)
        source.open()
    except (SourceError, OSError) as error:
        raise UsageError(str(error)) from None
    values: list = []
    try:
        while len(values) < limit and not source.finished:
            for run in source.poll(0.1):
                values.extend(run.values[: limit - len(values)])
    finally:
        source.close()
    return values


def _sample_kafka(args) -> list:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False)
    except KafkaError as error:
        raise UsageError(f"cannot reach Kafka at {args.bootstrap} ({type(error).__name__})") from None
    try:
        partitions = consumer.partitions_for_topic(args.topic)
        if not partitions:
            raise UsageError(f"topic {args.topic!r} does not exist on {args.bootstrap}")
        assigned = [TopicPartition(args.topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends = consumer.end_offsets(assigned)
        values: list = []
        idle = 0
        while len(values) < args.records and idle < 5:
            polled = consumer.poll(timeout_ms=500, max_records=args.records - len(values))
            got = [m.value for messages in polled.values() for m in messages]
            values.extend(got)
            idle = 0 if got else idle + 1
            if all(consumer.position(tp) >= ends[tp] for tp in assigned):
                break
        return values
    finally:
        consumer.close(autocommit=False)


def _toml(value) -> str:
    return json.dumps(value)  # a JSON string, number, bool or list of them is valid TOML


def _number_kind(values: list) -> bool:
    return all(type(v) in (int, float, bool) for v in values)


def _text(value) -> str:
    return value if isinstance(value, str) else str(value)


def draft_config(events: list[dict], *, source: str, topic: str | None = None, bootstrap: str | None = None) -> str:
    """A commented `[stream]` + `[stream.fields]` draft for `events` (dicts parsed from JSON records)."""
    names: list[str] = []
    for event in events:
        names.extend(name for name in event if name not in names)
    seen = {name: [e[name] for e in events if e.get(name) is not None] for name in names}
    total = len(events)
    label = next((name for name in LABEL_NAMES if name in seen), None)
    segment = next((name for name in SEGMENT_NAMES if name in seen and name != label), None)
    key = next((name for name in KEY_NAMES if name in seen and name not in (label, segment)), None)
    header = [
        f"# Draft from {source} (`continuity inspect`). Check every line: it says what was seen.",
        "[stream]",
        'codec = "fields"',
    ]
    if topic is not None:
        header.append(f"topics = [{_toml(topic)}]")
    if bootstrap is not None:
        header.append(f"bootstrap = {_toml(bootstrap)}")
    settings: list[str] = []
    learner: list[str] = []
    if label is None:
        settings.append('label = "FIELD"  # no field is named like a label (label, y, target, clicked, ...): name it')
    else:
        values = seen[label]
        if values and all(type(v) in (int, bool) for v in values):
            classes = sorted({int(v) for v in values})
            settings.append(f"label = {_toml(label)}  # class ids: saw {_span(classes)}")
            header.append(f"num_classes = {max(2, classes[-1] + 1)}  # label ids seen: {_span(classes)}")
        elif values and all(isinstance(v, str) for v in values):
            counts = Counter(values)
            classes = sorted(counts)
            settings.append(f"label = {_toml(label)}  # strings: {len(classes)} distinct labels")
            settings.append(f"label_classes = {_toml(classes)}  # ids 0..{len(classes) - 1} in this order")
            header.append(f"num_classes = {len(classes)}")
        else:
            settings.append(f"label = {_toml(label)}  # numbers: a regression target")
            header.append("# num_classes is left out: learner.task is regression")
            learner = ["", "[learner]", 'task = "regression"  # the label is a number']
    if key is not None:
        settings.append(f"key = {_toml(key)}  # the record key (the probe's hold-out hash)")
    if segment is not None:
        distinct = sorted({_text(v) for v in seen[segment]})
        settings.append(f"segment = {_toml(segment)}  # {len(distinct)} segments seen: {', '.join(distinct[:5])}")
    tables: list[str] = []
    for name in names:
        if name in (label, segment, key):
            continue
        tables += _field_draft(name, seen[name], total)
    lines = header + learner + ["", "[stream.fields]", *settings, *tables]
    return "\n".join(lines) + "\n"


def _span(values: list) -> str:
    if len(values) <= 6:
        return ", ".join(map(str, values))
    return f"{values[0]}..{values[-1]} ({len(values)} distinct)"


def _field_draft(name: str, values: list, total: int) -> list[str]:
    missing = total - len(values)
    note = f"; missing in {missing} of {total}" if missing else ""
    table = ["", f"[stream.fields.{name if name.replace('_', '').replace('-', '').isalnum() else _toml(name)}]"]
    if not values:
        return [f"# field {name!r}: always null or missing in the sample; left out"]
    if _number_kind(values):
        distinct = sorted(set(values))
        integers = all(type(v) in (int, bool) for v in values)
        if integers and len(distinct) <= INTEGER_CATEGORIES_MAX:
            table += [
                f'kind = "categorical"  # integers with {len(distinct)} distinct values{note}; '
                'kind = "numeric" if their order matters',
                f"vocabulary = {_toml([int(v) for v in distinct])}",
            ]
            if missing:
                table.append(f"default = {int(Counter(values).most_common(1)[0][0])}  # the most common value")
            return table
        array = np.asarray(values, np.float64)
        table += [
            f'kind = "numeric"  # saw {array.min():.6g}..{array.max():.6g}, mean {array.mean():.6g}{note}',
            "standardize = true  # by running mean and std (kept in checkpoints)",
        ]
        if missing:
            table.append(f"default = {float(np.median(array))!r}  # the median seen")
        return table
    if all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
        counts = Counter(_text(v) for v in values)
        if len(counts) <= VOCABULARY_MAX and len(counts) < max(2, len(values) // 2):
            table += [
                f'kind = "categorical"  # {len(counts)} distinct values{note}',
                f"vocabulary = {_toml([v for v, _ in counts.most_common()])}  # anything else: one more id",
            ]
        else:
            buckets = 1 << max(10, int(np.ceil(np.log2(4 * len(counts)))))
            table += [
                f'kind = "categorical"  # {len(counts)} distinct values in {len(values)}{note}: hashed',
                f"buckets = {buckets}",
            ]
        if missing:
            table.append(f"default = {_toml(counts.most_common(1)[0][0])}  # the most common value")
        return table
    if all(
        isinstance(v, list) and all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in v) for v in values
    ):
        lengths = np.asarray([len(v) for v in values])
        length = max(1, int(np.ceil(np.percentile(lengths, 95))))
        tokens = Counter(_text(t) for v in values for t in v)
        table += [
            f'kind = "tokens"  # lists of {lengths.min()}..{lengths.max()} tokens, 95th percentile {length}{note}',
            f"length = {length}",
        ]
        if len(tokens) <= TOKEN_VOCABULARY_MAX:
            table.append(f"vocabulary = {_toml(sorted(tokens))}  # {len(tokens)} distinct tokens")
        else:
            table.append(f"buckets = {1 << max(12, int(np.ceil(np.log2(4 * len(tokens)))))}  # {len(tokens)} distinct")
        if missing:
            table.append("optional = true  # a missing list is empty")
        return table
    kinds = sorted({type(v).__name__ for v in values})
    return [f"# field {name!r}: left out (saw {', '.join(kinds)}; the spec takes numbers, strings, lists of strings)"]
