"""How long one of several processes waits for the others at a collective, and which one it waits for.

A dead peer ends the others' wait by itself: its connections close (the collective fails) or
its heartbeats stop (JAX's coordination service aborts the others); see continuity/processes.py.
A peer that is alive but stuck does neither. Its main thread blocked on a hung disk (its ledger,
a checkpoint), a deadlock, a debugger: JAX's heartbeats come from threads of their own and go
on, and gloo waits in a collective without end, so every other process would wait at its next
collective for ever. So would they for a peer that stopped on its own while they train on
(saved positions the broker no longer has with `on_lost_positions = "halt"`; saves failing for
`checkpoints.max_unsaved_seconds`).

So every process says how far it has got, in JAX's coordination service (the key-value store
that every process of the mesh already talks to): how many collectives it has entered, the
last one's name, what it is busy with between them (a checkpoint save), or why it stopped. While
this process waits at a collective, a thread of its own reads the others' words and ends the wait:

- after `CHECK_AFTER_S` (a healthy round waits milliseconds), when a peer says it stopped;
- after `timeout_s` (`[scale] peer_timeout_s`), when a peer has not reached this collective.

Either way it prints one line naming the peer, what it last said and what to do, and exits with
the dead peer's status (`processes.PEER_LOST_EXIT_STATUS`) without saving anything: the last
checkpoint stays the resume point. A peer only slow (a large checkpoint written to a slow disk)
looks the same as a stuck one until it arrives: `peer_timeout_s` must be above the slowest save.

Threading: `waiting`, `busy` and `stopped` are called from the training loop's thread; the watch
thread publishes and reads. Time this process spends on its own work is never counted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

STATUS_DIRECTORY = "continuity/peers/"  # + the process index: its word, in the coordination service
CHECK_AFTER_S = 2.0  # a wait this long starts reading the others' words (a round's agreement takes ms)
CHECK_EVERY_S = 1.0  # how often the watch thread publishes this process's word and, in a long wait, reads


class KeyValueStore(Protocol):
    """What the watch needs of JAX's coordination client (`jax._src.distributed.global_state.client`)."""

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None: ...

    def key_value_dir_get(self, key: str) -> list[tuple[str, str]]: ...


@dataclass(frozen=True)
class Word:
    """What one process last said of itself."""

    entered: int = 0  # collectives it has entered
    at: str = ""  # the last one's name ("" before the first)
    busy: str = ""  # its own work since ("saving checkpoint 12"; "" when none was named)
    stopped: str = ""  # why it stopped on its own ("" while it runs)

    def to_text(self) -> str:
        return json.dumps({"entered": self.entered, "at": self.at, "busy": self.busy, "stopped": self.stopped})

    @classmethod
    def from_text(cls, text: str) -> Word:
        """A word as published; anything else (another program's key) reads as nothing said."""
        try:
            doc = json.loads(text)
            return cls(int(doc["entered"]), str(doc["at"]), str(doc["busy"]), str(doc["stopped"]))
        except (ValueError, TypeError, KeyError):
            return cls()

    def last(self) -> str:
        """The last thing it said, in words."""
        if self.entered == 0:
            return "it has reached no collective yet" + (f" and was {self.busy}" if self.busy else "")
        done = f"the last collective it reached was #{self.entered}, {self.at}"
        return done + (f", then it was {self.busy}" if self.busy else "")


def _default_store() -> KeyValueStore:
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("a PeerWatch needs jax.distributed to be initialized (continuity.processes.join)")
    return client


def _default_on_stuck(message: str) -> None:
    from continuity.processes import PeerLost, exit_on_peer_lost

    exit_on_peer_lost(PeerLost(message))


