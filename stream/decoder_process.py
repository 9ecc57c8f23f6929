"""A codec that decodes in a process of its own, off the consumer's interpreter lock.

Why: kafka-python parses every fetched record in Python on the ingest thread (~10 us a
record), and parsing a JSON record takes another 5-8 us; in one process both hold the same
interpreter lock, so they add up and JSON ingest ran at about half the binary rate. Here the
ingest thread only pickles each poll's raw records and queues them for a socket (a sender
thread writes them) and goes back to polling while a child process parses them: the two run
on two cores. It costs CPU (the records cross the socket), so it pays where a core is free:
on 2 cores shared with the broker, 1.1-1.3x the thread's rate for JSON, 1.3-1.5x for the
20-field events (BENCHMARKS.md, "Ingest").

    codec = decoding_codec("json", spec, decoder="process")
    future = codec.submit(records)     # returns at once
    block, letters = future.result()   # what codec.decode(records) returns in-process

Semantics are the in-process codec's, exactly:
- Order: one child serves requests in the order they were sent (over one socket), so a
  decode, a `state(positions)` or a `restore(state)` sees exactly the decodes submitted
  before it, as the in-process codec's lock gives. A codec with state (the `fields` codec's
  standardisation statistics) keeps it in the child; `state` and `restore` are requests.
- Errors: a codec error in the child fails that request's future with the same exception
  (its traceback in the child is attached as a note). The child's death fails every pending
  and later request with `DecoderProcessError`, naming its exit status: the service stops,
  and its positions, committed only after training, lose nothing.
- Hangs: a child that answers nothing for `answer_within_s` while a request waits (120 s:
  a poll of the largest records decodes in about a second) is killed and treated as dead,
  so a stopped or wedged child stops the service with that error instead of stalling it.
- Lifetime: the child runs in a session of its own (a Ctrl-C at the terminal reaches only
  the parent, which shuts down in order), ignores SIGTERM, and exits when its socket
  closes: on `close()`, at the parent's exit, or when the parent is killed (the kernel
  closes the socket).
- Start: a fresh interpreter (`python -m continuity.stream.decoder_process FD`, ~0.2 s),
  not a fork: the parent's threads and JAX stay out of it; it imports the stream package
  only.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Literal, get_args

from continuity.stream.codecs import Codec, FeatureSpec, make_codec
from continuity.stream.deadletters import DeadLetter
from continuity.stream.examples import ExampleBlock
from continuity.stream.records import PartitionRecords

log = logging.getLogger(__name__)

Decoder = Literal["auto", "thread", "process"]  # `stream.decoder` in the config
DECODERS: tuple[str, ...] = get_args(Decoder)

# No answer to a request for this long means the child is wedged or stopped (SIGSTOP, a frozen
# cgroup): a poll's decode takes well under a second even for the largest records.
ANSWER_WITHIN_S = 120.0

# Requests queued for the child's socket, at most: the child reads the next poll's records
# while it decodes one, and a submit beyond these waits, so what waits in memory is a few
# polls, not the ingest queue's worth.
SEND_AHEAD = 2

# Codecs whose per-record parsing is worth a process: JSON text (5-9 us a record against
# the binary codec's ~0.6 us, which the socket's round trip would only slow down).
PARSING_CODECS = frozenset({"json", "fields"})


class DecoderProcessError(RuntimeError):
    """The decoder process is gone: what it was decoding is lost (nothing was committed past it)."""


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def decoding_codec(name: str, spec: FeatureSpec, *, fields=None, decoder: Decoder = "auto") -> Codec:
    """The codec `name` decoding where `decoder` says.

    "thread": in the ingest thread (`make_codec`); "process": in a child process
    (`ProcessCodec`); "auto": a process for the codecs that parse text (json, fields) when
    this process may use two cores or more, else the ingest thread.
    """
    if decoder not in DECODERS:
        raise ValueError(f"`decoder` must be one of {list(DECODERS)}. Got {decoder!r}")
    if decoder == "auto":
        decoder = "process" if name in PARSING_CODECS and usable_cores() >= 2 else "thread"
    if decoder == "process":
        return ProcessCodec(name, spec, fields=fields)
    return make_codec(name, spec, fields=fields)


class ProcessCodec(Codec):
    """The codec `make_codec(name, spec, fields=fields)`, decoding in a child process (module docstring).

    Threading: `submit`, `decode`, `state`, `restore` and `close` may be called from any thread.
    """

    def __init__(self, name: str, spec: FeatureSpec, *, fields=None, answer_within_s: float = ANSWER_WITHIN_S):
        local = make_codec(name, spec, fields=fields)  # checks the arguments here; encodes; never decodes
        super().__init__(local.spec)
        self.name = local.name
        self._local = local
        self._recipe = (name, spec, fields)
        self._answer_within_s = answer_within_s
        self._lock = threading.Lock()  # one request on the socket at a time, queued in the order sent
        self._child: _Child | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id (None before it starts)."""
        return self._child.process.pid if self._child is not None else None

    def start(self) -> None:
        """Starts the child now rather than at the first request, and waits until it can decode
        (a broken install fails here, and the interpreter's start is not in the first decode's time)."""
        self._request("ping", None).result()

    def encode(self, x, y, *, segment=None, key=None) -> bytes:
        return self._local.encode(x, y, segment=segment, key=key)

    def submit(self, records: PartitionRecords) -> Future:
        return self._request("decode", records)

    def decode(self, records: PartitionRecords) -> tuple[ExampleBlock, list[DeadLetter]]:
        return self.submit(records).result()

    def state(self, positions) -> dict | None:
        return self._request("state", positions).result()

    def restore(self, state: dict | None) -> None:
        self._request("restore", state).result()

    def close(self) -> None:
        """Ends the child (it exits once its socket closes); a later request starts a new one."""
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.close()

    def _request(self, kind: str, argument) -> Future:
        with self._lock:
            return self._started().request(kind, argument)

    def _started(self) -> _Child:
        if self._child is None:
            self._child = _Child(self._recipe, self.name, self._answer_within_s)
        return self._child


