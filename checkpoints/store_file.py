"""store.json: what a store knows that Orbax does not (pins, head, abandoned, numbers handed out), and its rebuild.

The file is small and written atomically (temporary file + os.replace) by the store's
owner. If it is lost or garbled anyway (a disk error, a hand edit), it is rebuilt from
what survives it (`continuity checkpoints repair`; `serve` does it by itself, with a
warning):

- reserved, the highest number handed out: the highest number among the checkpoint
  directories (finalized or not) and the ledger's events, so no number is reused;
- pins: the ledger's pin and unpin events, in order;
- head and abandoned marks: the ledger's rollback events (the store's, which list what
  they abandoned, not the guard's window rollbacks), cleared by a later save, plus the
  checkpoints a restore skipped as corrupt;
- only checkpoints still on disk keep a mark; a head that is gone is dropped.

Without a ledger the marks cannot be recovered: the rebuild says so, and keeps only
what the directories tell (the numbers).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

STORE_FILE = "store.json"
STORE_FILE_SCHEMAS = (1, 2)  # store.json schema versions this code reads


class StoreFileError(ValueError):
    """store.json is missing from a store with checkpoints, or cannot be read as one."""


@dataclass
class StoreFile:
    """The mutable part of a store that Orbax does not track (store.json)."""

    pinned: set[int] = field(default_factory=set)
    abandoned: set[int] = field(default_factory=set)
    head: int | None = None
    # The highest number handed out. A save is written after `save` returns, so a crash may
    # leave no trace of it on disk while its number is already in the ledger: never reuse it.
    reserved: int = 0

    def to_json(self) -> dict:
        return {
            "schema_version": STORE_FILE_SCHEMAS[-1],
            "pinned": sorted(self.pinned),
            "abandoned": sorted(self.abandoned),
            "head": self.head,
            "reserved": self.reserved,
        }

    @classmethod
    def read(cls, path: Path) -> StoreFile:
        """The file at `path`; StoreFileError (one line, saying how to rebuild it) when it is not one."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_json(data)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError, UnicodeDecodeError) as error:
            raise StoreFileError(unreadable_message(path, first_line(str(error)))) from None

    @classmethod
    def from_json(cls, data) -> StoreFile:
        """Strict: every key present with its type, so a truncated or hand-emptied file is never taken as "no pins"."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        missing = [key for key in ("schema_version", "pinned", "abandoned", "head", "reserved") if key not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        if data["schema_version"] not in STORE_FILE_SCHEMAS:
            raise ValueError(f"schema_version {data['schema_version']!r} is not one of {STORE_FILE_SCHEMAS}")
        head = data["head"]
        if head is not None and not _is_number(head):
            raise ValueError(f"head must be a checkpoint number or null, got {head!r}")
        if not _is_number(data["reserved"], minimum=0):
            raise ValueError(f"reserved must be a number >= 0, got {data['reserved']!r}")
        for key in ("pinned", "abandoned"):
            if not isinstance(data[key], list) or not all(_is_number(n) for n in data[key]):
                raise ValueError(f"{key} must be a list of checkpoint numbers")
        return cls(pinned=set(data["pinned"]), abandoned=set(data["abandoned"]), head=head, reserved=data["reserved"])

    def write(self, path: Path) -> None:
        """Atomically: a crash or a full disk leaves the previous file whole (and no temporary behind)."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(self.to_json(), handle, indent=1)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def describe(self) -> str:
        """ "head 3, pinned 2, 4, abandoned 5, 6, numbers handed out up to 9" (what a rebuild recovered)."""
        parts = [f"head {self.head}" if self.head is not None else "no head"]
        parts.append(f"pinned {', '.join(map(str, sorted(self.pinned)))}" if self.pinned else "nothing pinned")
        if self.abandoned:
            parts.append(f"abandoned {', '.join(map(str, sorted(self.abandoned)))}")
        parts.append(f"numbers handed out up to {self.reserved}")
        return ", ".join(parts)


def unreadable_message(path: Path, reason: str) -> str:
    return (
        f"{path} is not a readable store file ({reason}); rebuild it from the checkpoints and the ledger "
        f"with `continuity checkpoints repair --dir {path.parent}` (`continuity serve` does so by itself)"
    )


def rebuild(events: Iterable[Mapping], finalized: Iterable[int], unfinalized: Iterable[int] = ()) -> StoreFile:
    """store.json as the ledger's `events` (oldest first) and the checkpoint directories on disk imply it.

    `finalized`: the numbers of finalized checkpoints; `unfinalized`: numbers of directories
    a crashed or failed save left. Pure: see the module docstring for the rules.
    """
    finalized = set(finalized)
    rebuilt = StoreFile(reserved=max(finalized | set(unfinalized), default=0))
    for event in events:
        number = event.get("checkpoint")
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            continue
        rebuilt.reserved = max(rebuilt.reserved, number)
        kind = event.get("event")
        if kind == "pin":
            rebuilt.pinned.add(number)
        elif kind == "unpin":
            rebuilt.pinned.discard(number)
        elif kind == "rollback" and isinstance(event.get("abandoned"), list):  # the store's head, not a window's
            rebuilt.abandoned.update(n for n in event["abandoned"] if _is_number(n))
            rebuilt.abandoned.discard(number)
            rebuilt.head = number
        elif kind == "save":
            rebuilt.head = None  # a save after a rollback continues from its head: the head no longer applies
        elif kind == "skip":  # found corrupt by a restore: never restored again
            rebuilt.abandoned.add(number)
            if rebuilt.head == number:
                rebuilt.head = None
        elif kind == "delete":
            rebuilt.pinned.discard(number)
            rebuilt.abandoned.discard(number)
    rebuilt.pinned &= finalized
    rebuilt.abandoned &= finalized
    if rebuilt.head not in finalized:
        rebuilt.head = None
    return rebuilt


def _is_number(value, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


_OS_REASON = re.compile(r"[^:\"]{0,120}\[os_error_code='?\d+'?\]")


def first_line(text: str) -> str:
    """The first line of an error message, at most ~300 characters: its start and the operating
    system's reason ("File too large [os_error_code='27']"), which TensorStore puts at the end of
    a write's error but in the middle of an open's (before a dump of the array's spec)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.split(" See full TensorStore details")[0]  # then a repr of a bound method, not a reason
    if len(line) <= 300:
        return line
    reason = _OS_REASON.search(line, 150)
    return f"{line[:150]} ... {reason.group(0).strip() if reason else line[-140:]}"
