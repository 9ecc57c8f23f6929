"""Ingest throughput: a bare kafka-python poll loop vs KafkaSource + decode + batch, same topic.

One topic per case on one broker (the embedded Tansu unless `bootstrap` is given), each
read to the end by both readers, `repeats` times in one process, every case's repeat r
before any case's repeat r + 1 (so the cases' ratios compare readings close in time); the
median is reported:
- `binary_single`: one 8x8x1 float32 example per binary record (records/s);
- `binary_batched`: `examples_per_record` examples per binary record (examples/s);
- `json`: one example per JSON record (records/s), decoded where the service decodes it
  by default (`stream.decoder = "auto"`: a decoder process given 2+ cores);
- `json_thread`: the same records decoded in the ingest thread (`decoder = "thread"`), for
  comparison (and `fields_20_thread` likewise);
- `fields_20`: named-field JSON events through a 20-field spec (`FIELDS_20`: twelve
  numbers, six of them standardised, six categoricals, a token list, the label), decoded
  as the service does by default.
CPU seconds are the benchmark process's, every thread, plus its decoder process's.
Targets: binary single >= 0.8 x the bare loop; batched examples/s >= 10 x the
single-example rate; JSON single >= 0.8 x binary single (pipeline records/s); the
20-field events >= 50,000 examples/s.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from continuity.stream.decoder_process import Decoder

SHAPE = (8, 8, 1)
NUM_CLASSES = 10
WORDS = tuple(f"word{i}" for i in range(500))
# The 20 fields of the `fields_20` case: its feature spec ([stream.fields]), as a config holds it.
FIELDS_20: dict = {
    "label": "label",
    **{f"n{i}": {"kind": "numeric", "standardize": i < 6} for i in range(12)},
    **{f"c{i}": {"kind": "categorical", "vocabulary": ["a", "b", "c", "d", "e"]} for i in range(3)},
    "c3": {"kind": "categorical", "vocabulary": ["ios", "android", "web"], "encoding": "one_hot"},
    "user": {"kind": "categorical", "buckets": 4096},
    "city": {"kind": "categorical", "buckets": 1024},
    "words": {"kind": "tokens", "length": 8, "buckets": 2048},
}
FIELDS_20_GOAL = 50_000  # examples/s


def fields_20_events(records: int, rng: np.random.Generator) -> list[bytes]:
    """`records` events for FIELDS_20: numbers, strings, a list of 0..8 words and a class."""
    import orjson

    numbers = rng.normal(0, 1, (records, 12)) * [1, 10, 100, 1e3, 1e4, 1e5, 1, 1, 1, 1, 1, 1]
    letters, devices = ("a", "b", "c", "d", "e"), ("ios", "android", "web")
    out = []
    for i in range(records):
        event: dict = {f"n{j}": float(numbers[i, j]) for j in range(12)}
        event.update({f"c{j}": letters[(i * (j + 3)) % 5] for j in range(3)})
        event["c3"] = devices[i % 3]
        event["user"] = f"user-{i % 9973}"
        event["city"] = f"city-{i % 311}"
        event["words"] = [WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(i % 9)]
        event["label"] = int(i % NUM_CLASSES)
        out.append(orjson.dumps(event))
    return out


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from continuity.stream.kafka import create_topic, produce_records

    create_topic(bootstrap, topic, 1)
    produce_records(bootstrap, topic, ((None, v) for v in values))


def _bare_loop(bootstrap: str, topic: str, expected: int, max_poll_records: int) -> tuple[float, float]:
    """(wall, CPU) seconds for a plain KafkaConsumer to poll `expected` records from offset 0.

    CPU is this process's (every thread; the embedded broker is another process): on a loaded
    machine wall time also counts other processes' turns on the cores, CPU time does not.
    """
    from kafka import KafkaConsumer, TopicPartition

    from continuity.stream.kafka import KafkaSettings  # same fetch sizes as the pipeline

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_poll_records,
        fetch_max_wait_ms=200,
        max_partition_fetch_bytes=KafkaSettings.max_partition_fetch_bytes,
    )
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    seen = 0
    started, cpu = time.perf_counter(), time.process_time()
    while seen < expected:
        for messages in consumer.poll(timeout_ms=500).values():
            seen += len(messages)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    consumer.close(autocommit=False)
    return elapsed, cpu


def _cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system) of process `pid` so far (Linux /proc); 0.0 for None."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pipeline(
    bootstrap: str,
    topic: str,
    codec_name: str,
    expected_examples: int,
    batch_size: int,
    max_poll_records: int,
    dtype: str = "float32",
    decoder: Decoder = "auto",
) -> tuple[float, float]:
    """(wall, CPU) seconds for KafkaSource + Ingest + Batcher to deliver `expected_examples`."""
    from continuity.stream.batcher import Batcher
    from continuity.stream.codecs import FeatureSpec
    from continuity.stream.decoder_process import decoding_codec
    from continuity.stream.fields import FieldSpec
    from continuity.stream.ingest import Ingest
    from continuity.stream.kafka import KafkaSettings, KafkaSource
    from continuity.stream.records import Positions

    spec = FeatureSpec(SHAPE, dtype, NUM_CLASSES)
    fields = FieldSpec.from_dict(FIELDS_20) if codec_name == "fields" else None
    settings = KafkaSettings(bootstrap, (topic,), partitions=(0,), max_poll_records=max_poll_records)
    source = KafkaSource(settings, start=Positions({(topic, 0): 0}))
    codec = decoding_codec(codec_name, spec, fields=fields, decoder=decoder)
    ingest = Ingest(source, codec)
    batcher = Batcher(spec, batch_size, ownership=source.ownership)
    source.open()  # connection set-up is outside the timing, as for the bare loop
    codec.start()  # so is a decoder process's start
    child = getattr(codec, "pid", None)
    delivered = 0
    started, cpu = time.perf_counter(), time.process_time() + _cpu_seconds(child)
    with ingest:
        while delivered < expected_examples:
            # The last, partial batch is flushed (padded) as soon as its examples are in.
            batch = batcher.next_batch(flush=delivered + len(batcher) >= expected_examples)
            if batch is not None:
                delivered += batch.size
                continue
            block = ingest.get(timeout_s=1.0)
            if block is not None:
                batcher.add(block)
        elapsed, cpu = time.perf_counter() - started, time.process_time() + _cpu_seconds(child) - cpu
    codec.close()
    if ingest.stats.dead_letters:
        raise RuntimeError(f"benchmark records were dead-lettered: {ingest.stats.dead_letters}")
    return elapsed, cpu


def run_ingest_benchmark(
    *,
    records: int = 50_000,
    batched_records: int = 2000,  # ~0.3-0.6 s a read: at 400 (~0.1 s) a reader's start was half of it
    examples_per_record: int = 256,
    batch_size: int = 64,
    repeats: int = 3,
    max_poll_records: int = 2000,
    bootstrap: str | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure and return the result dict (see the module docstring)."""
    from continuity.stream.broker import EmbeddedBroker
    from continuity.stream.codecs import encode_binary, encode_json

    say = progress or (lambda message: None)
    rng = np.random.default_rng(seed)
    x = rng.random((records, *SHAPE), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, records).astype(np.int32)
    xb = rng.random((examples_per_record, *SHAPE), dtype=np.float32)
    yb = rng.integers(0, NUM_CLASSES, examples_per_record).astype(np.int32)
    run_id = uuid.uuid4().hex[:8]
    # uint8 wire features (digits have 17 grey levels): a quarter of float32's bytes, which
    # matters because the batched case is bound by bytes moved, not by records.
    x8 = (x * 16).astype(np.uint8)
    json_records = [encode_json(x[i], int(y[i])) for i in range(records)]
    events = fields_20_events(records, rng)
    xb8 = (xb * 16).astype(np.uint8)
    cases = {
        "binary_single": ("binary", [encode_binary(x[i], y[i]) for i in range(records)], 1, "float32"),
        "binary_batched": ("binary", [encode_binary(xb, yb)] * batched_records, examples_per_record, "float32"),
        "binary_single_uint8": (
            "binary",
            [encode_binary(x8[i], y[i], dtype="uint8") for i in range(records)],
            1,
            "uint8",
        ),
        "binary_batched_uint8": (
            "binary",
            [encode_binary(xb8, yb, dtype="uint8")] * batched_records,
            examples_per_record,
            "uint8",
        ),
        "json": ("json", json_records, 1, "float32"),
        "json_thread": ("json", json_records, 1, "float32"),
        "fields_20": ("fields", events, 1, "float32"),
        "fields_20_thread": ("fields", events, 1, "float32"),
    }
    # Every other case decodes where the service would ("auto").
    decoders: dict[str, Decoder] = {"json_thread": "thread", "fields_20_thread": "thread"}
    broker = None
    if bootstrap is None:
        broker = EmbeddedBroker().start()
        bootstrap = broker.bootstrap
    result: dict = {
        "benchmark": "ingest",
        "config": {
            "records": records,
            "batched_records": batched_records,
            "examples_per_record": examples_per_record,
            "batch_size": batch_size,
            "repeats": repeats,
            "max_poll_records": max_poll_records,
            "feature_shape": list(SHAPE),
            "broker": "embedded tansu" if broker else bootstrap,
        },
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "cases": {},
    }
    try:
        topics = {}
        for name, (_, values, _, _) in cases.items():
            topics[name] = f"bench-{name}-{run_id}"
            say(f"{name}: producing {len(values)} records to {topics[name]}")
            _produce(bootstrap, topics[name], values)
        times: dict[str, dict[str, list[float]]] = {
            name: {"bare": [], "piped": [], "bare_cpu": [], "piped_cpu": []} for name in cases
        }
        # Repeat r of every case before repeat r + 1 of any: the ratios between cases (JSON / binary)
        # then compare readings taken minutes apart at most, not a whole run apart, on a machine
        # whose load comes and goes.
        for r in range(repeats):
            for name, (codec, values, per_record, dtype) in cases.items():
                n, t = len(values), times[name]
                wall_s, cpu_s = _bare_loop(bootstrap, topics[name], n, max_poll_records)
                t["bare"].append(wall_s)
                t["bare_cpu"].append(cpu_s)
                wall_s, cpu_s = _pipeline(
                    bootstrap,
                    topics[name],
                    codec,
                    n * per_record,
                    batch_size,
                    max_poll_records,
                    dtype,
                    decoders.get(name, "auto"),
                )
                t["piped"].append(wall_s)
                t["piped_cpu"].append(cpu_s)
                say(
                    f"{name}: repeat {r + 1}/{repeats}: bare {n / t['bare'][-1]:,.0f} records/s, "
                    f"pipeline {n / wall_s:,.0f} records/s ({n * per_record / wall_s:,.0f} examples/s; "
                    f"{n * per_record / cpu_s:,.0f} per CPU second)"
                )
        for name, (codec, values, per_record, dtype) in cases.items():
            n, t = len(values), times[name]
            bare, piped = t["bare"], t["piped"]
            bare_s, piped_s = statistics.median(bare), statistics.median(piped)
            bare_cpu_s, piped_cpu_s = statistics.median(t["bare_cpu"]), statistics.median(t["piped_cpu"])
            result["cases"][name] = {
                "codec": codec,
                "decoder": decoders.get(name, "auto"),
                "wire_dtype": dtype,
                "records": n,
                "examples_per_record": per_record,
                "record_bytes": len(values[0]),
                "bare_records_per_s": n / bare_s,
                "pipeline_records_per_s": n / piped_s,
                "pipeline_examples_per_s": n * per_record / piped_s,
                "ratio_to_bare": bare_s / piped_s,
                "bare_records_per_cpu_s": n / bare_cpu_s,
                "pipeline_examples_per_cpu_s": n * per_record / piped_cpu_s,
                "bare_seconds": bare,
                "pipeline_seconds": piped,
                "bare_cpu_seconds": t["bare_cpu"],
                "pipeline_cpu_seconds": t["piped_cpu"],
            }
    finally:
        if broker is not None:
            broker.stop()
    cases_out = result["cases"]
    single = cases_out["binary_single"]
    batched = cases_out["binary_batched"]
    result["targets"] = {
        "binary_single_ratio_to_bare": {
            "value": single["ratio_to_bare"],
            "target": 0.8,
            "met": single["ratio_to_bare"] >= 0.8,
        },
        "batched_examples_vs_single": {
            "value": batched["pipeline_examples_per_s"] / single["pipeline_examples_per_s"],
            "target": 10.0,
            "met": batched["pipeline_examples_per_s"] >= 10 * single["pipeline_examples_per_s"],
        },
        "batched_examples_vs_single_uint8": {
            "value": cases_out["binary_batched_uint8"]["pipeline_examples_per_s"]
            / cases_out["binary_single_uint8"]["pipeline_examples_per_s"],
            "target": 10.0,
            "met": cases_out["binary_batched_uint8"]["pipeline_examples_per_s"]
            >= 10 * cases_out["binary_single_uint8"]["pipeline_examples_per_s"],
        },
        "json_single_vs_binary_single": {
            "value": cases_out["json"]["pipeline_records_per_s"] / single["pipeline_records_per_s"],
            "target": 0.8,
            "met": cases_out["json"]["pipeline_records_per_s"] >= 0.8 * single["pipeline_records_per_s"],
            # the same ratio per CPU second: what it is where the machine is not shared
            "per_cpu_second": cases_out["json"]["pipeline_examples_per_cpu_s"] / single["pipeline_examples_per_cpu_s"],
        },
        "fields_20_examples_per_s": {
            "value": cases_out["fields_20"]["pipeline_examples_per_s"],
            "target": FIELDS_20_GOAL,
            "met": cases_out["fields_20"]["pipeline_examples_per_s"] >= FIELDS_20_GOAL,
        },
    }
    return result


def format_result(result: dict) -> str:
    lines = ["case                   bare rec/s   pipeline rec/s   pipeline ex/s   x bare   ex/CPU-s"]
    for name, case in result["cases"].items():
        lines.append(
            f"{name:<21} {case['bare_records_per_s']:>10,.0f}   {case['pipeline_records_per_s']:>14,.0f}   "
            f"{case['pipeline_examples_per_s']:>13,.0f}   {case['ratio_to_bare']:>6.2f}   "
            f"{case.get('pipeline_examples_per_cpu_s', float('nan')):>8,.0f}"
        )
    for name, target in result.get("targets", {}).items():
        lines.append(
            f"target {name}: {target['value']:,.2f} (>= {target['target']:,}) {'met' if target['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    out = run_ingest_benchmark(progress=lambda m: print(m, file=sys.stderr))
    print(format_result(out))
