"""`continuity serve | replay | demo`: the always-on service, a recorded stream through it, and the demo."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import NoReturn

from continuity.commands.arguments import positive_int
from continuity.commands.results import write_json
from continuity.config import add_config_arguments, config_from_args
from continuity.errors import UsageError

HALTED_EXIT_STATUS = 3  # a regression with on_regression = "halt": the last good checkpoint is newest
# Saved positions the broker no longer has, with stream.on_lost_positions = "halt": nothing was
# skipped or re-read, no position moved; an operator decides (README, "Lost positions").
LOST_POSITIONS_EXIT_STATUS = 4
UNSAVED_EXIT_STATUS = 5  # saves kept failing (a full disk): the last good model is not checkpointed


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the always-on service: Kafka -> train -> guard -> checkpoint")
    add_config_arguments(serve)
    serve.add_argument(
        "--process-id",
        type=int,
        default=None,
        metavar="N",
        help="this process, of [scale] num_processes training one model (sets scale.process_id)",
    )
    _add_start_fresh(serve)
    serve.set_defaults(handler=run_serve)

    replay = subparsers.add_parser("replay", help="run a recorded stream (Parquet) through the same loop")
    replay.add_argument("recording", type=Path, metavar="FILE", help="a recording made by `continuity record`")
    add_config_arguments(replay)
    replay.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="checkpoint directory (default: [checkpoints] dir of the config)",
    )
    replay.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the run's summary here as JSON"
    )
    _add_start_fresh(replay)
    replay.set_defaults(handler=run_replay)

    demo = subparsers.add_parser("demo", help="the whole idea in a minute: a poisoned drifting stream, guarded")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        metavar="DIR",
        help="where the checkpoints and report go (default demo-out)",
    )
    demo.add_argument(
        "--seconds",
        type=positive_int,
        default=300,
        help="stop the service after this long even if the stream is not finished (default 300)",
    )
    demo.add_argument("--segments", type=positive_int, default=6, help="permuted-digits segments (default 6)")
    demo.set_defaults(handler=run_demo)


def _add_start_fresh(parser) -> None:
    parser.add_argument(
        "--start-fresh",
        action="store_true",
        help="start a new model when the checkpoint directory holds checkpoints but none can be restored "
        "(without it, that is an error: exit 2)",
    )


def exit_status(summary) -> int:
    """0, or what stopped the run, with one line on stderr: a regression under "halt" (3), lost
    positions under "halt" (4), the last good model left unsaved because saves kept failing (5)."""
    if summary.stopped_on_lost_positions:
        print(
            "continuity: stopped: saved stream positions the broker no longer has (see the error above and the "
            "ledger); checkpoints left as they are. Restore the broker's data, or restart with "
            'stream.on_lost_positions = "earliest" or "latest" (README, "Lost positions")',
            file=sys.stderr,
            flush=True,
        )
        return LOST_POSITIONS_EXIT_STATUS
    if summary.unsaved is not None:
        print(f"continuity: {summary.unsaved}", file=sys.stderr, flush=True)
        return UNSAVED_EXIT_STATUS
    return HALTED_EXIT_STATUS if summary.halted else 0


def _logging() -> None:
    from continuity.stream import KafkaLogLimit, KafkaSlowStepNote

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("kafka", "jax"):  # their INFO lines would drown the progress report
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python logs every failed reconnect (~1,300 lines in 10 minutes without a broker); the
    # progress line says "broker unreachable for N s" instead. A few lines a minute still show.
    # KafkaSlowStepNote rewords a misleading warning (see there) before the limit counts it.
    for handler in logging.getLogger().handlers:
        for kind in (KafkaSlowStepNote, KafkaLogLimit):
            if not any(isinstance(f, kind) for f in handler.filters):
                handler.addFilter(kind())
    _quiet_orbax()


def _quiet_orbax() -> None:
    """Orbax logs through absl; a failed save (a full disk) comes with a traceback from each of
    its threads, while the store raises the same error and the loop reports it in one line."""
    logging.getLogger("absl").setLevel(logging.CRITICAL)


DECODER_LOST = 7  # the decoder process died (stream/decoder_process.py)


def decoder_lost(error: Exception) -> int:
    """One line and exit status 7: the decoder process died; nothing past the last checkpoint was committed."""
    print(f"continuity: error: {error}", file=sys.stderr)
    return DECODER_LOST


def source_failed(error: Exception) -> NoReturn:
    """One line and exit status 2: the source stopped the run in words (a damaged recording, a
    topic gone); what was trained past the last checkpoint is not committed."""
    raise UsageError(f"{error}; the run stopped there: a restart resumes from the last checkpoint")


def run_serve(args) -> int:
    from continuity.config import load_config
    from continuity.processes import PeerLost, exit_on_peer_lost, join
    from continuity.service import Service, format_progress, format_summary
    from continuity.stream.decoder_process import DecoderProcessError
    from continuity.stream.sources import SourceError

    overrides = [*(args.set or ()), *([] if args.process_id is None else [f"scale.process_id={args.process_id}"])]
    config = load_config(args.config, overrides)
    _logging()
    join(config.scale)  # several processes: before anything asks JAX for its devices

    def progress(p, lag):
        print(format_progress(p, lag), file=sys.stderr, flush=True)

    service = Service(config, progress=progress, start_fresh=args.start_fresh)

    def announce(url):
        print(
            f"continuity serve: {', '.join(config.stream.topics)} at {config.stream.bootstrap}; "
            f"checkpoints in {config.checkpoints.dir}; HTTP on {url}",
            file=sys.stderr,
            flush=True,
        )

    try:
        summary = service.run(announce)
    except PeerLost as error:  # one of several processes died: this one stops too, saving nothing
        exit_on_peer_lost(error)
    except DecoderProcessError as error:
        return decoder_lost(error)
    except SourceError as error:
        source_failed(error)
    print(format_summary(summary))
    return exit_status(summary)


def run_replay(args) -> int:
    from continuity.service import Service, format_summary
    from continuity.stream.decoder_process import DecoderProcessError
    from continuity.stream.sources import SourceError

    config = config_from_args(args)
    _quiet_orbax()
    if args.out is not None:
        config = dataclasses.replace(config, checkpoints=dataclasses.replace(config.checkpoints, dir=str(args.out)))
    total = _recorded_ends(args.recording)
    bar = _ProgressBar(total)
    service = Service(
        config, recording=args.recording, http=False, progress=bar, progress_every_s=0.5, start_fresh=args.start_fresh
    )
    try:
        summary = service.run()
    except DecoderProcessError as error:
        bar.break_line()
        return decoder_lost(error)
    except SourceError as error:
        bar.break_line()
        source_failed(error)
    except BaseException:
        bar.break_line()  # the error's line starts on a line of its own
        raise
    bar.finish(summary)
    print(format_summary(summary))
    if args.json is not None:  # the summary's fields, prequential_accuracy among them
        write_json(args.json, summary.to_json())
    return exit_status(summary)


def _recorded_ends(path: Path) -> dict:
    """{(topic, partition): (first offset, end offset)} of a recording, for the progress bar."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from continuity.stream.sources import RECORDING_COLUMNS, offsets_go_back, parquet_reason

    if not path.is_file():
        raise UsageError(f"recorded stream {str(path)!r} does not exist")
    try:
        names = set(pq.read_schema(path).names)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise UsageError(f"{str(path)!r} is not a Parquet recording ({type(error).__name__})") from None
    missing = sorted(set(RECORDING_COLUMNS) - names)
    if missing:
        raise UsageError(f"{str(path)!r} is not a continuity recording: missing columns {missing}")
    try:
        table = pq.read_table(path, columns=["topic", "partition", "offset"], page_checksum_verification=True)
    except Exception as error:  # noqa: BLE001 - pyarrow's errors for a damaged page: OSError, ArrowInvalid, ...
        raise UsageError(
            f"recording {str(path)!r} is damaged: its offsets cannot be read ({parquet_reason(error)})"
        ) from None
    # A log's offsets only rise; a file where one goes back (damaged, edited) would make a replay's
    # saved positions send the next one back over records already trained: refused before any is.
    topic = pc.dictionary_encode(table.column("topic")).combine_chunks().indices.to_numpy(zero_copy_only=False)
    key = topic.astype(np.int64) << 32 | table.column("partition").to_numpy().astype(np.int64)
    offsets = table.column("offset").to_numpy()
    order = np.argsort(key, kind="stable")
    back = np.flatnonzero((key[order][1:] == key[order][:-1]) & (np.diff(offsets[order]) <= 0))
    if back.size:
        before, row = order[back[0]], order[back[0] + 1]
        topic_name, partition = table.column("topic")[row].as_py(), table.column("partition")[row].as_py()
        raise UsageError(offsets_go_back(path, topic_name, partition, offsets[before], offsets[row], row=row))
    ends = {}
    grouped = table.group_by(["topic", "partition"]).aggregate([("offset", "min"), ("offset", "max")])
    for entry in grouped.to_pylist():
        ends[(entry["topic"], entry["partition"])] = (entry["offset_min"], entry["offset_max"] + 1)
    return ends


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn in place."""

    def __init__(self, ends: dict):
        self.ends = ends
        self.total = sum(end - first for first, end in ends.values()) or 1
        self.drawn = False  # a line drawn and not yet ended

    def _done(self, positions) -> int:
        done = 0
        for (topic, partition), (first, end) in self.ends.items():
            offset = positions.offset(topic, partition)
            done += 0 if offset is None else min(end, offset) - first
        return done

    def __call__(self, progress, _lag) -> None:
        done = self._done(progress.positions)
        fraction = done / self.total
        filled = int(30 * fraction)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (30 - filled)}] {100 * fraction:5.1f}%  {done:,}/{self.total:,} "
            f"records  {progress.examples_per_second:,.0f} examples/s  rollbacks {progress.rollbacks}  "
        )
        sys.stderr.flush()
        self.drawn = True

    def break_line(self) -> None:
        """End the bar's line, if one was drawn: a run stopped by an error says so on its own line."""
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False

    def finish(self, summary) -> None:
        sys.stderr.write(
            f"\r[{'#' * 30}] done: {summary.examples_trained:,} examples trained"
            f" in {summary.wall_seconds:.1f} s{' ' * 30}\n"
        )
        sys.stderr.flush()


def run_demo(args) -> int:
    from continuity.demo import run_demo as demo

    _quiet_orbax()
    return demo(out=args.out, seconds=args.seconds, segments=args.segments)