class _Child:
    """One decoder process: its Popen, our end of its socket, and the threads writing its
    requests and resolving its replies.

    Requests are queued under the owner's lock and written, in that order, by a sender
    thread: a poll's records (megabytes) fill the socket's buffer while the child is still
    decoding the poll before, and the ingest thread polls on instead of waiting for it to
    read them (up to `SEND_AHEAD` requests not yet written; then `request` waits). Replies
    come back in the same order, so the receiving thread resolves the oldest pending future
    with each, and kills a child that answers nothing for `answer_within_s` while a request
    waits (`_kill_if_wedged`).
    """

    def __init__(self, recipe: tuple, codec_name: str, answer_within_s: float):
        self.codec_name = codec_name
        self.answer_within_s = answer_within_s
        ours, theirs = socket.socketpair()
        with theirs:
            # Its own session: a Ctrl-C at the terminal reaches the parent, which shuts down in order.
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        # The child holds the only other end: its exit is our EOF, and ours (even a SIGKILL) is its.
        self.socket = ours  # kept to shut down: that wakes a blocked recv, which closing the fd would not
        self.connection = Connection(os.dup(ours.fileno()))
        self.pending: deque[tuple[Future, float]] = deque()  # and when each was sent (time.monotonic)
        self.gone: DecoderProcessError | None = None
        self.answered_at = time.monotonic()  # the child's last reply (or its start)
        self.wedged = False  # killed for answering nothing while requests waited
        self.ending = threading.Lock()  # `gone` set and `pending` failed at once: no future is left behind
        self.closing = False
        try:
            self.connection.send(recipe)  # small: the socket's buffer takes it at once
        except OSError:  # the child died at once: the receiver's EOF fails every request, naming its exit
            pass
        # Requests pickled, for the sender to write; then None to end it.
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.room = threading.BoundedSemaphore(SEND_AHEAD)  # taken by `request`, given back once written
        self.sender = threading.Thread(target=self._send, name="continuity-decoder-requests", daemon=True)
        self.sender.start()
        self.receiver = threading.Thread(target=self._receive, name="continuity-decoder-replies", daemon=True)
        self.receiver.start()
        log.debug("decoder process %d started for the %r codec", self.process.pid, codec_name)

    def request(self, kind: str, argument) -> Future:
        # Pickled here: what cannot be pickled fails this call, before it is pending (where
        # a request never sent would take the reply meant for the next).
        payload = _pickled((kind, argument))
        future: Future = Future()
        while not (roomy := self.room.acquire(timeout=0.1)) and self.gone is None:
            pass  # the child is behind: wait, unless it is gone (then the receiver set `gone`)
        with self.ending:
            if self.gone is not None:
                if roomy:
                    self.room.release()
                future.set_exception(self.gone)
                return future
            self.pending.append((future, time.monotonic()))
        self.outbox.put(payload)
        return future

    def _send(self) -> None:
        """Writes the queued requests in order until `close` (or a write fails: the child is
        gone, and the receiver fails what is pending)."""
        while (payload := self.outbox.get()) is not None:
            try:
                self.connection.send_bytes(payload)
            except OSError:
                return
            self.room.release()

    def close(self) -> None:
        self.closing = True
        self.outbox.put(None)
        try:
            self.socket.shutdown(socket.SHUT_RDWR)  # the child reads EOF and exits; our threads wake
        except OSError:  # the child is gone already
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.sender.join(timeout=10)
        self.receiver.join(timeout=10)
        self.connection.close()
        self.socket.close()

    def _receive(self) -> None:
        """Resolves the pending futures, in order, from the child's replies; fails them all when it ends."""
        pid = self.process.pid
        while True:
            try:
                if not self.connection.poll(1.0):
                    self._kill_if_wedged()
                    continue
                reply = self.connection.recv()
            except (EOFError, OSError):
                break
            self.answered_at = time.monotonic()
            future, _ = self.pending.popleft()
            if reply[0] == "ok":
                future.set_result(reply[1])
            else:
                error, child_traceback = reply[1], reply[2]
                error.add_note(f"in the decoder process {pid}:\n{child_traceback}")
                future.set_exception(error)
        if self.closing:
            gone = DecoderProcessError(f"the decoder process {pid} was closed")
        else:
            try:
                code: int | None = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            what = (
                f"answered nothing for {self.answer_within_s:g} s and was killed"
                if self.wedged
                else f"died ({_exit_status(code)})"
            )
            gone = DecoderProcessError(
                f"the decoder process {pid} ({self.codec_name!r} codec) {what}; "
                "what it was decoding was not trained or committed: a restart resumes from the last checkpoint"
            )
            log.error("%s", gone)
        with self.ending:
            self.gone = gone
            while self.pending:
                self.pending.popleft()[0].set_exception(gone)

    def _kill_if_wedged(self) -> None:
        """SIGKILL the child when it has answered nothing for `answer_within_s` while a request
        waited (since that request was sent, or since the reply before it): its socket then
        closes, and the loop fails every request as for any death. Called only when no reply
        is waiting to be read, so a parent that was itself stopped never kills a child that
        had answered meanwhile."""
        if self.pending and time.monotonic() - max(self.pending[0][1], self.answered_at) > self.answer_within_s:
            self.wedged = True
            self.process.kill()


