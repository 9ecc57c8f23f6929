"""The checkpoint store: numbered composite Orbax checkpoints, retention, head and pins.

A checkpoint is the unit of truth (see DESIGN.md): the learner-state PyTree ("state"),
the probe store arrays ("probe"), and JSON metadata ("meta": status, positions, probe
report, ...) saved together under one number. The store assigns numbers 1, 2, 3, ...
itself, independent of the learner's step, so a rollback never makes them go back.

What is decided here rather than by Orbax, and why:
- Retention (`checkpoints.retention`): Orbax's max_to_keep/best-N policies may delete
  the newest or the last good step (CRAFT.md), so Orbax runs with max_to_keep=None and
  the store deletes through the manager, keeping its bookkeeping right.
- Head, pins and abandoned numbers live in the store's own small `store.json`, written
  atomically (temporary file + os.replace), so `continuity rollback` and `pin` work on
  a directory without a running service.
- Saving is asynchronous through one writer thread of the store's own: `save` copies
  the arrays to host memory (a memcpy on the CPU, the device-to-host transfer on an
  accelerator) and returns; the thread writes with a synchronous Orbax manager, then
  runs retention. Measured: Orbax's own async save held the caller 16-33 ms (it starts
  ~16 threads per save); the copy holds it about 1 ms for a 1M-parameter state.
Finalisation is Orbax's: a checkpoint is written under a temporary name and renamed
on commit, so a directory left by a crash mid-save is never listed or restored.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from continuity.checkpoints.ledger import Ledger, to_json_value
from continuity.checkpoints.retention import checkpoints_to_delete

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("good", "regressed")
STORE_FILE = "store.json"
LEDGER_FILE = "ledger.jsonl"
EXPORT_SUFFIXES = (".msgpack", ".npz")
# Orbax writes checkpoint N under "N.orbax-checkpoint-tmp-<timestamp>" and renames it on commit.
_UNFINALIZED = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_STORE_KEYS = ("schema_version", "checkpoint", "saved_at")


class CheckpointNotFoundError(FileNotFoundError):
    """No such store directory, or no such checkpoint number in it."""


class CorruptCheckpointError(RuntimeError):
    """A finalized checkpoint that cannot be read back (truncated or missing files, bad JSON)."""

    def __init__(self, number: int, cause: BaseException | str):
        self.number = number
        self.cause = cause
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {_first_line(str(cause))}"
        super().__init__(f"checkpoint {number} is corrupt: {reason}")


class CheckpointSaveError(RuntimeError):
    """An asynchronous save failed in the background; raised by the next `wait`/`save`."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What `list`/`info` report about one finalized checkpoint, from its JSON item alone."""

    number: int
    metadata: dict  # the saved JSON: status, checkpoint, saved_at, schema_version + the caller's keys
    pinned: bool
    abandoned: bool  # newer than a rollback target: kept on disk, never restored
    head: bool = False  # set by `rollback`: what the next restore_latest() returns

    @property
    def status(self) -> str:
        """ "good" or "regressed" as saved; "corrupt" when the JSON item cannot be read."""
        return str(self.metadata.get("status", "unknown"))

    @property
    def saved_at(self) -> float:
        return float(self.metadata.get("saved_at", float("nan")))


@dataclass(frozen=True)
class Restored:
    number: int
    state: Any
    probe: dict
    metadata: dict


@dataclass
class _StoreFile:
    """The mutable part of a store that Orbax does not track (store.json)."""

    pinned: set[int] = field(default_factory=set)
    abandoned: set[int] = field(default_factory=set)
    head: int | None = None
    # The highest number handed out. A save is written after `save` returns, so a crash may
    # leave no trace of it on disk while its number is already in the ledger: never reuse it.
    reserved: int = 0

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "pinned": sorted(self.pinned),
            "abandoned": sorted(self.abandoned),
            "head": self.head,
            "reserved": self.reserved,
        }

    @classmethod
    def read(cls, path: Path) -> _StoreFile:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            head = data.get("head")
            return cls(
                pinned={int(n) for n in data.get("pinned", [])},
                abandoned={int(n) for n in data.get("abandoned", [])},
                head=None if head is None else int(head),
                reserved=int(data.get("reserved", 0)),
            )
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(
                f"{path} is not a readable store file ({_first_line(str(error))}); "
                f"fix or remove it (pins, head and abandoned marks live there)"
            ) from None

    def write(self, path: Path) -> None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)


def _host_copy(tree):
    """Every array leaf copied into host NumPy memory: a device array's transfer, a NumPy array's copy."""
    import jax

    return jax.tree.map(np.array, tree)


