"""A TCP proxy between Kafka clients and the embedded broker: broker outages for tests and `make chaos`.

Tansu keeps its topics in memory only, so a test cannot stop the broker to simulate an
outage; it cuts this proxy instead. Start the broker with `advertised_port=proxy.port`
so metadata sends every client through the proxy.

A cut can be limited to one Kafka `client_id` (read from the first request header of
each connection), so other clients (a producer, a second group member) still get
through while that client is cut off.
"""

from __future__ import annotations

import socket
import struct
import threading


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed before the first request header")
        data += chunk
    return data


def _first_request_header(sock: socket.socket) -> tuple[bytes, str | None]:
    """(bytes read, client_id) of a Kafka request: size, api_key, api_version, correlation_id, client_id."""
    head = _read_exactly(sock, 14)
    length = struct.unpack(">h", head[12:14])[0]
    name = _read_exactly(sock, length) if length > 0 else b""
    return head + name, (name.decode("utf-8", "replace") if length >= 0 else None)


class TcpProxy:
    """A threaded TCP proxy that can be cut (connections closed, new ones refused) and restored.

    `cut` and `restore` may be called from any thread; the piping runs on daemon threads.
    """

    def __init__(self, port: int, target_port: int):
        self.port, self.target_port = port, target_port
        self._lock = threading.Lock()
        self._connections: list[tuple[str | None, socket.socket, socket.socket]] = []
        self._cut_clients: set[str] = set()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._stopped.clear()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener):
        while not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            first, client_id = _first_request_header(client)
            client.settimeout(None)
            with self._lock:
                refused = client_id in self._cut_clients
            if refused:
                raise ConnectionRefusedError(client_id)
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            upstream.sendall(first)
        except OSError:
            client.close()
            return
        with self._lock:
            self._connections.append((client_id, client, upstream))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, client_id: str | None = None) -> None:
        """Close connections and refuse new ones: every client's, or only those of `client_id`."""
        with self._lock:
            if client_id is None:
                closing, self._connections = self._connections, []
            else:
                self._cut_clients.add(client_id)
                closing = [c for c in self._connections if c[0] == client_id]
                self._connections = [c for c in self._connections if c[0] != client_id]
        if client_id is None:
            self._stopped.set()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        for _, *sockets in closing:
            for s in sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def restore(self) -> None:
        """Let every client through again."""
        with self._lock:
            self._cut_clients.clear()
        if self._listener is None:
            self.start()
