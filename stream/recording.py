"""Recording a topic's raw records, with positions and timestamps, to a Parquet file.

The file (schema `RECORDING_SCHEMA`, see stream.sources) opens in any Parquet tool and
replays through `FileSource` in exactly the recorded order. Records are written in row
groups of `row_group_records`, so memory stays bounded however long the recording.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from continuity.stream.kafka import KafkaSettings, KafkaSource, KafkaSourceError
from continuity.stream.records import PartitionRecords

log = logging.getLogger(__name__)


def recording_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("topic", pa.string()),
            ("partition", pa.int32()),
            ("offset", pa.int64()),
            ("timestamp_ms", pa.int64()),
            ("key", pa.binary()),
            ("value", pa.binary()),
        ]
    )


class RecordingWriter:
    """Appends PartitionRecords to a Parquet file; `close()` finishes it.

    The file is written beside `path` under a temporary name and renamed onto `path` only when
    finished: a recording that fails (or is killed) half-way never replaces a file already there,
    nor leaves a torn one under its name. As a context manager, an exception discards it (`abort`).
    """

    def __init__(self, path: str | Path, *, row_group_records: int = 10_000):
        import pyarrow.parquet as pq

        # Through a symbolic link to where it points: the finishing rename would replace the link.
        self.path = Path(path).resolve() if Path(path).is_symlink() else Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"{str(self.path)!r} is a directory, not a recording file")
        if self.path.exists() and not self.path.is_file():
            # Finishing renames onto `path`: a device (/dev/null), a pipe or a socket there would be replaced.
            raise FileExistsError(f"{str(self.path)!r} is not a regular file (a device, pipe or socket)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.row_group_records = row_group_records
        self._partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        # Each page carries its CRC: a byte changed on disk later is found when read, not trained on.
        self._writer = pq.ParquetWriter(self._partial, recording_schema(), write_page_checksum=True)
        self._pending: list[PartitionRecords] = []
        self._pending_rows = 0
        self.records = 0

    def write(self, run: PartitionRecords) -> None:
        self._pending.append(run)
        self._pending_rows += len(run)
        self.records += len(run)
        if self._pending_rows >= self.row_group_records:
            self._flush()

    def _flush(self) -> None:
        import numpy as np
        import pyarrow as pa

        if not self._pending:
            return
        runs, self._pending, self._pending_rows = self._pending, [], 0
        table = pa.table(
            {
                "topic": [r.topic for r in runs for _ in range(len(r))],
                "partition": pa.array(np.concatenate([np.full(len(r), r.partition, np.int32) for r in runs])),
                "offset": pa.array(np.concatenate([r.offsets for r in runs]).astype(np.int64)),
                "timestamp_ms": pa.array(np.concatenate([r.timestamps_ms for r in runs]).astype(np.int64)),
                "key": pa.array([k for r in runs for k in r.keys], pa.binary()),
                "value": pa.array([v for r in runs for v in r.values], pa.binary()),
            },
            schema=recording_schema(),
        )
        self._writer.write_table(table)

    def close(self) -> None:
        """Finish the file and put it under its name (replacing what was there). A finish that
        fails (a full disk refusing the last row group) discards it, as `abort` does."""
        try:
            self._flush()
            self._writer.close()
        except BaseException:
            self.abort()
            raise
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Discard what was written: the file under `path`, if any, stays as it was, and the
        temporary file is gone (on a full disk too, where it would hold the space it took)."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - a full disk refuses the close too; the file goes all the same
            pass
        finally:
            self._partial.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def record_topic(
    settings: KafkaSettings,
    out: str | Path,
    *,
    from_beginning: bool = False,
    until_end: bool = False,
    max_records: int | None = None,
    idle_timeout_s: float | None = None,
    progress: Callable[[int], None] | None = None,
    connect_timeout_s: float = 60.0,
) -> int:
    """Copy raw records of `settings.topics` to a Parquet file; returns how many were written.

    Stops at the end offsets seen at start (`until_end`), after `max_records`, after
    `idle_timeout_s` without records, or on KeyboardInterrupt (the file is still finished).
    A broker not reached (or a topic not found) in `connect_timeout_s` is a KafkaSourceError,
    raised before the file is touched: a file already at `out` is replaced only by a finished one.
    """
    settings = KafkaSettings(
        **{**settings.__dict__, "auto_offset_reset": "earliest" if from_beginning else "latest", "group_id": None}
    )
    give_up_at = time.monotonic() + connect_timeout_s
    source = KafkaSource(
        settings, until_end=until_end, stop_requested=lambda: not source.opened and time.monotonic() > give_up_at
    )
    try:
        source.open()
    except BaseException:
        source.close()
        raise
    if not source.opened:
        source.close()
        raise KafkaSourceError(
            f"could not start reading {', '.join(map(repr, settings.topics))} from {settings.bootstrap} within "
            f"{connect_timeout_s:.0f} s: is the broker running, and does the topic exist?"
        )
    written = 0
    last = time.monotonic()
    try:
        with RecordingWriter(out) as writer:
            try:
                while True:
                    if max_records is not None and written >= max_records:
                        break
                    runs = source.poll(0.2)
                    for run in runs:
                        if max_records is not None and written + len(run) > max_records:
                            keep = max_records - written
                            run = PartitionRecords(
                                run.topic,
                                run.partition,
                                run.values[:keep],
                                run.keys[:keep],
                                run.offsets[:keep],
                                run.timestamps_ms[:keep],
                            )
                        writer.write(run)
                        written += len(run)
                    if runs:
                        last = time.monotonic()
                        if progress is not None:
                            progress(written)
                    elif source.finished:
                        break
                    elif idle_timeout_s is not None and time.monotonic() - last > idle_timeout_s:
                        break
            except KeyboardInterrupt:
                log.info("recording interrupted after %d records", written)
    finally:
        source.close()
    return written