def _pickled(message) -> bytes:
    """`message` pickled for `Connection.send_bytes` (`Connection.recv` unpickles it)."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running, its socket closed"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _serve(connection: Connection) -> None:
    """The child: build the codec the first message describes, then serve requests until the socket closes."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a service manager's SIGTERM to the group: the parent stops us
    try:
        name, spec, fields = connection.recv()
    except (EOFError, OSError):
        return
    codec = make_codec(name, spec, fields=fields)
    serve: dict[str, Callable] = {
        "decode": codec.decode,
        "state": codec.state,
        "restore": codec.restore,
        "ping": lambda _: None,  # `ProcessCodec.start`: ready
    }
    while True:
        try:
            kind, argument = connection.recv()
        except (EOFError, OSError):
            return
        reply: tuple
        try:
            reply = ("ok", serve[kind](argument))
        except Exception as error:  # noqa: BLE001 - re-raised in the parent, by the request's future
            reply = ("error", _picklable(error), traceback.format_exc())
        try:
            connection.send(reply)
        except OSError:  # the parent is gone
            return


def _picklable(error: Exception) -> Exception:
    """`error` if it crosses the socket intact, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send its text instead
        return RuntimeError(f"{type(error).__name__}: {error}")


if __name__ == "__main__":  # the child: python -m continuity.stream.decoder_process FD
    _serve(Connection(int(sys.argv[1])))
