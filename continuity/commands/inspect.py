"""`continuity inspect`: sample a topic's (or a recording's) named-field events and print a draft config.

The draft is a `[stream]` section with `codec = "fields"` and a `[stream.fields]` spec
(stream/fields.py), each line commented with what was seen, so a user starts from their
own events instead of a blank page:
- numbers (booleans too) -> numeric, standardised (the observed range in the comment); integers
  with few distinct values -> categorical with that vocabulary (order may not matter);
- strings with few distinct values -> categorical vocabulary; many -> hashed buckets;
- lists of strings -> tokens, `length` the observed 95th percentile of list lengths;
- a field named like a label (label, y, target, clicked, ...) -> the label; `segment`
  or `concept` -> the segment; a field missing from some records gets a default.
Records are parsed as the codec parses them (orjson), and values it would refuse (NaN, a
number beyond float32, a label of another type) are counted, not drafted from: a draft
does not describe records its codec dead-letters.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson

from continuity.commands.arguments import bootstrap, positive_int
from continuity.errors import UsageError

LABEL_NAMES = ("label", "y", "target", "clicked", "class", "outcome", "is_fraud", "converted")
SEGMENT_NAMES = ("segment", "concept")
KEY_NAMES = ("key",)
VOCABULARY_MAX = 50  # distinct strings a vocabulary lists; more are hashed
INTEGER_CATEGORIES_MAX = 12  # integers with at most this many distinct values are drafted as categories
TOKEN_VOCABULARY_MAX = 200
CLASS_IDS_MAX = 1000  # integer labels up to this are drafted as class ids; larger ones as a regression target
FLOAT32_MAX = float(np.finfo(np.float32).max)
# What the fields codec parses (orjson); Python's json would also take NaN, Infinity, 1e400 and lone surrogates.
READABLE = (
    "a JSON object the fields codec reads (bad JSON, NaN or Infinity, a number beyond a double, "
    "a lone surrogate, a byte order mark and bytes that are not UTF-8 are not)"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="sample named-field JSON events and print a draft [stream.fields] config for them"
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--bootstrap", type=bootstrap, metavar="HOST:PORT", help="read the topic from this broker (with --topic)"
    )
    where.add_argument("--file", type=Path, metavar="FILE", help="a recording (`continuity record`) instead")
    parser.add_argument("--topic", help="the topic to sample (required with --bootstrap)")
    parser.add_argument("--records", type=positive_int, default=1000, help="records to sample (default 1,000)")
    parser.set_defaults(handler=run_inspect)


def run_inspect(args) -> int:
    if args.bootstrap is not None and not args.topic:
        raise UsageError("--bootstrap needs --topic: the topic to sample")
    values = _sample_file(args.file, args.records) if args.file is not None else _sample_kafka(args)
    where = f"recording {args.file}" if args.file is not None else f"topic {args.topic!r}"
    if not values:
        raise UsageError(f"{where} holds no records to sample")
    events = parse_events(values)
    refused = len(values) - len(events)
    if not events:
        raise UsageError(f"none of the {len(values)} records sampled from {where} is {READABLE}")
    notes = [f"{refused} of the {len(values)} records sampled are not {READABLE}: they would be dead-lettered"]
    print(
        draft_config(
            events,
            source=f"{len(events)} events of {where}",
            topic=args.topic,
            bootstrap=args.bootstrap,
            notes=notes if refused else (),
        )
    )
    return 0


def parse_events(values: list) -> list[dict]:
    """The records that parse as JSON objects exactly as the fields codec parses them (orjson)."""
    events = []
    for value in values:
        try:
            event = orjson.loads(value) if value else None
        except orjson.JSONDecodeError:
            continue
        if type(event) is dict:
            events.append(event)
    return events


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


def _toml_key(name: str) -> str:
    """`name` as a TOML key: bare where TOML allows (ASCII letters, digits, _ and -), else quoted."""
    bare = name.replace("_", "").replace("-", "")
    return name if bare.isalnum() and name.isascii() else _toml(name)


def _quoted(text: str) -> str:
    """`text` for a comment: as a TOML string (a newline in it cannot end the comment), cut to 40 characters."""
    return _toml(text if len(text) <= 40 else text[:40] + "...")


def _number_kind(values: list) -> bool:
    return all(type(v) in (int, float, bool) for v in values)


def _text(value) -> str:
    return value if isinstance(value, str) else str(value)


def draft_config(
    events: list[dict],
    *,
    source: str,
    topic: str | None = None,
    bootstrap: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A commented `[stream]` + `[stream.fields]` draft for `events` (dicts parsed from JSON records);
    `notes` are comment lines under the first."""
    names: list[str] = []
    for event in events:
        names.extend(name for name in event if name not in names)
    seen = {name: [e[name] for e in events if e.get(name) is not None] for name in names}
    total = len(events)
    label = next((name for name in LABEL_NAMES if name in seen), None)
    # The codec takes a segment or key of strings (integers as text); another is no segment or key.
    texts = {name for name in seen if all(type(v) in (str, int) for v in seen[name])}
    segment = next((name for name in SEGMENT_NAMES if name in texts and name != label), None)
    key = next((name for name in KEY_NAMES if name in texts and name not in (label, segment)), None)
    header = [
        f"# Draft from {source} (`continuity inspect`). Check every line: it says what was seen.",
        *(f"# {note}" for note in notes),
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
        strings = [v for v in values if type(v) is str]
        numbers = [v for v in values if type(v) in (int, float, bool)]
        # The codec takes one kind of label: strings (label_classes) or numbers; the other is dead-lettered.
        kept = strings if len(strings) > len(numbers) else numbers
        refused = len(values) - len(kept)
        note = f"; {refused} of {len(values)} labels are of another type and would be dead-lettered" if refused else ""
        ids = sorted({int(v) for v in kept if type(v) in (int, bool)})
        if kept is numbers and numbers and len(ids) == len(set(numbers)) and ids[-1] < CLASS_IDS_MAX:
            negative = sum(1 for v in numbers if v < 0)
            if negative:
                note += f"; {negative} labels below 0 would be dead-lettered"
            settings.append(f"label = {_toml(label)}  # class ids: saw {_span(ids)}{note}")
            header.append(f"num_classes = {max(2, ids[-1] + 1)}  # label ids seen: {_span(ids)}")
        elif kept is strings and strings:
            classes = sorted(set(strings))
            settings.append(f"label = {_toml(label)}  # strings: {len(classes)} distinct labels{note}")
            settings.append(f"label_classes = {_toml(classes)}  # ids 0..{len(classes) - 1} in this order")
            header.append(f"num_classes = {len(classes)}")
        else:
            big = f" (integers up to {ids[-1]}: too many for class ids)" if ids and ids[-1] >= CLASS_IDS_MAX else ""
            settings.append(f"label = {_toml(label)}  # numbers: a regression target{big}{note}")
            header.append("# num_classes is left out: learner.task is regression")
            learner = ["", "[learner]", 'task = "regression"  # the label is a number']
    if key is not None:
        settings.append(f"key = {_toml(key)}  # the record key (the probe's hold-out hash)")
    if segment is not None:
        distinct = sorted({_text(v) for v in seen[segment]})
        shown = ", ".join(map(_quoted, distinct[:5]))
        settings.append(f"segment = {_toml(segment)}  # {len(distinct)} segments seen: {shown}")
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
    table = ["", f"[stream.fields.{_toml_key(name)}]"]
    if not values:
        return [f"# field {name!r}: always null or missing in the sample; left out"]
    if _number_kind(values):
        distinct = sorted(set(values))
        # Booleans are numbers to the codec (0 and 1), never categories: a categorical field refuses them.
        integers = all(type(v) is int for v in values)
        if integers and len(distinct) <= INTEGER_CATEGORIES_MAX:
            table += [
                f'kind = "categorical"  # integers with {len(distinct)} distinct values{note}; '
                'kind = "numeric" if their order matters',
                f"vocabulary = {_toml([int(v) for v in distinct])}",
            ]
            if missing:
                table.append(f"default = {int(Counter(values).most_common(1)[0][0])}  # the most common value")
            return table
        array = np.asarray([float(v) for v in values], np.float64)
        fits = np.abs(array) <= FLOAT32_MAX  # the codec dead-letters a number beyond float32
        if not fits.any():
            return [f"# field {name!r}: left out (every number seen is beyond float32, which the codec refuses)"]
        if not fits.all():
            note += f"; {int((~fits).sum())} beyond float32 (those records would be dead-lettered)"
        array = array[fits]
        booleans = "booleans as 0 and 1, " if any(type(v) is bool for v in values) else ""
        table += [
            f'kind = "numeric"  # {booleans}saw {array.min():.6g}..{array.max():.6g}, mean {array.mean():.6g}{note}',
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
        if not tokens:
            table.append(f"buckets = {1 << 12}  # every list seen was empty: hashed")
        elif len(tokens) <= TOKEN_VOCABULARY_MAX:
            table.append(f"vocabulary = {_toml(sorted(tokens))}  # {len(tokens)} distinct tokens")
        else:
            table.append(f"buckets = {1 << max(12, int(np.ceil(np.log2(4 * len(tokens)))))}  # {len(tokens)} distinct")
        if missing:
            table.append("optional = true  # a missing list is empty")
        return table
    kinds = sorted({type(v).__name__ for v in values})
    return [f"# field {name!r}: left out (saw {', '.join(kinds)}; the spec takes numbers, strings, lists of strings)"]
