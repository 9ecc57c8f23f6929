"""The ledger: an append-only JSON-lines audit trail of what happened to a store and why.

One event per line (save, delete, skip, pin, unpin, rollback, and whatever the guard
records: probe decisions, quarantines), each with its figures, so an operator can read
back why checkpoint 12 is the one a restart restores. Lines are flushed and fsynced
one by one: a crash loses at most the line being written, and `read` ignores a torn
final line instead of failing on it.

A full disk must not stop the service (it keeps training and judging while its saves
fail), so a line the file system refuses is held in memory, in order, and written
before the next line once the disk takes writes again; one error is logged per spell
of refusals, not one per line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def to_json_value(value: Any, *, where: str = "value") -> Any:
    """`value` as plain JSON data: NumPy/JAX scalars and arrays, tuples, Paths converted.

    Objects with a `to_json()` method (e.g. stream positions) are asked for their JSON
    form, so callers can pass domain objects without this package importing them.
    Non-finite floats become None (strict JSON has no NaN). Anything else that JSON
    cannot hold raises TypeError naming `where`, in the caller, not later in a
    background thread.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json_value(to_json(), where=where)
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    # NumPy and JAX scalars/arrays, without importing either: both offer tolist().
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return to_json_value(value.tolist(), where=where)
    raise TypeError(
        f"`{where}` must be JSON-serialisable (numbers, strings, lists, dicts, arrays). Got {type(value).__name__}."
    )


class Ledger:
    """Append-only JSON lines at `path` (`ledger.jsonl` in a store directory).

    One writer per file (the service, or a command run while no service writes):
    each `append` is one `write` of one line in append mode, flushed and fsynced, so
    lines from two processes never interleave within a line on a local file system,
    but their order is only the order the writes landed in. Thread-safe: the
    service loop and the checkpoint store's writer thread both append.
    """

    MAX_HELD_LINES = 100_000  # lines kept while the disk refuses them; beyond, the oldest are dropped (and counted)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._held: list[str] = []  # lines the file system refused, oldest first
        self._dropped = 0  # held lines dropped beyond MAX_HELD_LINES during the current spell

    @property
    def held(self) -> int:
        """Lines not written yet because the file system refused them (a full disk)."""
        return len(self._held)

    def append(self, event: str, **fields: Any) -> dict:
        """Appends one event and returns the record written ("event" and "time" added)."""
        record, line = self._line(event, fields)
        with self._lock:
            self._held.append(line)
            try:
                self._write_held()
            except OSError as error:
                if len(self._held) == 1:  # the first refusal of a spell: say so once
                    logger.error("%s: cannot write (%s); holding ledger lines until it can", self.path, error)
                if len(self._held) > self.MAX_HELD_LINES:
                    del self._held[0]
                    self._dropped += 1
        return record

    def append_or_raise(self, event: str, **fields: Any) -> dict:
        """`append`, except that a line the file system refuses is not held: the OSError is raised
        and the file is left as it was. For a one-shot command (`checkpoints verify`), whose
        process ends before a held line could be written (a store on a read-only mount, or
        another user's): it tells its user the line was not recorded instead of dropping it."""
        record, line = self._line(event, fields)
        with self._lock:
            self._held.append(line)
            try:
                self._write_held()
            except OSError:
                self._held.pop()
                raise
        return record

    @staticmethod
    def _line(event: str, fields: dict[str, Any]) -> tuple[dict, str]:
        if not isinstance(event, str) or not event:
            raise ValueError(f"`event` must be a non-empty string. Got {event!r}.")
        reserved = {"event", "time"} & set(fields)
        if reserved:
            raise ValueError(f"ledger fields {sorted(reserved)} are set by the ledger itself; rename them.")
        record = {"event": event, "time": time.time()}
        record.update({name: to_json_value(value, where=name) for name, value in fields.items()})
        return record, json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"

    def _write_held(self) -> None:
        """Write every held line, in order, in one write; they stay held if it fails."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(self._held)
        with open(self.path, "a+b") as handle:
            # A crash (or a full disk) mid-write leaves a line without its newline; start on a
            # fresh line so the torn fragment stays a line of its own that `read` can skip.
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    text = "\n" + text
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        if len(self._held) > 1 or self._dropped:
            logger.warning(
                "%s: writable again; wrote %d held lines%s",
                self.path,
                len(self._held),
                f" ({self._dropped} older ones were dropped)" if self._dropped else "",
            )
        self._held.clear()
        self._dropped = 0

    def read(self) -> list[dict]:
        """All events, oldest first; [] when the file does not exist.

        A line that does not parse is a write torn by a crash (the last line, or one
        that a later append started after) and is skipped, with a warning when it is
        not the last line.
        """
        return list(self.events())

    def events(self, *kinds: str) -> Iterator[dict]:
        """The events, oldest first, read a line at a time; with `kinds`, only events of those
        kinds. A service writes a window's probe event every few seconds for as long as it runs
        (hundreds of MB a day), so what looks for a few kinds must not parse, or hold, them all:
        a line this ledger wrote starts with its kind (`{"event":"skip",...`) and is parsed only
        when it is one asked for. Torn lines are skipped as `read` says."""
        wanted = tuple(json.dumps({"event": kind}, separators=(",", ":"))[:-1] + "," for kind in kinds)
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return
        with handle:
            number, pending = 0, None  # the last line that did not parse, reported once one follows it
            for raw in handle:
                number += 1
                if pending is not None:
                    logger.warning("%s: skipping torn line %d", self.path, pending)
                    pending = None
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                if wanted and line.startswith('{"event":') and not line.startswith(wanted):
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    pending = number  # a torn line: said only when it is not the last
                    continue
                if isinstance(record, dict) and (not kinds or record.get("event") in kinds):
                    yield record