def _locked(method):
    """Runs `method` holding the store's lock, so it never sees a save half-written by the writer thread.

    A locked method must not call `wait`: the writer it would wait for needs the lock.
    """

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:300]


def _key_name(entry) -> str:
    """One jax key-path entry as the string Orbax uses for it in a checkpoint's tree."""
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _leaf_signatures(tree) -> dict[str, tuple]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        out["/".join(_key_name(e) for e in path)] = (
            None if shape is None else tuple(shape),
            None if dtype is None else np.dtype(dtype),
        )
    return out


class CheckpointStore:
    """Orbax-backed store of composite checkpoints in one directory.

    NOT thread-safe for callers: call every method from one thread (the service loop).
    Saves are written by the store's own writer thread, one at a time; their errors
    surface in the next `save`, `wait` or `close`. Everything that touches Orbax or the
    store's bookkeeping holds `_lock`, which the writer holds for a whole write, so a
    read made while a save is written waits for it. Other processes (the
    `continuity checkpoints` commands) may read the directory and edit pins/head while
    no save is running.
    """

    def __init__(self, directory: str | Path, *, keep_last: int = 3, create: bool = True):
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ValueError(f"`keep_last` must be an integer >= 1. Got {keep_last!r}.")
        self.directory = Path(directory).expanduser().absolute()
        self.keep_last = keep_last
        self._store_path = self.directory / STORE_FILE
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not self._store_path.exists():
                _StoreFile().write(self._store_path)
        elif not self.directory.is_dir():
            raise CheckpointNotFoundError(f"no checkpoint store at {self.directory}: no such directory")
        elif not self._store_path.is_file():
            raise CheckpointNotFoundError(f"{self.directory} is not a checkpoint store (it has no {STORE_FILE})")
        self._file = _StoreFile.read(self._store_path)
        self._ledger = Ledger(self.directory / LEDGER_FILE)

        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None,  # retention is ours: see checkpoints.retention
                create=False,
                # The store's writer thread is what makes saves asynchronous (see the module
                # docstring); inside it, Orbax writes and deletes synchronously.
                enable_async_checkpointing=False,
                cleanup_tmp_directories=False,  # another process may be mid-save; see _retain
                enable_background_delete=False,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "probe": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._lock = threading.RLock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: tuple[int, Future] | None = None  # the save being written, if any
        self._metadata: dict[int, dict] = {}  # JSON items already read or written
        self._closed = False
        known = list(self._manager.all_steps()) + [n for n, _ in self._unfinalized()]
        self._next = max(known + [self._file.reserved], default=0) + 1

    # ---- properties ------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def head(self) -> int | None:
        """The rollback target the next restore_latest() returns, or None."""
        return self._file.head

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- saving ----------------------------------------------------------------------

    def save(self, state, probe: Mapping, metadata: Mapping) -> int:
        """Starts an asynchronous save of one composite checkpoint; returns its number.

        Waits for (and raises the error of) the previous save first. Copies the arrays to
        host memory before it returns, so the caller may donate `state` or update `probe`
        in place right away (tests/test_checkpoints.py checks both); the writer thread
        does the rest. An empty `probe` is saved as no probe item (Orbax refuses empty
        trees) and restores as {}.
        """
        if not isinstance(metadata, Mapping):
            raise ValueError(f"`metadata` must be a dict. Got {type(metadata).__name__}.")
        status = metadata.get("status")
        if status not in STATUSES:
            allowed = " or ".join(repr(s) for s in STATUSES)
            raise ValueError(f'`metadata["status"]` must be {allowed}. Got {status!r}.')
        if not isinstance(probe, Mapping):
            raise ValueError(f"`probe` must be a dict of arrays (may be empty). Got {type(probe).__name__}.")
        self._check_open()
        self.wait()
        number = self._next
        saved = to_json_value(dict(metadata), where="metadata")
        saved.update(schema_version=SCHEMA_VERSION, checkpoint=number, saved_at=time.time())
        items = {"state": self._ocp.args.StandardSave(_host_copy(state)), "meta": self._ocp.args.JsonSave(saved)}
        if probe:
            items["probe"] = self._ocp.args.StandardSave(_host_copy(dict(probe)))
        fields = {key: saved[key] for key in ("learner_step", "positions") if key in saved}
        with self._lock:
            self._file = _StoreFile.read(self._store_path)  # keep pins another process made meanwhile
            if self._file.head is not None:
                # The new checkpoint is newer than the rollback target: it starts the lineage
                # a restart continues, so the head no longer applies.
                fields["cleared_head"] = self._file.head
                self._file.head = None
            self._file.reserved = number
            self._file.write(self._store_path)
            self._metadata[number] = saved
        self._next = number + 1
        self._pending = (number, self._writer.submit(self._write, number, items, status, fields))
        return number

    def _write(self, number: int, items: dict, status: str, fields: dict) -> None:
        """The writer thread's job: write and finalize checkpoint `number`, then run retention."""
        with self._lock:
            if not self._manager.save(number, args=self._ocp.args.Composite(**items), force=True):
                raise CheckpointSaveError(f"Orbax declined to save checkpoint {number} in {self.directory}")
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
            self._ledger.append("save", checkpoint=number, status=status, **fields)
            self._retain(finalized=number)

    @property
    def saving(self) -> bool:
        """True while a save is still being written (`wait` would block)."""
        return self._pending is not None and not self._pending[1].done()

    def wait(self) -> None:
        """Blocks until the pending save is finalized and retention ran; raises its error."""
        if self._closed or self._pending is None:
            return
        (number, future), self._pending = self._pending, None
        try:
            future.result()
        except Exception as error:
            with self._lock:
                self._metadata.pop(number, None)
            self._ledger.append("save_failed", checkpoint=number, error=_first_line(str(error)))
            raise CheckpointSaveError(
                f"saving checkpoint {number} in {self.directory} failed: "
                f"{type(error).__name__}: {_first_line(str(error))}"
            ) from error

    def close(self) -> None:
        """Waits for the pending save (raising its error) and releases Orbax's threads."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._writer.shutdown(wait=True)
            self._manager.close()

    # ---- reading ---------------------------------------------------------------------

    @_locked
    def numbers(self) -> list[int]:
        """Finalized checkpoint numbers, oldest first (called while a save is written, waits for it)."""
        return sorted(self._manager.all_steps())

    @_locked
    def list(self) -> list[CheckpointInfo]:
        """Finalized checkpoints, oldest first; reads only their JSON items."""
        return [self._info(n) for n in self.numbers()]

    @_locked
    def info(self, number: int) -> CheckpointInfo:
        self._require(number)
        return self._info(number)

    @_locked
    def last_good(self) -> int | None:
        """What a restart restores: the head if set, else the newest good non-abandoned checkpoint."""
        if self._file.head is not None:
            return self._file.head
        return self.newest_good()

    @_locked
    def newest_good(self) -> int | None:
        """The newest finalized checkpoint saved as good and not abandoned, ignoring the head."""
        for number in reversed(self.numbers()):
            if number not in self._file.abandoned and self._status(number) == "good":
                return number
        return None

    @_locked
    def restore(self, number: int, *, state_like, probe_like: Mapping | None = None) -> Restored:
        """Reads checkpoint `number` back.

        `state_like` gives the target structure, shapes and dtypes (concrete arrays or
        jax.ShapeDtypeStruct leaves, e.g. `jax.eval_shape(lambda: learner.init(0))`); containers
        come back as in it (NamedTuples, flax structs, int dict keys). A target that does
        not match the checkpoint raises ValueError naming the differing leaves; a checkpoint
        that cannot be read raises CorruptCheckpointError.
        """
        self._require(number)
        ocp = self._ocp
        self._check_target(number, state_like)
        items = {"state": ocp.args.StandardRestore(state_like), "meta": ocp.args.JsonRestore()}
        has_probe = (self._step_directory(number) / "probe").is_dir()
        if has_probe:
            items["probe"] = ocp.args.StandardRestore(dict(probe_like) if probe_like else None)
        try:
            restored = self._manager.restore(number, args=ocp.args.Composite(**items))
        except Exception as error:  # Orbax/TensorStore raise bare Exceptions for missing or short files
            raise CorruptCheckpointError(number, error) from error
        metadata = restored["meta"]
        if not isinstance(metadata, dict) or metadata.get("status") not in STATUSES:
            raise CorruptCheckpointError(number, "its JSON item has no valid status")
        probe = dict(restored["probe"]) if has_probe else {}
        return Restored(number=number, state=restored["state"], probe=probe, metadata=metadata)

    @_locked
    def restore_latest(
        self,
        *,
        state_like,
        probe_like: Mapping | None = None,
        on_skip: Callable[[int, CorruptCheckpointError], None] | None = None,
    ) -> Restored | None:
        """What a (re)start restores: the head, else the newest good checkpoint.

        A corrupt candidate is reported (`on_skip(number, error)`, default a logged
        warning), recorded as a "skip" event, marked abandoned (the lineage now continues
        from an older checkpoint), and the previous good one is tried. None when no good
        checkpoint can be read. Never deletes anything.
        """
        head = self._file.head
        for number in reversed(self.numbers()):
            if head is not None and number > head:
                continue
            if number != head and number in self._file.abandoned:
                continue
            try:
                if self._read_metadata(number).get("status") != "good":
                    continue
                return self.restore(number, state_like=state_like, probe_like=probe_like)
            except CorruptCheckpointError as error:
                if on_skip is None:
                    logger.warning("skipping checkpoint %d: %s", number, error)
                else:
                    on_skip(number, error)
                self._ledger.append("skip", checkpoint=number, error=str(error))
                self._file.abandoned.add(number)
                if self._file.head == number:
                    self._file.head = None
                self._file.write(self._store_path)
        return None

    # ---- pins and head -----------------------------------------------------------------

    @_locked
    def pin(self, number: int) -> None:
        """Keeps `number` through retention until unpinned (persisted in store.json)."""
        self._require(number)
        if number not in self._file.pinned:
            self._file.pinned.add(number)
            self._file.write(self._store_path)
        self._ledger.append("pin", checkpoint=number)

    @_locked
    def unpin(self, number: int) -> None:
        self._require(number)
        if number in self._file.pinned:
            self._file.pinned.discard(number)
            self._file.write(self._store_path)
        self._ledger.append("unpin", checkpoint=number)

    def set_head(self, number: int, *, reason: str) -> None:
        """Makes `number` what the next restore_latest() returns (`continuity rollback`).

        It must be finalized and good. Newer checkpoints stay on disk marked abandoned
        until retention removes them; the next save clears the head.
        """
        self.wait()  # outside the lock: the writer thread needs it to finish
        with self._lock:
            self._set_head(number, reason=reason)

    def _set_head(self, number: int, *, reason: str) -> None:
        self._require(number)
        status = self._status(number)
        if status != "good":
            raise ValueError(
                f"checkpoint {number} has status {status!r}; only a good checkpoint can be the one a restart restores"
            )
        newly = [n for n in self.numbers() if n > number and n not in self._file.abandoned]
        previous = self._file.head
        self._file.abandoned.update(newly)
        self._file.abandoned.discard(number)
        self._file.head = number
        self._file.write(self._store_path)
        self._ledger.append("rollback", checkpoint=number, reason=reason, previous_head=previous, abandoned=newly)

    # ---- export ------------------------------------------------------------------------

    @_locked
    def export_params(self, number: int, out: str | Path, *, params_path: Sequence = ("params",)) -> Path:
        """Writes only the params subtree of checkpoint `number`'s state, loadable without this project.

        `.msgpack`: `flax.serialization.msgpack_serialize` of a nested dict of NumPy arrays
        (load with `msgpack_restore`); `.npz`: one array per leaf, keys joined with "/".
        Dict keys are strings either way (nnx's int layer indices become "0", "1", ...).
        Only the subtree is read (an Orbax partial restore without a target, as host NumPy
        arrays), so the replay buffer and optimizer state are never loaded.
        """
        out = Path(out)
        if out.suffix not in EXPORT_SUFFIXES:
            raise ValueError(f"`out` must end in one of {', '.join(EXPORT_SUFFIXES)}. Got {str(out)!r}.")
        self._require(number)
        params_path = tuple(str(key) for key in params_path)
        if not params_path:
            raise ValueError("`params_path` must name at least one key, e.g. ('params',).")
        ocp = self._ocp
        tree = self._state_metadata(number)
        for depth, key in enumerate(params_path):
            if not isinstance(tree, Mapping) or key not in tree:
                available = sorted(tree) if isinstance(tree, Mapping) else []
                raise ValueError(
                    f"checkpoint {number} has no state subtree {'/'.join(params_path[: depth + 1])!r}; "
                    f"keys there: {available}"
                )
            tree = tree[key]

        import jax

        def nest(leaf_value):
            for key in reversed(params_path):
                leaf_value = {key: leaf_value}
            return leaf_value

        item = nest(jax.tree.map(lambda _: np.empty(0), tree))
        restore_args = nest(jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                restored = checkpointer.restore(
                    self._step_directory(number) / "state",
                    args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
                )
        except Exception as error:
            raise CorruptCheckpointError(number, error) from error
        for key in params_path:
            restored = restored[key]
        params = jax.tree.map(np.asarray, restored)

        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            if out.suffix == ".msgpack":
                from flax import serialization

                handle.write(serialization.msgpack_serialize(params))
            else:
                flat = {
                    "/".join(_key_name(e) for e in path): leaf
                    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                }
                np.savez(handle, **flat)
        os.replace(temporary, out)
        return out

    # ---- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the checkpoint store at {self.directory} is closed")

    def _step_directory(self, number: int) -> Path:
        return self.directory / str(number)

    def _require(self, number) -> None:
        if isinstance(number, bool) or not isinstance(number, (int, np.integer)):
            raise TypeError(f"a checkpoint number must be an integer. Got {number!r}.")
        available = self.numbers()
        if int(number) not in available:
            listed = ", ".join(str(n) for n in available) if available else "none"
            raise CheckpointNotFoundError(f"no checkpoint {number} in {self.directory} (checkpoints: {listed})")

    def _read_metadata(self, number: int) -> dict:
        """The JSON item of `number`; CorruptCheckpointError when it cannot be read."""
        if number not in self._metadata:
            try:
                restored = self._manager.restore(
                    number, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
                )
                metadata = restored["meta"]
            except Exception as error:
                raise CorruptCheckpointError(number, error) from error
            if not isinstance(metadata, dict):
                raise CorruptCheckpointError(number, "its JSON item is not an object")
            self._metadata[number] = metadata
        return self._metadata[number]

    def _status(self, number: int) -> str:
        try:
            return str(self._read_metadata(number).get("status", "unknown"))
        except CorruptCheckpointError:
            return "corrupt"

    def _info(self, number: int) -> CheckpointInfo:
        try:
            metadata = dict(self._read_metadata(number))
        except CorruptCheckpointError as error:
            metadata = {"status": "corrupt", "checkpoint": number, "error": str(error)}
        return CheckpointInfo(
            number=number,
            metadata=metadata,
            pinned=number in self._file.pinned,
            abandoned=number in self._file.abandoned,
            head=number == self._file.head,
        )

    def _state_metadata(self, number: int):
        """The saved state tree with Orbax's per-leaf metadata (string keys, lists for tuples)."""
        try:
            metadata = self._manager.item_metadata(number)["state"]
        except Exception as error:
            raise CorruptCheckpointError(number, error) from error
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise CorruptCheckpointError(number, "its state item has no readable tree metadata")
        return tree

    def _check_target(self, number: int, state_like) -> None:
        """ValueError when `state_like` cannot be the restore target of `number`'s state.

        Checked before restoring so that a caller's wrong target is reported as such,
        not mistaken for corruption (which restore_latest would skip past).
        """
        saved = _leaf_signatures(self._state_metadata(number))
        wanted = _leaf_signatures(state_like)
        problems = []
        missing = sorted(set(saved) - set(wanted))
        extra = sorted(set(wanted) - set(saved))
        if missing:
            problems.append(f"not in state_like: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            problems.append(f"not in the checkpoint: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        for path in sorted(set(saved) & set(wanted)):
            (saved_shape, saved_dtype), (shape, dtype) = saved[path], wanted[path]
            if shape is not None and saved_shape is not None and shape != saved_shape:
                problems.append(f"{path}: checkpoint shape {saved_shape}, state_like {shape}")
            elif dtype is not None and saved_dtype is not None and dtype != saved_dtype:
                problems.append(f"{path}: checkpoint dtype {saved_dtype}, state_like {dtype}")
            if len(problems) >= 5:
                break
        if problems:
            raise ValueError(f"`state_like` does not match checkpoint {number}: " + "; ".join(problems))

    # builtins.list: inside this class `list` names the method CheckpointStore.list.
    def _unfinalized(self) -> builtins.list[tuple[int, Path]]:
        """Directories Orbax left uncommitted (a crash mid-save): (number, path)."""
        found = []
        if self.directory.is_dir():
            for entry in self.directory.iterdir():
                match = _UNFINALIZED.match(entry.name)
                if match and entry.is_dir():
                    found.append((int(match.group(1)), entry))
        return sorted(found)

    def _retain(self, *, finalized: int) -> None:
        """Retention after checkpoint `finalized` committed: delete what the rule lets go."""
        numbers = self.numbers()
        doomed = checkpoints_to_delete(
            numbers, keep_last=self.keep_last, last_good=self.last_good(), pinned=self._file.pinned
        )
        for number in doomed:
            status = self._status(number)
            self._manager.delete(number)
            self._metadata.pop(number, None)
            self._ledger.append("delete", checkpoint=number, status=status, reason="retention")
        if self._file.abandoned & set(doomed):
            self._file.abandoned -= set(doomed)
            self._file.write(self._store_path)
        # Leftovers of saves that crashed before committing. Only numbers below the one
        # just finalized: the store's single writer has moved past them for good.
        for number, path in self._unfinalized():
            if number < finalized:
                shutil.rmtree(path, ignore_errors=True)
                self._ledger.append("delete", checkpoint=number, reason="unfinalized")
