"""`bench prequential`: the service's learner over a drift stream, judged test-then-train.

The drift stream (SEA, Hyperplane, RBF-drift, Agrawal: continuity.stream.drift) is
generated as named-field JSON events, recorded to Parquet as `continuity record` writes a
topic, and replayed through `Service`, the loop `continuity replay` runs (fields codec,
feature spec, guard, checkpoints), with the feature spec `continuity inspect` drafts from
the events (numbers standardised by running statistics, Agrawal's integer codes as
categories, "concept" as the segment). Every trained record is predicted before the
update that trains on it (continuity/prequential.py), so `prequential_accuracy` is the
figure River and MOA report for online learners (Gama et al. 2013), over the whole
stream; per concept too. Held-out probe records (probe.holdout_fraction) are not trained,
so not counted.

`examples_per_second`: records trained over the run's wall time, compilation and judging
included (short streams: the first dispatch's compilation is a visible part of it).

`keep`: a directory to leave the recording (stream.parquet), the config (config.toml)
and the events as JSON lines (events.jsonl) in, so `continuity replay` and other learners
(benchmarks/river_baseline.py) run on the very same records.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEFAULT_EXAMPLES = 20_000  # ~10-30 s per run on this machine's CPU: 3 seeds x 4 streams in minutes
RECORDS_PER_RUN = 10_000  # records per PartitionRecords written to the recording
TOPIC = "events"


def write_stream(stream, directory: Path) -> tuple[Path, Path, Path]:
    """The stream's events as a Parquet recording, JSON lines, and a drafted config: their paths."""
    from continuity.commands.inspect import draft_config
    from continuity.stream import PartitionRecords, RecordingWriter

    directory.mkdir(parents=True, exist_ok=True)
    recording, lines, config = directory / "stream.parquet", directory / "events.jsonl", directory / "config.toml"
    writer = RecordingWriter(recording)
    with lines.open("w") as out:
        for start in range(0, len(stream), RECORDS_PER_RUN):
            records = list(stream.records(start, start + RECORDS_PER_RUN))
            n = len(records)
            writer.write(
                PartitionRecords(
                    TOPIC,
                    0,
                    [value for _, value in records],
                    [key for key, _ in records],
                    np.arange(start, start + n, dtype=np.int64),
                    np.zeros(n, np.int64),
                )
            )
            out.writelines(value.decode() + "\n" for _, value in records)
    writer.close()
    sample = list(stream.events(0, min(len(stream), 2_000)))
    config.write_text(draft_config(sample, source=f"the {stream.name} stream (seed {stream.seed})", topic=TOPIC))
    return recording, lines, config


def run_prequential_benchmark(
    scenario: str,
    *,
    seed: int = 0,
    examples: int = DEFAULT_EXAMPLES,
    overrides: tuple[str, ...] = (),
    keep: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """One drift stream through the service's loop; its prequential figures and rate (see the module docstring)."""
    from continuity.config import load_config
    from continuity.service import Service, format_progress
    from continuity.stream.drift import make_generator

    stream = make_generator(scenario).stream(examples, seed=seed)
    with tempfile.TemporaryDirectory(prefix="continuity-bench-prequential-") as scratch:
        directory = keep or Path(scratch)
        recording, _, config_path = write_stream(stream, directory)
        run = directory / "run"
        config = load_config(config_path, [f'checkpoints.dir="{run}"', f"service.seed={seed}", *overrides])

        def report(snapshot, lag) -> None:
            if progress is not None:
                progress(format_progress(snapshot, lag))

        service = Service(config, recording=recording, http=False, progress=report, progress_every_s=5.0)
        started = time.perf_counter()
        summary = service.run()
        seconds = time.perf_counter() - started
    concepts = {name: summary.prequential_segments.get(name) for name in stream.concepts}
    return {
        "scenario": scenario,
        "seed": seed,
        "examples": examples,
        "model": {"kind": config.learner.model.kind, "hidden": list(config.learner.model.hidden)},
        "overrides": list(overrides),
        "config_digest": config.digest(),
        "prequential_accuracy": summary.prequential_accuracy,
        "prequential_examples": summary.prequential_examples,
        "concepts": concepts,
        "examples_trained": summary.examples_trained,
        "examples_per_second": summary.examples_trained / seconds if seconds > 0 else None,
        "wall_seconds": seconds,
        "windows": summary.windows,
        "rollbacks": summary.rollbacks,
        "quarantined_records": summary.quarantined_records,
        "probe_accuracy": summary.probe_accuracy,
    }


def format_result(result: dict) -> str:
    """The result as a table: the whole stream, then each concept."""

    def figure(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    rows = [("whole stream", figure(result["prequential_accuracy"]))]
    rows += [(name, figure(value)) for name, value in result["concepts"].items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(
        [
            f"{result['scenario']} seed {result['seed']}: {result['examples']:,} examples, "
            f"{result['prequential_examples']:,} trained and counted (the rest held out for the probe)",
            f"{'':<{width}}  prequential accuracy",
            *(f"{name:<{width}}  {value}" for name, value in rows),
            f"{result['examples_per_second']:,.0f} examples/s over {result['wall_seconds']:.1f} s "
            f"({result['windows']} windows judged, {result['rollbacks']} rollbacks)",
        ]
    )
