"""The checkpoint store: numbered composite Orbax checkpoints, retention, head and pins.

A checkpoint is the unit of truth (what a restart resumes): the learner-state PyTree ("state"),
the probe store arrays ("probe"), and JSON metadata ("meta": status, positions, probe
report, content digests, ...) saved together under one number. The store assigns
numbers 1, 2, 3, ... itself, independent of the learner's step, so a rollback never
makes them go back.

What is decided here rather than by Orbax, and why:
- Ownership (`checkpoints.lock`): one process at a time changes a store, holding an
  flock on its store.lock; readers take no lock. Two writers undid each other's
  decisions (an operator's rollback reverted by the service's next save).
- Retention (`checkpoints.retention`): Orbax's max_to_keep/best-N policies may delete
  the newest or the last good step (seen with Orbax 0.12), so Orbax runs with max_to_keep=None and
  the store deletes through the manager, keeping its bookkeeping right.
- Head, pins and abandoned numbers live in the store's own small `store.json`
  (`checkpoints.store_file`), written atomically, rebuilt from the ledger if lost.
- Integrity (`checkpoints.integrity`): Orbax stores no checksum, so the store saves a
  CRC-32C per array and checks it on every restore, and a manifest of file sizes that
  `list` checks without reading data.
- Saving is asynchronous through one writer thread of the store's own: `save` copies
  the arrays to host memory (a memcpy on the CPU, the device-to-host transfer on an
  accelerator) and returns; the thread digests and writes them with a synchronous Orbax
  manager, then runs retention. Orbax's own async save held the caller much longer (it
  starts ~16 threads per save; BENCHMARKS.md).
Finalisation is Orbax's: a checkpoint is written under a temporary name and renamed
on commit, so a directory left by a crash mid-save is never listed or restored. The
owner removes such leftovers when it opens the store and right after a save fails
(a full disk), so they never pile up.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from continuity.checkpoints import integrity
from continuity.checkpoints.ledger import Ledger, to_json_value
from continuity.checkpoints.lock import LOCK_FILE, StoreLock, StoreLockedError, describe_holder
from continuity.checkpoints.retention import checkpoints_to_delete
from continuity.checkpoints.store_file import (
    STORE_FILE,
    StoreFile,
    StoreFileError,
    first_line,
    rebuild,
    unreadable_message,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: content digests ("integrity") in the JSON item; 1 had none
STATUSES = ("good", "regressed")
CONDITIONS = ("intact", "unverified", "corrupt")
LEDGER_FILE = "ledger.jsonl"
EXPORT_SUFFIXES = (".msgpack", ".npz")
# Orbax writes checkpoint N under "N.orbax-checkpoint-tmp-<timestamp>" and renames it on commit.
_UNFINALIZED = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def _raise(error: BaseException):
    raise error


def _holds_a_store(directory: Path) -> bool:
    """Whether `directory` has anything of a store: its files, or a checkpoint's numbered directory."""
    marks = (STORE_FILE, LEDGER_FILE, LOCK_FILE)
    return any((directory / mark).exists() for mark in marks) or any(e.name.isdigit() for e in directory.iterdir())


class CheckpointNotFoundError(FileNotFoundError):
    """No such store directory, or no such checkpoint number in it."""


class CorruptCheckpointError(RuntimeError):
    """A finalized checkpoint that cannot be read back whole: missing or short files, bad JSON, changed bytes."""

    def __init__(self, number: int, cause: BaseException | str):
        self.number = number
        self.cause = cause
        self.reason = cause if isinstance(cause, str) else self.describe(cause)
        super().__init__(f"checkpoint {number} is corrupt: {self.reason}")

    @staticmethod
    def describe(error: BaseException) -> str:
        """One line for a library's error: its type and the first line of its message."""
        return f"{type(error).__name__}: {first_line(str(error))}"


class CheckpointSaveError(RuntimeError):
    """A save failed (a full disk, say); raised by `save` itself or, for the writer thread's part, the next `wait`."""


class ReadOnlyStoreError(RuntimeError):
    """A change asked of a store opened for reading (it does not hold the directory's lock)."""


class _PathError(OSError):
    """An OSError whose message is the line a user reads: it names the path and why, so `str` leaves
    out OSError's "[Errno N]" prefix."""

    def __str__(self) -> str:
        return str(self.strerror)


class StoreAccessError(_PathError):
    """The store's directory cannot be used at all: it is a file, or may not be created, locked or read."""

    def __init__(self, directory: Path, error: OSError):
        where = f" ({error.filename})" if error.filename and str(error.filename) != str(directory) else ""
        super().__init__(error.errno, f"cannot use {directory} as a checkpoint store: {error.strerror or error}{where}")


