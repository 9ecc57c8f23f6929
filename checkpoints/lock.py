"""The lock that makes one process at a time the owner of a checkpoint directory.

Two writers on one store undo each other: a `continuity rollback --dir` made while a
service ran was reverted by the service's next save, and its retention then deleted the
checkpoint rolled back to. So whatever changes a store (the service, or a `pin` /
`rollback` command while none runs) holds an exclusive `fcntl.flock` on `store.lock` in
it. The kernel drops a flock when its holder's last descriptor closes, including when
the process is SIGKILLed, so a crash never leaves a stale lock that blocks the restart
(a pid file would). The file holds who owns the store (pid, host, command, since, and
the service's HTTP address once it is known) for the message a refused process prints;
the lock itself is the flock, never the file's existence or content.

flock is advisory and local: it holds between processes of one host on a local file
system (not across NFS clients). Readers (list, show, verify, export) take no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = "store.lock"


class StoreLockedError(RuntimeError):
    """Another live process owns the checkpoint directory; `holder` says who, as far as it wrote."""

    def __init__(self, directory: Path, holder: dict):
        self.directory = directory
        self.holder = holder
        super().__init__(f"the checkpoint directory {directory} is in use by {describe_holder(holder)}")


def describe_holder(holder: dict) -> str:
    """ "`continuity serve` (pid 12, host h, since 2024-05-01 10:00:00, HTTP http://...)" from a lock file's content."""
    if not holder:
        return "another process (it has not said which yet)"
    details = [f"pid {holder.get('pid', '?')}", f"host {holder.get('host', '?')}"]
    if isinstance(holder.get("since"), (int, float)):
        details.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])))
    if holder.get("url"):
        details.append(f"HTTP {holder['url']}")
    command = holder.get("command")
    return f"{f'`{command}` ' if command else 'a process '}({', '.join(details)})"


class StoreLock:
    """An exclusive flock on `<directory>/store.lock`, held from `acquire` until `release` (or death).

    NOT thread-safe; one per owning store.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._holder: dict = {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StoreLock:
        """Take the lock without waiting; StoreLockedError naming the holder when another process has it."""
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(self.directory, read_holder(self.directory)) from None
            raise
        self._fd = fd
        command = " ".join([Path(sys.argv[0]).name or "python", *sys.argv[1:2]]) if sys.argv else "python"
        self._holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
        self._write()
        return self

    def still_held(self) -> bool:
        """Whether the file at `path` is still the one this holds the flock on. An operator (or a
        clean-up job) that removed it, or the whole directory, left the lock on a file nobody
        else can see: a second writer would take a new one and both would write."""
        if self._fd is None:
            return False
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def take_again(self) -> None:
        """Lock the file now at `path` (made anew if gone), keeping what this holder said of itself;
        StoreLockedError when another process took it meanwhile."""
        described = {k: v for k, v in self._holder.items() if k not in ("pid", "host", "command", "since")}
        lost, self._fd = self._fd, None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.acquire()
        except BaseException:
            self._fd = lost  # still ours, for what it is worth: release() closes it
            raise
        if lost is not None:
            os.close(lost)
        self.describe(**described)

    def describe(self, **fields) -> None:
        """Add to what the lock file says about its holder (e.g. url=the service's HTTP address)."""
        if self._fd is None:
            return
        self._holder.update(fields)
        self._write()

    def _write(self) -> None:
        if self._fd is None:
            return
        data = (json.dumps(self._holder) + "\n").encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the holder's description is missing

    def release(self) -> None:
        """Give the lock up; idempotent. The file stays (removing it would race a process opening it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock


def read_holder(directory: Path) -> dict:
    """What the lock file of `directory` says about its holder ({} when it says nothing readable)."""
    try:
        holder = json.loads((Path(directory) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