class PeerWatch:
    """Ends this process's wait for a stuck or stopped peer (module docstring).

    `timeout_s`: how long a wait may last before a peer that has not reached it is called stuck.
    `me`, `count`: this process's index and the number of processes (JAX's, by default).
    `store`: the coordination service's key-value client (JAX's, by default).
    `on_stuck`: what ends the wait, given the line to say (by default: print it, exit 6).
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        me: int | None = None,
        count: int | None = None,
        store: KeyValueStore | None = None,
        on_stuck: Callable[[str], None] = _default_on_stuck,
        clock: Callable[[], float] = time.monotonic,
    ):
        if me is None or count is None:
            import jax

            me, count = jax.process_index(), jax.process_count()
        self.timeout_s = timeout_s
        self.me, self.count = me, count
        self._store = store
        self._on_stuck = on_stuck
        self._clock = clock
        self._key = f"{STATUS_DIRECTORY}{me}"
        self._word = Word()
        self._published: Word | None = None
        self._waiting: tuple[str, float] | None = None  # (what, since when)
        self._ended = False  # on_stuck was called: once is enough
        self._closed = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def store(self) -> KeyValueStore:
        if self._store is None:
            self._store = _default_store()
        return self._store

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Around a collective (or a wait on one's result) that every process makes, in the same order.
        The watch thread publishes the new word within `CHECK_EVERY_S` (not here: no call to the
        coordination service on the training loop's thread)."""
        with self._changed:
            self._word = Word(self._word.entered + 1, what)
            self._waiting = (what, self._clock())
        self._start()
        try:
            yield
        finally:
            with self._changed:
                self._waiting = None

    def busy(self, what: str) -> None:
        """Names this process's own work until its next collective, for a peer that waits on it to say."""
        with self._changed:
            self._word = Word(self._word.entered, self._word.at, what)

    def stopped(self, why: str) -> None:
        """This process stops while the others go on: said at once, so that they stop too, naming why."""
        with self._changed:
            self._word = Word(self._word.entered, self._word.at, self._word.busy, why)
        self._publish()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> str | None:
        """The line that ends the current wait, or None while it may go on: reads the others' words."""
        with self._changed:
            waiting, entered = self._waiting, self._word.entered
        if waiting is None:
            return None
        what, since = waiting
        waited = self._clock() - since
        if waited < CHECK_AFTER_S:
            return None
        words, unread = self._read()
        for peer, word in sorted(words.items()):
            if word.stopped:
                return self._line(f"process {peer} stopped ({word.stopped}) while this one waited at {what}")
        if waited < self.timeout_s:
            return None
        if unread:
            return self._line(
                f"no answer from every process at {what} (collective #{entered}) in {waited:.0f} s, and the "
                f"others' words could not be read ({unread})"
            )
        behind = sorted(peer for peer, word in words.items() if word.entered < entered)
        if not behind:
            return self._line(
                f"no answer from every process at {what} (collective #{entered}) in {waited:.0f} s, "
                "although each has reached it"
            )
        names = "; ".join(f"process {peer} ({words[peer].last()})" for peer in behind)
        verb = "has" if len(behind) == 1 else "have"
        return self._line(
            f"{names} {verb} not reached {what} (collective #{entered}) in {waited:.0f} s: alive, since its "
            "heartbeats still come, but stuck (a hung disk or a blocked thread?); if it was only slow, "
            f"raise [scale] peer_timeout_s (now {self.timeout_s:g} s)"
        )

    def _line(self, what: str) -> str:
        return (
            f"process {self.me} of {self.count}: {what}; stopping without saving: the last checkpoint is the "
            "resume point. Restart every process."
        )

    def _read(self) -> tuple[dict[int, Word], str]:
        """Every other process's word (Word() for one that has said nothing yet), and why they could not
        be read ("" when they were)."""
        words = {peer: Word() for peer in range(self.count) if peer != self.me}
        try:
            entries = self.store.key_value_dir_get(STATUS_DIRECTORY)
        except RuntimeError as error:  # the coordination service's (JaxRuntimeError), e.g. once it is gone
            return words, " ".join(str(error).split())[:200]
        for key, text in entries:
            suffix = key.rsplit("/", 1)[-1]
            if suffix.isdigit() and int(suffix) in words:
                words[int(suffix)] = Word.from_text(text)
        return words, ""

    def _publish(self) -> None:
        with self._changed:
            word = self._word
        if word == self._published:
            return
        try:
            self.store.key_value_set(self._key, word.to_text(), allow_overwrite=True)
            self._published = word
        except RuntimeError as error:
            log.debug("could not publish this process's word: %s", error)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="continuity-peer-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                if self._closed:
                    return
                self._changed.wait(CHECK_EVERY_S)
                if self._closed:
                    return
            self._publish()
            line = None if self._ended else self.check()
            if line is not None:
                self._ended = True
                self._on_stuck(line)