class ExportDestinationError(_PathError):
    """`export_params` cannot write its file where it was asked: a file in the way of its directory,
    no permission, a read-only or full disk. The message names the destination, not the store."""

    def __init__(self, out: Path, error: OSError, temporary: Path):
        reason = error.strerror or str(error)
        named = {str(name) for name in (error.filename, error.filename2) if name} - {str(out)}
        in_the_way = _file_in_the_way(out.parent)
        if in_the_way is not None:
            reason = f"{in_the_way} is a file, not a directory"
        elif out.is_dir():
            reason = "it is a directory (name a file in it)"
        elif str(temporary) in named:  # the file written first, then renamed: name where it was
            reason = f"{reason} (writing in {out.parent})"
        elif named:
            reason = f"{reason} ({', '.join(sorted(named))})"
        super().__init__(error.errno, f"cannot export to {out}: {reason}")


def _cannot_write(error: OSError) -> str:
    """Why a store refused a write, in a user's words: read-only, or what the file system said."""
    if error.errno == errno.EROFS:
        return "the store is on a read-only file system"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "the store is read-only to this process (no permission to write its ledger)"
    return str(error.strerror or error)


def _file_in_the_way(directory: Path) -> Path | None:
    """The nearest of `directory` and its parents that exists and is not a directory, if any."""
    for candidate in (directory, *directory.parents):
        if candidate.exists() or candidate.is_symlink():
            return None if candidate.is_dir() else candidate
    return None


@dataclass(frozen=True)
class CheckpointInfo:
    """What `list`/`info` report about one finalized checkpoint, without reading its arrays."""

    number: int
    metadata: dict  # the saved JSON: status, checkpoint, saved_at, schema_version + the caller's keys
    pinned: bool
    abandoned: bool  # newer than a rollback target, or skipped as corrupt: kept on disk, never restored
    head: bool = False  # set by `rollback`: what the next restore_latest() returns
    # "intact": its files are as written and it has content digests (checked on restore);
    # "unverified": saved without digests or a file manifest; "corrupt": see `problem`.
    condition: str = "intact"
    problem: str | None = None  # why it is corrupt or unverified

    @property
    def status(self) -> str:
        """ "good" or "regressed" as saved; "corrupt" when it is known to be."""
        if self.condition == "corrupt":
            return "corrupt"
        return str(self.metadata.get("status", "unknown"))

    @property
    def saved_at(self) -> float:
        return float(self.metadata.get("saved_at", float("nan")))


@dataclass(frozen=True)
class Verification:
    """What `verify` found reading one checkpoint's arrays back: "ok", "corrupt" or "unverified"."""

    number: int
    result: str
    detail: str  # the reason when corrupt or unverified; what was checked when ok
    arrays: int = 0
    bytes: int = 0
    # Why the finding is not in the ledger (a store this process may not write); None once recorded.
    unrecorded: str | None = None


@dataclass(frozen=True)
class Restored:
    number: int
    state: Any
    probe: dict
    metadata: dict
    verified: bool = False  # every array matched its saved digest (False: saved without digests)


def _this_process_only(ocp) -> dict:
    """Orbax options (for the manager and each item's handler) for a store of one of several processes
    (after jax.distributed.initialize): the process that opens it is its only writer and reader,
    with no barrier waiting for the others.

    A model trained over several processes is replicated, so one process holds all of it; that
    process saves a host copy of it (and of every process's positions, gathered) like one
    process would, the others save nothing. Orbax would otherwise make every process join
    every save and restore. One process (the usual case): no option, Orbax as it always ran.
    Orbax 0.12 writes NumPy arrays from process 0 only (its NumPy type handler checks
    `process_index() == 0`), so only process 0's store can hold a checkpoint's arrays.
    """
    import jax

    if jax.process_count() == 1:
        return {}
    here = jax.process_index()
    return {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=here, active_processes={here})}


def _spans_processes(tree) -> bool:
    """True when `tree` holds arrays laid over devices of several processes (a model trained by
    several processes): each process restores host values, the same everywhere, and puts them there."""
    import jax

    return any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable for leaf in jax.tree.leaves(tree))


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


def _leaf_signatures(tree) -> dict[str, tuple]:
    out = {}
    for path, leaf in integrity.leaves_by_path(tree):
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        out[path] = (None if shape is None else tuple(shape), None if dtype is None else np.dtype(dtype))
    return out


class CheckpointStore:
    """Orbax-backed store of composite checkpoints in one directory.

    `owner` (default: `create`): take the directory's lock (StoreLockedError when another
    live process holds it) and with it the right to change the store: save, pin, roll
    back, repair. Opened with `create=False` a store is read-only unless `owner=True`:
    it lists, restores, verifies and exports while a service owns the directory.
    `repair`: an owner whose store.json is missing or unreadable rebuilds it from the
    checkpoint directories and the ledger (with a warning) instead of raising
    StoreFileError.

    NOT thread-safe for callers: call every method from one thread (the service loop).
    Saves are written by the store's own writer thread, one at a time; their errors
    surface in the next `save`, `wait` or `close`. Everything that touches Orbax or the
    store's bookkeeping holds `_lock`, which the writer holds for a whole write, so a
    read made while a save is written waits for it.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 3,
        create: bool = True,
        owner: bool | None = None,
        repair: bool = False,
    ):
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ValueError(f"`keep_last` must be an integer >= 1. Got {keep_last!r}.")
        self.directory = Path(directory).expanduser().absolute()
        self.keep_last = keep_last
        self.owner = create if owner is None else owner
        self.repaired: str | None = None  # what a repair at opening rebuilt, if one ran
        self._store_path = self.directory / STORE_FILE
        try:
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.directory))
            if create:
                self.directory.mkdir(parents=True, exist_ok=True)
            elif not self.directory.is_dir():
                raise CheckpointNotFoundError(f"no checkpoint store at {self.directory}: no such directory")
            elif self.owner and not _holds_a_store(self.directory):
                # Its lock and a rebuilt store.json would make one of a mistyped path.
                raise CheckpointNotFoundError(
                    f"{self.directory} is no checkpoint store (no {STORE_FILE}, {LEDGER_FILE}, {LOCK_FILE} or "
                    "checkpoint directories in it)"
                )
            self._ownership = StoreLock(self.directory) if self.owner else None
            if self._ownership is not None:
                self._ownership.acquire()  # before anything is read: the owner's view is the only one that changes
        except (StoreLockedError, CheckpointNotFoundError):
            raise
        except OSError as error:  # a file in its place, no permission, a lock file that is a directory
            raise StoreAccessError(self.directory, error) from None
        try:
            self._open(repair)
        except BaseException as error:
            if self._ownership is not None:
                self._ownership.release()
            if isinstance(error, OSError) and not isinstance(error, CheckpointNotFoundError):
                raise StoreAccessError(self.directory, error) from None  # e.g. its ledger unreadable
            raise

    def _open(self, repair: bool) -> None:
        self._ledger = Ledger(self.directory / LEDGER_FILE)

        import orbax.checkpoint as ocp

        self._ocp = ocp
        alone = _this_process_only(ocp)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                **alone,
                max_to_keep=None,  # retention is ours: see checkpoints.retention
                create=False,
                # The store's writer thread is what makes saves asynchronous (see the module
                # docstring); inside it, Orbax writes and deletes synchronously.
                enable_async_checkpointing=False,
                cleanup_tmp_directories=False,  # the owner removes leftovers itself, recording them in the ledger
                enable_background_delete=False,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(**alone),
                "probe": ocp.StandardCheckpointHandler(**alone),
                "meta": ocp.JsonCheckpointHandler(**alone),
            },
        )
        self._lock = threading.RLock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: tuple[int, Future] | None = None  # the save being written, if any
        self._metadata: dict[int, dict] = {}  # JSON items already read or written
        self._closed = False
        leftovers = self._unfinalized()
        self._file = self._read_store_file(repair, leftovers)
        known = list(self._manager.all_steps()) + [n for n, _ in leftovers]
        self._next = max(known + [self._file.reserved], default=0) + 1
        if self.owner:
            # The owner is the only writer, so these are the remains of saves that crashed or
            # failed (a full disk) in an earlier run: nothing will ever finish them.
            self._remove(leftovers, reason="unfinalized")

    def _read_store_file(self, repair: bool, leftovers) -> StoreFile:
        try:
            return StoreFile.read(self._store_path)
        except FileNotFoundError:
            if not (self._manager.all_steps() or leftovers or self._ledger.path.exists()):
                if not self.owner:
                    raise CheckpointNotFoundError(
                        f"{self.directory} is not a checkpoint store (it has no {STORE_FILE})"
                    ) from None
                fresh = StoreFile()
                fresh.write(self._store_path)
                return fresh
            problem = StoreFileError(unreadable_message(self._store_path, "it is missing"))
        except StoreFileError as error:
            problem = error
        if not (self.owner and repair):
            raise problem
        rebuilt = self._rebuilt(leftovers)
        rebuilt.write(self._store_path)
        events = len(self._ledger.read())
        self.repaired = (
            f"rebuilt {self._store_path} from {len(self._manager.all_steps())} checkpoints and "
            f"{events} ledger events: {rebuilt.describe()}"
            + ("" if events else " (no ledger: pins, head and abandoned marks could not be recovered)")
        )
        logger.warning("%s; %s", str(problem).split("; rebuild it")[0], self.repaired)
        self._ledger.append("repair", store_file=rebuilt.to_json(), problem=str(problem))
        return rebuilt

    def _rebuilt(self, leftovers) -> StoreFile:
        return rebuild(self._ledger.read(), self._manager.all_steps(), [n for n, _ in leftovers])

    # ---- properties ------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def head(self) -> int | None:
        """The rollback target the next restore_latest() returns, or None."""
        return self._file.head

    def describe_marks(self) -> str:
        """Head, pins, abandoned marks and the numbers handed out, as store.json holds them, in words."""
        return self._file.describe()

    def describe_owner(self, **fields) -> None:
        """Add to what store.lock says about this owner (e.g. url=...), for a refused process's message."""
        if self._ownership is not None:
            self._ownership.describe(**fields)

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
        does the rest: digests, writes, finalizes, runs retention. An empty `probe` is
        saved as no probe item (Orbax refuses empty trees) and restores as {}.
        CheckpointSaveError when store.json cannot be written (nothing was saved).
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
        self._check_owner("saving")
        self.wait()
        self._keep_ownership()
        number = self._next
        saved = to_json_value(dict(metadata), where="metadata")
        saved.update(schema_version=SCHEMA_VERSION, checkpoint=number, saved_at=time.time())
        state_copy = _host_copy(state)
        probe_copy = _host_copy(dict(probe)) if probe else {}
        fields = {key: saved[key] for key in ("learner_step", "positions") if key in saved}
        with self._lock:
            before = (self._file.head, self._file.reserved)
            if self._file.head is not None:
                # The new checkpoint is newer than the rollback target: it starts the lineage
                # a restart continues, so the head no longer applies.
                fields["cleared_head"] = self._file.head
                self._file.head = None
            self._file.reserved = number
            try:
                self._file.write(self._store_path)
            except OSError as error:
                self._file.head, self._file.reserved = before
                self._ledger.append("save_failed", error=f"{type(error).__name__}: {first_line(str(error))}")
                raise CheckpointSaveError(
                    f"saving checkpoint {number} in {self.directory} failed: cannot write {STORE_FILE} "
                    f"({type(error).__name__}: {first_line(str(error))})"
                ) from error
            self._metadata[number] = saved
        self._next = number + 1
        task = self._writer.submit(self._write, number, state_copy, probe_copy, saved, status, fields)
        self._pending = (number, task)
        return number

    def _write(self, number: int, state, probe: dict, saved: dict, status: str, fields: dict) -> None:
        """The writer thread's job: digest, write and finalize checkpoint `number`, then run retention."""
        ocp = self._ocp
        with self._lock:
            # A failed save's array writes can outlive its error and recreate the directory
            # `_discard_failed` removed; saves are serial, so any such directory now is garbage.
            stale = [(n, path) for n, path in self._unfinalized() if n != number]
            self._remove(stale, reason="late writes of a failed save")
            saved["integrity"] = integrity.describe(state, probe)
            items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(saved)}
            if probe:
                items["probe"] = ocp.args.StandardSave(probe)
            try:
                if not self._manager.save(number, args=ocp.args.Composite(**items), force=True):
                    raise CheckpointSaveError(f"Orbax declined to save checkpoint {number} in {self.directory}")
                self._manager.wait_until_finished()
                self._manager.check_for_errors()
            except BaseException:
                self._discard_failed(number)
                raise
            try:
                integrity.write_manifest(self._step_directory(number))
            except OSError as error:  # the checkpoint is whole; only `list`'s cheap check is missing
                logger.warning("checkpoint %d is saved but its file manifest is not (%s)", number, error)
            self._ledger.append("save", checkpoint=number, status=status, **fields)
            try:
                self._retain()
            except Exception as error:  # noqa: BLE001 - retention frees space; failing it must not fail the save
                logger.warning("retention after checkpoint %d failed: %s", number, first_line(str(error)))

    def _discard_failed(self, number: int) -> None:
        """Remove whatever a failed save of `number` left (its temporary directory, or a half-finalized one)."""
        doomed = [(n, path) for n, path in self._unfinalized() if n == number]
        if self._step_directory(number).exists():
            doomed.append((number, self._step_directory(number)))
        self._remove(doomed, reason="failed save")
        self._metadata.pop(number, None)
        self._manager.reload()  # Orbax may have listed the step before it failed

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
            self._ledger.append("save_failed", checkpoint=number, error=first_line(str(error)))
            raise CheckpointSaveError(
                f"saving checkpoint {number} in {self.directory} failed: "
                f"{type(error).__name__}: {first_line(str(error))}"
            ) from error

    def close(self) -> None:
        """Waits for the pending save (raising its error), releases Orbax's threads and the directory's lock."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._writer.shutdown(wait=True)
            self._manager.close()
            if self._ownership is not None:
                # The last save may have failed with array writes still running (see `_write`);
                # nothing else sweeps them before the next owner opens the store.
                self._remove(self._unfinalized(), reason="late writes of a failed save")
                self._ownership.release()

    # ---- reading ---------------------------------------------------------------------

    @_locked
    def numbers(self) -> list[int]:
        """Finalized checkpoint numbers, oldest first (called while a save is written, waits for it)."""
        return sorted(self._manager.all_steps())

    @_locked
    def list(self) -> list[CheckpointInfo]:
        """Finalized checkpoints, oldest first; reads their JSON items, stats their files, reads the ledger."""
        findings = self._findings()
        return [self._info(n, findings) for n in self.numbers()]

    @_locked
    def info(self, number: int) -> CheckpointInfo:
        self._require(number)
        return self._info(number, self._findings())

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
    def restore(
        self,
        number: int,
        *,
        state_like,
        probe_like: Mapping | None = None,
        reshape: Callable[[Any], Any] | None = None,
    ) -> Restored:
        """Reads checkpoint `number` back, checking every array against its saved digest.

        `state_like` gives the target structure, shapes and dtypes (concrete arrays or
        jax.ShapeDtypeStruct leaves, e.g. `jax.eval_shape(lambda: learner.init(0))`); containers
        come back as in it (NamedTuples, flax structs, int dict keys). A target that does
        not match the checkpoint raises ValueError naming the differing leaves; a checkpoint
        that cannot be read, or whose bytes changed since they were saved, raises
        CorruptCheckpointError. One saved without digests (schema 1) restores unverified,
        with a warning.

        `reshape`: for a target whose leaves have other shapes than the saved ones (the same
        leaves laid out otherwise: a replay buffer saved over another number of devices), called
        with the state as saved, in host NumPy arrays, after its digests are checked; it returns
        the state in `state_like`'s shapes, which is put where `state_like`'s arrays are.
        """
        import jax

        self._require(number)
        self._require_readable(number)
        ocp = self._ocp
        reshaped = reshape is not None and self._other_shapes(number, state_like)
        target = state_like
        if reshaped:  # read as saved, to host; reshaped below
            state_like = self._saved_like(number, state_like)
        else:
            self._check_target(number, state_like)
        spanning = not reshaped and _spans_processes(state_like)
        if spanning:  # arrays over several processes' devices: read to host, then put where `state_like` is
            state_like = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), state_like)
        items = {"state": ocp.args.StandardRestore(state_like), "meta": ocp.args.JsonRestore()}
        has_probe = (self._step_directory(number) / "probe").is_dir()
        if has_probe:
            items["probe"] = ocp.args.StandardRestore(dict(probe_like) if probe_like else None)
        try:
            restored = self._manager.restore(number, args=ocp.args.Composite(**items))
        except Exception as error:  # Orbax/TensorStore raise bare Exceptions for missing, short or garbled files
            raise CorruptCheckpointError(
                number, f"its arrays cannot be read ({CorruptCheckpointError.describe(error)})"
            ) from error
        metadata = restored["meta"]
        if not isinstance(metadata, dict) or metadata.get("status") not in STATUSES:
            raise CorruptCheckpointError(number, "its JSON item has no valid status")
        probe = dict(restored["probe"]) if has_probe else {}
        verified = self._check_digests(number, metadata, restored["state"], probe)
        if not verified:
            logger.warning("checkpoint %d was saved without content digests: restored unverified", number)
        state = restored["state"]
        if reshape is not None and reshaped:
            state = self._reshaped(number, reshape, state, target)
        elif spanning:
            state = jax.tree.map(
                lambda host, like: jax.make_array_from_callback(host.shape, like.sharding, lambda index: host[index]),
                state,
                target,
            )
        return Restored(number=number, state=state, probe=probe, metadata=metadata, verified=verified)

    @staticmethod
    def _check_digests(number: int, metadata: dict, state, probe: Mapping) -> bool:
        """True when every array matches its digest; False when none were saved; else CorruptCheckpointError."""
        saved = metadata.get("integrity")
        if saved is None:
            return False
        if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ("state", "probe")):
            raise CorruptCheckpointError(number, "its content digests are unreadable")
        for item, tree in (("state", state), ("probe", dict(probe))):
            problem = integrity.mismatch(item, saved[item], tree)
            if problem is not None:
                raise CorruptCheckpointError(number, problem)
        return True

    @_locked
    def restore_latest(
        self,
        *,
        state_like,
        probe_like: Mapping | None = None,
        on_skip: Callable[[int, CorruptCheckpointError], None] | None = None,
        reshape: Callable[[Any], Any] | None = None,
    ) -> Restored | None:
        """What a (re)start restores: the head, else the newest good checkpoint.

        A corrupt candidate is reported (`on_skip(number, error)`, default a logged
        warning) and the previous good one is tried. The owner also records a "skip"
        event and marks it abandoned (the lineage now continues from an older
        checkpoint). None when no good checkpoint can be read. Never deletes anything.
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
                return self.restore(number, state_like=state_like, probe_like=probe_like, reshape=reshape)
            except CorruptCheckpointError as error:
                if on_skip is None:
                    logger.warning("%s; skipping it for the previous good checkpoint", error)
                else:
                    on_skip(number, error)
                if self.owner:
                    self._ledger.append("skip", checkpoint=number, error=str(error))
                    self._file.abandoned.add(number)
                    if self._file.head == number:
                        self._file.head = None
                    try:
                        self._file.write(self._store_path)
                    except OSError as write_error:  # a full disk: the next start finds it corrupt again
                        logger.warning("cannot mark checkpoint %d abandoned in %s: %s", number, STORE_FILE, write_error)
        return None

    @_locked
    def verify(self, number: int) -> Verification:
        """Reads checkpoint `number`'s arrays back (as NumPy, no target needed) and checks them against its digests.

        Records what it found in the ledger (an append-only "verify" event, safe beside
        the owner), so `list` shows a corruption found here. On a store this process may not
        write (a read-only mount, another user's) the finding is returned all the same, with
        `unrecorded` saying why it is not in the ledger; the ledger is left as it was.
        """
        self._require(number)
        verification = self._verify(number)
        try:
            self._ledger.append_or_raise(
                "verify", checkpoint=number, result=verification.result, detail=verification.detail
            )
        except OSError as error:
            return replace(verification, unrecorded=_cannot_write(error))
        return verification

    def _verify(self, number: int) -> Verification:
        try:
            metadata = self._read_metadata(number)
        except CorruptCheckpointError as error:
            return Verification(number, "corrupt", error.reason)
        condition, problem = integrity.check_files(self._step_directory(number))
        if condition == "corrupt":
            return Verification(number, "corrupt", str(problem))
        saved = metadata.get("integrity")
        if saved is None:
            return Verification(number, "unverified", "saved without content digests")
        try:
            state = self._read_tree(number, "state")
            probe = self._read_tree(number, "probe") if (self._step_directory(number) / "probe").is_dir() else {}
            self._check_digests(number, metadata, state, probe)
        except CorruptCheckpointError as error:
            return Verification(number, "corrupt", error.reason)
        if saved.get("params_sha256") != integrity.params_sha256(state):
            return Verification(number, "corrupt", "its params do not match their SHA-256")
        arrays = integrity.leaves_by_path(state) + integrity.leaves_by_path(probe)
        size = sum(np.asarray(leaf).nbytes for _, leaf in arrays)
        return Verification(number, "ok", f"{len(arrays)} arrays, {size:,} bytes", len(arrays), size)

    # ---- pins and head -----------------------------------------------------------------

    @_locked
    def pin(self, number: int) -> None:
        """Keeps `number` through retention until unpinned (persisted in store.json)."""
        self._check_owner("pinning")
        self._require(number)
        if number not in self._file.pinned:
            self._file.pinned.add(number)
            self._file.write(self._store_path)
        self._ledger.append("pin", checkpoint=number)

    @_locked
    def unpin(self, number: int) -> None:
        self._check_owner("unpinning")
        self._require(number)
        if number in self._file.pinned:
            self._file.pinned.discard(number)
            self._file.write(self._store_path)
        self._ledger.append("unpin", checkpoint=number)

    def set_head(self, number: int, *, reason: str) -> None:
        """Makes `number` what the next restore_latest() returns (`continuity rollback`).

        It must be finalized, good and not known to be corrupt. Newer checkpoints stay on
        disk marked abandoned until retention removes them; the next save clears the head.
        """
        self._check_owner("rolling back")
        self.wait()  # outside the lock: the writer thread needs it to finish
        with self._lock:
            self._set_head(number, reason=reason)

    def _set_head(self, number: int, *, reason: str) -> None:
        self._require(number)
        info = self._info(number, self._findings())
        if info.condition == "corrupt":
            raise ValueError(f"checkpoint {number} is corrupt ({info.problem}); roll back to another one")
        if info.status != "good":
            raise ValueError(
                f"checkpoint {number} has status {info.status!r}; only a good checkpoint can be the one a restart "
                "restores"
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
        arrays), so the replay buffer and optimizer state are never loaded; its arrays
        are checked against their digests all the same.
        """
        out = Path(out)
        if out.suffix not in EXPORT_SUFFIXES:
            raise ValueError(f"`out` must end in one of {', '.join(EXPORT_SUFFIXES)}. Got {str(out)!r}.")
        params = self._read_params(number, params_path)
        temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                if out.suffix == ".msgpack":
                    from flax import serialization

                    handle.write(serialization.msgpack_serialize(params))
                else:
                    arrays: dict[str, Any] = dict(integrity.leaves_by_path(params))
                    np.savez(handle, **arrays)
            os.replace(temporary, out)
        except OSError as error:
            with contextlib.suppress(OSError):  # a part written before the disk filled
                temporary.unlink(missing_ok=True)
            raise ExportDestinationError(out, error, temporary) from None
        return out

    @_locked
    def read_params(self, number: int, *, params_path: Sequence = ("params",)) -> dict[str, np.ndarray]:
        """Checkpoint `number`'s params as {path: host array} ("params/head/bias"), checked against its digests.

        Reads only that subtree, as `export_params` does (what `checkpoints diff` compares).
        """
        params = self._read_params(number, params_path)
        prefix = "/".join(str(key) for key in params_path)
        return {f"{prefix}/{path}": np.asarray(leaf) for path, leaf in integrity.leaves_by_path(params)}

    def _read_params(self, number: int, params_path: Sequence):
        """The nested params subtree of `number`'s state as host arrays, its digests checked."""
        self._require(number)
        params_path = tuple(str(key) for key in params_path)
        if not params_path:
            raise ValueError("`params_path` must name at least one key, e.g. ('params',).")
        nested = self._read_tree(number, "state", params_path)
        saved = self._read_metadata(number).get("integrity")
        if isinstance(saved, dict) and isinstance(saved.get("state"), dict):
            prefix = "/".join(params_path) + "/"
            expected = {path: digest for path, digest in saved["state"].items() if path.startswith(prefix)}
            problem = integrity.mismatch("state", expected, nested)
            if problem is not None:
                raise CorruptCheckpointError(number, problem)
        params = nested
        for key in params_path:
            params = params[key]
        return params

    # ---- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the checkpoint store at {self.directory} is closed")

    def _check_owner(self, action: str) -> None:
        if not self.owner:
            raise ReadOnlyStoreError(
                f"the checkpoint store at {self.directory} was opened read-only; {action} needs its owner "
                "(open it with owner=True)"
            )

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

    def _findings(self) -> dict[int, str]:
        """{number: why} for checkpoints the ledger says a restore or `verify` found corrupt (latest word wins)."""
        found: dict[int, str] = {}
        for event in self._ledger.events("skip", "verify"):
            number = event.get("checkpoint")
            if not isinstance(number, int):
                continue
            if event.get("event") == "skip":
                found[number] = str(event.get("error", "skipped by a restore")).split(" is corrupt: ", 1)[-1]
            elif event.get("event") == "verify":
                if event.get("result") == "corrupt":
                    found[number] = str(event.get("detail"))
                else:
                    found.pop(number, None)
        return found

    def _info(self, number: int, findings: Mapping[int, str]) -> CheckpointInfo:
        marks = {
            "pinned": number in self._file.pinned,
            "abandoned": number in self._file.abandoned,
            "head": number == self._file.head,
        }
        try:
            metadata = dict(self._read_metadata(number))
        except CorruptCheckpointError as error:
            metadata = {"status": "corrupt", "checkpoint": number, "error": str(error)}
            return CheckpointInfo(number, metadata, condition="corrupt", problem=error.reason, **marks)
        condition, problem = integrity.check_files(self._step_directory(number))
        if condition != "corrupt" and number in findings:
            condition, problem = "corrupt", findings[number]
        if condition == "intact" and "integrity" not in metadata:
            condition, problem = "unverified", "saved without content digests"
        return CheckpointInfo(number, metadata, condition=condition, problem=problem, **marks)

    def _keep_ownership(self) -> None:
        """Before a save: the lock file must still be the one this store locked. Removed (with the whole
        directory, perhaps), it is taken again, said loudly; taken by another process meanwhile, this
        store saves nothing more (CheckpointSaveError): two writers would undo each other's work."""
        if self._ownership is None or self._ownership.still_held():
            return
        try:
            self._ownership.take_again()
        except StoreLockedError as error:
            raise CheckpointSaveError(
                f"not saving in {self.directory}: its store.lock was removed, and {describe_holder(error.holder)} "
                "has locked it since; stop one of the two"
            ) from None
        except OSError as error:
            raise CheckpointSaveError(f"not saving in {self.directory}: cannot lock it again ({error})") from None
        missing = [n for n in sorted(self._metadata) if not self._step_directory(n).exists()]
        logger.warning(
            "%s/store.lock was removed while this store owned it (checkpoints missing now: %s); locked it again",
            self.directory,
            ", ".join(map(str, missing)) or "none",
        )

    def _holds_a_checkpoint(self, number: int) -> bool:
        """Whether directory `number` has any part a save writes (a damaged checkpoint still has some)."""
        directory = self._step_directory(number)
        return any((directory / part).exists() for part in ("_CHECKPOINT_METADATA", "files.json", "state", "meta"))

    def _require_readable(self, number: int) -> None:
        """StoreAccessError when the process may not read all of checkpoint `number`. Orbax reports an
        unreadable file as a checkpoint it cannot make sense of, which a restore would take for
        corruption and abandon for good: a permission fixed later would not bring it back."""
        try:
            for directory, _, files in os.walk(self._step_directory(number), onerror=_raise):
                for name in [directory, *(os.path.join(directory, f) for f in files)]:
                    if not os.access(name, os.R_OK | os.X_OK if name == directory else os.R_OK):
                        raise PermissionError(errno.EACCES, "Permission denied", name)
        except OSError as error:
            raise StoreAccessError(self.directory, error) from None

    def _state_metadata(self, number: int, item: str = "state"):
        """The saved tree of `item` with Orbax's per-leaf metadata (string keys, lists for tuples)."""
        try:
            metadata = self._manager.item_metadata(number)[item]
        except Exception as error:
            raise CorruptCheckpointError(number, error) from error
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise CorruptCheckpointError(number, f"its {item} item has no readable tree metadata")
        return tree

    def _read_tree(self, number: int, item: str, subtree: Sequence[str] = ()):
        """`item` of checkpoint `number` as host NumPy arrays, without a target; only `subtree` if given.

        An Orbax partial restore: only the leaves under `subtree` are read, and come back
        nested under its keys (as saved, so their paths match the saved digests).
        """
        import jax

        ocp = self._ocp
        tree = self._state_metadata(number, item)
        for depth, key in enumerate(subtree):
            if not isinstance(tree, Mapping) or key not in tree:
                available = sorted(tree) if isinstance(tree, Mapping) else []
                raise ValueError(
                    f"checkpoint {number} has no {item} subtree {'/'.join(subtree[: depth + 1])!r}; "
                    f"keys there: {available}"
                )
            tree = tree[key]

        def nest(leaf_value):
            for key in reversed(subtree):
                leaf_value = {key: leaf_value}
            return leaf_value

        target = nest(jax.tree.map(lambda _: np.empty(0), tree))
        restore_args = nest(jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                restored = checkpointer.restore(
                    self._step_directory(number) / item,
                    args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
                )
        except Exception as error:
            raise CorruptCheckpointError(number, error) from error
        return jax.tree.map(np.asarray, restored)

    def _other_shapes(self, number: int, state_like) -> bool:
        """True when `state_like` has the saved leaves, some of them in other shapes."""
        saved, wanted = _leaf_signatures(self._state_metadata(number)), _leaf_signatures(state_like)
        return set(saved) == set(wanted) and any(saved[path][0] != wanted[path][0] for path in saved)

    def _saved_like(self, number: int, state_like):
        """`state_like`'s tree with host zeros in the saved shapes and dtypes: a target that reads as saved."""
        import jax

        saved = _leaf_signatures(self._state_metadata(number))
        paths = [path for path, _ in integrity.leaves_by_path(state_like)]
        return jax.tree.unflatten(jax.tree.structure(state_like), [np.zeros(*saved[path]) for path in paths])

    @staticmethod
    def _reshaped(number: int, reshape: Callable[[Any], Any], state, target):
        """`reshape(state)`, checked against `target`'s shapes and put where its arrays are."""
        import jax

        state = reshape(state)
        got, wanted = _leaf_signatures(state), _leaf_signatures(target)
        wrong = [path for path in wanted if got.get(path, (None,))[0] != wanted[path][0]]
        if wrong:
            raise ValueError(f"checkpoint {number} reshaped does not match `state_like`: {', '.join(wrong[:5])}")

        def put(host, like):
            host = np.asarray(host, getattr(like, "dtype", None))
            if isinstance(like, jax.Array):
                return jax.make_array_from_callback(host.shape, like.sharding, lambda index: host[index])
            return host

        return jax.tree.map(put, state, target)

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
        """Directories Orbax left uncommitted (a crash or failure mid-save): (number, path)."""
        found = []
        if self.directory.is_dir():
            for entry in self.directory.iterdir():
                match = _UNFINALIZED.match(entry.name)
                if match and entry.is_dir():
                    found.append((int(match.group(1)), entry))
        return sorted(found)

    def _remove(self, doomed: Sequence[tuple[int, Path]], *, reason: str) -> None:
        for number, path in doomed:
            shutil.rmtree(path, ignore_errors=True)
            self._ledger.append("delete", checkpoint=number, reason=reason, path=path.name)

    def _retain(self) -> None:
        """Retention after a checkpoint committed: delete what the rule lets go (never the head or a pin)."""
        numbers = self.numbers()
        doomed = checkpoints_to_delete(
            numbers, keep_last=self.keep_last, last_good=self.last_good(), pinned=self._file.pinned
        )
        foreign = [n for n in doomed if not self._holds_a_checkpoint(n)]
        if foreign:  # a directory an operator put there under a number's name: not ours to delete
            logger.warning(
                "retention leaves %s alone: named like checkpoints, but holding none",
                ", ".join(str(self._step_directory(n)) for n in foreign),
            )
            doomed = [n for n in doomed if n not in foreign]
        for number in doomed:
            status = self._status(number)
            self._manager.delete(number)
            self._metadata.pop(number, None)
            self._ledger.append("delete", checkpoint=number, status=status, reason="retention")
        if self._file.abandoned & set(doomed):
            self._file.abandoned -= set(doomed)
            self._file.write(self._store_path)
