"""The HTTP face of a running service: health, readiness, Prometheus metrics, status, admin actions.

Endpoints (`ServiceHTTP`):

    GET  /healthz           200 "ok" while the process serves HTTP at all
    GET  /readyz            200 "ready" once the controller says so (restored + stream connected), else 503
    GET  /metrics           Prometheus text exposition of the service's own registry
    GET  /status            the controller's status as JSON
    POST /predict           {"instances": [...]}: {"predictions": [...], "checkpoint": N} from the last
                            accepted model (KServe v1 / TF Serving); 400 with the reason, 503 before one
    POST /admin/rollback    {"to": N} or {"last_good": true}, optional "reason"   (bearer token)
    POST /admin/checkpoint  save a checkpoint now                                 (bearer token)
    POST /admin/pin         {"checkpoint": N}: retention never deletes it        (bearer token)
    POST /admin/unpin       {"checkpoint": N}: retention may delete it again     (bearer token)

Admin endpoints need `Authorization: Bearer <token>`: no header is 401, a wrong token
is 403, and with no token configured they are disabled (403). Binding anywhere but
loopback without a token is refused outright, so admin actions are never open to a
network. Errors are JSON `{"error": message}`; the token is never logged. HEAD is
answered as GET, without the body.

One of several processes training one model (`[scale] num_processes`) serves /healthz,
/readyz and /metrics itself; /status, /predict and the admin endpoints act on (or report)
the model as a whole, so only process 0 serves them, and process i > 0 answers them with
409 naming where process 0 serves them (`ServiceHTTP(refer_to=...)`).

No client can hold the service's threads: at most `max_connections` connections are
served at once (one thread each). A connection gets `header_timeout_s` in all to send its
request line and headers (also the most a kept-alive connection may idle) and
`body_timeout_s` in all for its body (408; a /predict body may be up to 16 MiB, others
64 KiB), however slowly the bytes trickle in. When
every slot is taken, a new connection takes the slot of the one that has waited longest
for its headers (a slow or idle client, closed); if none is waiting, it gets 503 at once.
A body that is not a JSON object, or is nested too deep, is 400; so is a Content-Length
that is not one plain number (negative, or two that differ). Requests the stdlib's parser
refuses (an unknown method, a malformed request line, oversized headers) are JSON errors too.

`rollback_over_http` is the client side that `continuity rollback` uses; it raises
`ServiceUnreachable` when nothing listens, so the CLI can fall back to the directory.

Threading: the server accepts on one background thread and handles each connection on
its own thread (at most `max_connections`), so the controller's methods are called
concurrently with the training loop and with each other; the controller must be
thread-safe.
"""

from __future__ import annotations

import hmac
import http.client
import io
import json
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import urlsplit

import orjson
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from continuity.config import is_loopback  # the one definition; re-exported here
from continuity.metrics import ServiceMetrics

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # admin bodies are a few keys; anything bigger is a mistake or abuse
# A prediction request carries up to service.predict_max_rows instances (256 digits: ~300 KiB of JSON).
MAX_PREDICT_BODY_BYTES = 16 * 1024 * 1024
# Scrapes, probes and an operator's requests are a handful at a time; anything beyond is a
# flood, and each connection costs a thread.
MAX_CONNECTIONS = 32
HEADER_TIMEOUT_S = 10.0  # request line + headers, all of it; also the longest idle keep-alive
BODY_TIMEOUT_S = 10.0  # the whole body of an admin request (64 KiB at most)
SEND_TIMEOUT_S = 10.0  # each send of a response to a client that does not read
DEFAULT_REASON = "rollback over HTTP"
JSON_TYPE = "application/json"


class ServiceController(Protocol):
    """What the HTTP endpoints ask of the service. Called from request threads: must be thread-safe."""

    def status(self) -> dict:
        """A JSON-able snapshot of what the service is doing."""

    def ready(self) -> bool:
        """True once the state is restored and the stream is connected."""

    def request_rollback(self, to: int | None, reason: str) -> dict:
        """Roll back to checkpoint `to` (None: the last good one); blocks until done.

        Raises ValueError for a request that cannot be done as asked (-> 400) and
        LookupError for a checkpoint that does not exist (-> 404).
        """

    def request_checkpoint(self) -> dict:
        """Save a checkpoint now; blocks until it is saved. Errors as for `request_rollback`."""

    def request_pin(self, checkpoint: int, pinned: bool) -> dict:
        """Pin (or unpin) a checkpoint in the store the service owns. Errors as for `request_rollback`."""

    def predict(self, body) -> dict:
        """Predictions of the last accepted model for a parsed `{"instances": [...]}` body.

        Raises ValueError for a malformed request (-> 400) and LookupError before any
        model was accepted (-> 503).
        """


class ServiceUnreachable(ConnectionError):
    """Nothing answered at the service's URL (refused, unresolvable host, connect timeout)."""


class AdminRequestError(RuntimeError):
    """The service answered an admin request with an error; `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class AdminTimeout(TimeoutError):
    """The service accepted the request but gave no answer in time; the action may still happen."""


class ServiceHTTP:
    """HTTP endpoints of a running service, on a background thread (stdlib ThreadingHTTPServer).

    `start()` binds and serves; `stop()` shuts the server down and waits for its thread.
    With `port=0` the system picks a free port; `port` holds the actual one once started.
    """

    def __init__(
        self,
        controller: ServiceController,
        metrics: ServiceMetrics,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        admin_token: str | None = None,
        refer_to: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ):
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"`max_connections` must be a positive integer. Got {max_connections!r}.")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"`port` must be an integer from 0 to 65535 (0: a free port). Got {port!r}.")
        admin_token = admin_token or None  # an empty token is no token
        if admin_token is None and not is_loopback(host):
            raise ValueError(
                f"refusing to expose admin endpoints on {host or 'all interfaces'} without an "
                "admin token: set one, or bind to 127.0.0.1"
            )
        self.controller = controller
        self.metrics = metrics
        self.host = host
        self.port = port
        self._token = admin_token
        self.refer_to = refer_to  # None: serves everything; else where /status, /predict and admin are served
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"ServiceHTTP(host={self.host!r}, port={self.port}, admin={'on' if self._token else 'off'})"

    @property
    def url(self) -> str:
        """Where a client on this machine reaches the endpoints (a wildcard bind is reached via loopback)."""
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> ServiceHTTP:
        if self._server is not None:
            raise RuntimeError("the HTTP endpoints are already started")
        server_class = _IPv6Server if ":" in self.host else _Server
        try:
            server = server_class((self.host.strip("[]"), self.port), _Handler, max_connections=self.max_connections)
        except OSError as error:
            raise OSError(error.errno, f"cannot serve HTTP on {self.host}:{self.port}: {error.strerror}") from None
        server.service = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="continuity-http", daemon=True
        )
        self._thread.start()
        log.info("HTTP endpoints at %s (admin %s)", self.url, "enabled" if self._token else "disabled")
        return self

    def stop(self) -> None:
        """Stop serving; idempotent. Requests in flight finish on their own (daemon) threads."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> ServiceHTTP:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def check_token(self, header: str | None) -> tuple[HTTPStatus, str] | None:
        """None when `header` (an Authorization value) carries the admin token, else (status, reason)."""
        if self._token is None:
            return HTTPStatus.FORBIDDEN, (
                "admin endpoints are disabled: the service has no admin token. To enable them, set "
                'admin_token_env = "CONTINUITY_ADMIN_TOKEN" in the [service] section of its config, put the '
                "token in that environment variable, and restart it"
            )
        if not header:
            return HTTPStatus.UNAUTHORIZED, "admin endpoints need an `Authorization: Bearer <token>` header"
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return HTTPStatus.UNAUTHORIZED, "admin endpoints need an `Authorization: Bearer <token>` header"
        if not hmac.compare_digest(presented.strip().encode(), self._token.encode()):
            return HTTPStatus.FORBIDDEN, "wrong admin token"
        return None


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `max_connections` connections (threads) at a time.

    Connections waiting for their request headers are tracked, so a new one can take the
    slot of the longest waiting (slow-loris clients and idle keep-alives) instead of being
    refused while the service itself is idle.
    """

    daemon_threads = True
    # The listen queue holds connections until the one accept thread takes them. socketserver's
    # 5 overflows at a burst of clients (a scrape fleet, a retry storm), and the kernel drops what
    # it cannot hold: those clients hang in SYN retries, and the 503 beyond `max_connections`
    # never engages. The kernel caps this at net.core.somaxconn.
    request_queue_size = 128
    service: ServiceHTTP

    def __init__(self, address, handler, *, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # connection -> since when it waits for headers
        super().__init__(address, handler)

    def waiting(self, connection: socket.socket, waits: bool) -> None:
        """Called by the handler: `connection` now waits for a request's headers (or has them)."""
        with self._lock:
            if waits:
                self._waiting[connection] = time.monotonic()
            else:
                self._waiting.pop(connection, None)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            # The accept thread waits at most a moment here: an evicted handler ends as soon as
            # its read fails, and gives its slot back.
            if not (self._evict_longest_waiting() and self._slots.acquire(timeout=1.0)):
                _refuse(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.waiting(request, False)
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        # socketserver prints a traceback to stderr; a client that hangs up early is routine.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("client %s went away: %s", client_address[0], error)
        else:
            log.exception("HTTP request from %s failed", client_address[0])

    def _evict_longest_waiting(self) -> bool:
        with self._lock:
            if not self._waiting:
                return False
            connection = min(self._waiting, key=self._waiting.__getitem__)
            del self._waiting[connection]
            try:
                connection.shutdown(socket.SHUT_RDWR)  # its handler's read returns at once, and it ends
            except OSError:
                pass  # closed meanwhile: its slot is coming back anyway
        log.info("connection limit reached: closed the connection that waited longest for its headers")
        return True


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


def _refuse(request: socket.socket) -> None:
    """503 and close, from the accept thread: never blocks on the client."""
    body = b'{"error": "too many connections; try again shortly"}\n'
    response = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    try:
        request.setblocking(False)
        request.send(response)
        request.recv(MAX_BODY_BYTES)  # what the client already sent: closing on unread bytes resets the connection
    except OSError:
        pass
    finally:
        request.close()
    log.warning("connection limit reached: refused a connection with 503")


class _Deadline(io.RawIOBase):
    """A connection's reads, failing with TimeoutError once `deadline` (monotonic) has passed.

    A socket timeout bounds each read only, so a client sending a byte at a time would never
    trip it; this bounds the whole request line and headers, or the whole body.
    """

    def __init__(self, connection: socket.socket):
        self._connection = connection
        self.deadline = time.monotonic() + HEADER_TIMEOUT_S

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client took too long to send its request")
        self._connection.settimeout(remaining)
        try:
            return self._connection.recv_into(buffer)
        finally:
            self._connection.settimeout(SEND_TIMEOUT_S)  # for the response's writes


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "continuity"
    protocol_version = "HTTP/1.1"
    timeout = SEND_TIMEOUT_S  # reads have their own deadlines (`_Deadline`)
    # Headers and body go out in two writes; with Nagle's algorithm the body waits for the
    # client's delayed ACK of the headers (~40 ms on Linux), which dominated /predict latency.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        self._reads = _Deadline(self.connection)
        self.rfile = io.BufferedReader(self._reads)

    def handle_one_request(self) -> None:
        self._reads.deadline = time.monotonic() + self.server.service.header_timeout_s
        self.server.waiting(self.connection, True)
        super().handle_one_request()

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        self.server.waiting(self.connection, False)
        return parsed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib parser's refusals (a malformed request line, an unknown method, oversized headers) as JSON.

        Every other error of this API is `{"error": ...}`; the stdlib's would be an HTML page.
        The connection closes after it, as the stdlib's does: what is left of the request is unread.
        """
        status = HTTPStatus(code)
        if status == HTTPStatus.NOT_IMPLEMENTED:
            message = f"{message}; this API answers GET, HEAD and POST"
        elif status == HTTPStatus.REQUEST_URI_TOO_LONG:
            message = "the request line (method, path and version) must be at most 65536 bytes"
        text = message or status.phrase
        if explain:  # the stdlib gives one for the header limits: which was exceeded
            text = f"{text}: {explain}"
        if self.request_version == "HTTP/0.9":
            # The stdlib's default until a request line parses; as such it would send the body
            # without a status line or headers. Clients of this API speak HTTP/1.x.
            self.request_version = "HTTP/1.0"
        self.log_error("code %d, message %s", code, text)
        self._send_json(status, {"error": text}, {"Connection": "close"})

    # ---------------------------------------------------------------- routing

    def do_GET(self) -> None:
        routes = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/status": self._status,
        }
        path = self.path.split("?", 1)[0]
        if path == "/status" and self._referred(path):
            return
        if path in routes:
            routes[path]()
        elif path in _ADMIN or path == "/predict":
            self._method_not_allowed("POST")
        else:
            self._not_found(path)

    def do_HEAD(self) -> None:
        self.do_GET()  # _send leaves out the body

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if (path in _ADMIN or path == "/predict") and self._referred(path):
            return
        if path in _ADMIN:
            self._admin(path)
        elif path == "/predict":
            self._predict()
        elif path in ("/healthz", "/readyz", "/metrics", "/status"):
            self._method_not_allowed("GET")
        else:
            self._not_found(path)

    def _referred(self, path: str) -> bool:
        """True, with 409 sent, when another process serves `path` (this is process i > 0 of several)."""
        refer_to = self.server.service.refer_to
        if refer_to is None:
            return False
        self._discard_body()
        self._send_json(HTTPStatus.CONFLICT, {"error": f"{path} is not served here: {refer_to}"})
        return True

    # ---------------------------------------------------------------- read-only endpoints

    def _healthz(self) -> None:
        self._send_text(HTTPStatus.OK, "ok\n")

    def _readyz(self) -> None:
        try:
            ready = bool(self.server.service.controller.ready())
        except Exception:  # a controller that cannot tell is not ready
            log.exception("readiness check failed")
            ready = False
        if ready:
            self._send_text(HTTPStatus.OK, "ready\n")
        else:
            self._send_text(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")

    def _metrics(self) -> None:
        body = generate_latest(self.server.service.metrics.registry)
        self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)

    def _status(self) -> None:
        try:
            status = self.server.service.controller.status()
        except Exception as error:
            log.exception("status failed")
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"status failed: {error}"})
            return
        self._send_json(HTTPStatus.OK, status)

    def _predict(self) -> None:
        try:
            body = self._read_json_body(limit=MAX_PREDICT_BODY_BYTES, shape='{"instances": [...]}')
            result = self.server.service.controller.predict(body)
        except _BadRequest as error:
            self._send_json(error.status, {"error": str(error)})
            return
        except ValueError as error:  # the request, not the service: one line saying what is wrong
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        except LookupError as error:
            self._send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(error.args[0] if error.args else error)})
            return
        except Exception as error:
            log.exception("/predict failed")
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"/predict failed: {error}"})
            return
        self._send(HTTPStatus.OK, orjson.dumps(result) + b"\n", JSON_TYPE)

    # ---------------------------------------------------------------- admin endpoints

    def _admin(self, path: str) -> None:
        refused = self.server.service.check_token(self.headers.get("Authorization"))
        if refused is not None:
            status, message = refused
            self._discard_body()
            extra = {"WWW-Authenticate": 'Bearer realm="continuity"'} if status == HTTPStatus.UNAUTHORIZED else {}
            log.warning("refused %s from %s: %s", path, self.client_address[0], message)
            self._send_json(status, {"error": message}, extra)
            return
        try:
            body = self._read_json_body()
            action = _ADMIN[path]
            result = action(self.server.service.controller, body)
        except _BadRequest as error:
            self._send_json(error.status, {"error": str(error)})
            return
        except ValueError as error:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        except LookupError as error:
            message = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
            self._send_json(HTTPStatus.NOT_FOUND, {"error": message})
            return
        except Exception as error:
            log.exception("%s failed", path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{path} failed: {error}"})
            return
        log.info("%s from %s: %s", path, self.client_address[0], result)
        self._send_json(HTTPStatus.OK, result)

    def _read_json_body(self, *, limit: int = MAX_BODY_BYTES, shape: str = "") -> dict:
        length = self._content_length(limit)
        if length == 0:
            return {}
        raw = self._read_body(length)
        what = f"a JSON object {shape}" if shape else "a JSON object"
        try:
            body = orjson.loads(raw)  # bounded nesting, unlike json: a deep body is a 400, not a RecursionError
        except orjson.JSONDecodeError as error:
            try:
                raw.decode()  # orjson calls bad UTF-8 "surrogates not allowed", which misleads
            except UnicodeDecodeError as bad:
                raise _BadRequest(
                    f"the request body is not valid UTF-8 (byte {bad.start} is 0x{raw[bad.start]:02x}); "
                    f"it must be {what} in UTF-8"
                ) from None
            raise _BadRequest(f"the request body must be {what}: {error}") from None
        if not isinstance(body, dict):
            raise _BadRequest(f"the request body must be {what}, got {type(body).__name__}")
        return body

    def _content_length(self, limit: int = MAX_BODY_BYTES) -> int:
        """The body's length: 0 without a Content-Length, else its one plain decimal value.

        Where the body ends must be beyond doubt: a proxy in front that read another length
        than ours (the other of two headers, or `1_0`, which `int` reads as 10) would pass
        bytes we take for a next request (request smuggling). So anything else is 400, and
        the connection closes after the answer, unread.
        """
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _BadRequest("send the body with a Content-Length, not chunked", HTTPStatus.LENGTH_REQUIRED)
        values = [value.strip() for value in self.headers.get_all("Content-Length", [])]
        if len(set(values)) > 1:
            self.close_connection = True
            raise _BadRequest(f"conflicting Content-Length headers {values}; send one")
        value = values[0] if values else "0"
        if not (value.isascii() and value.isdigit()):
            self.close_connection = True
            raise _BadRequest(f"Content-Length must be the body's size in bytes (digits only), got {value!r}")
        digits = value.lstrip("0") or "0"
        if len(digits) > len(str(limit)) or int(digits) > limit:  # int() refuses 4300 digits and more
            self.close_connection = True
            raise _BadRequest(
                f"the request body must be at most {limit} bytes, got {digits if len(digits) < 30 else 'more'}",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        return int(digits)

    def _discard_body(self) -> None:
        try:
            self._read_body(self._content_length())
        except _BadRequest:
            pass  # the answer to come is about the request, not its body; the connection closes after it

    def _read_body(self, length: int) -> bytes:
        self._reads.deadline = time.monotonic() + self.server.service.body_timeout_s
        raw = bytearray()
        try:
            while len(raw) < length:
                chunk = self.rfile.read1(length - len(raw))  # piecewise: a timeout keeps what came
                if not chunk:
                    break
                raw += chunk
        except TimeoutError:
            pass
        if len(raw) < length:
            self.close_connection = True
            raise _BadRequest(
                f"the request body ended or stalled after {len(raw)} of {length} bytes", HTTPStatus.REQUEST_TIMEOUT
            )
        return bytes(raw)

    # ---------------------------------------------------------------- responses

    def _not_found(self, path: str) -> None:
        self._send_json(
            HTTPStatus.NOT_FOUND,
            {
                "error": f"no endpoint {path}; try /healthz, /readyz, /metrics, "
                "/status, POST /predict, /admin/rollback, /admin/checkpoint, /admin/pin or /admin/unpin"
            },
        )

    def _method_not_allowed(self, allowed: str) -> None:
        self._discard_body()
        self._send_json(
            HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.path} accepts {allowed} only"}, {"Allow": allowed}
        )

    def _send_json(self, status: HTTPStatus, payload, headers: dict | None = None) -> None:
        body = (json.dumps(payload, default=str) + "\n").encode()
        self._send(status, body, JSON_TYPE, headers)

    def _send_text(self, status: HTTPStatus, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # Request lines go to `logging` (debug: scrapes and probes are frequent), not stderr.
    # The request line holds no headers, so the token never reaches the log.
    def log_request(self, code="-", size="-") -> None:
        log.debug('%s "%s" %s', self.client_address[0], self.requestline, code)

    def log_error(self, format, *args) -> None:
        log.info("%s: " + format, self.client_address[0], *args)

    def log_message(self, format, *args) -> None:
        log.debug("%s: " + format, self.client_address[0], *args)


class _BadRequest(Exception):
    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def _checkpoint_number(body: dict, key: str) -> int:
    """`body[key]` as a checkpoint number, or _BadRequest saying what it must be."""
    number = body.get(key)
    if isinstance(number, float) and abs(number) >= 2**64:
        # orjson reads an integer beyond 64 bits as a float: "got 1e+20" would puzzle whoever
        # sent 100000000000000000000.
        raise _BadRequest(
            f'"{key}" must be a checkpoint number (a positive integer), got one out of range (beyond 64 bits)'
        )
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise _BadRequest(f'"{key}" must be a checkpoint number (a positive integer), got {number!r}')
    return number


def _rollback(controller: ServiceController, body: dict) -> dict:
    unknown = sorted(set(body) - {"to", "last_good", "reason"})
    if unknown:
        raise _BadRequest(f'unknown keys {unknown}; a rollback takes "to" or "last_good", and "reason"')
    to, last_good = body.get("to"), body.get("last_good", False)
    if last_good not in (True, False):
        raise _BadRequest(f'"last_good" must be true or false, got {last_good!r}')
    if (to is None) == (not last_good):
        raise _BadRequest('a rollback needs exactly one of {"to": CHECKPOINT} or {"last_good": true}')
    if to is not None:
        to = _checkpoint_number(body, "to")
    reason = body.get("reason", DEFAULT_REASON)
    if not isinstance(reason, str) or not reason.strip():
        raise _BadRequest(f'"reason" must be a non-empty string, got {reason!r}')
    return controller.request_rollback(to, reason)


def _checkpoint(controller: ServiceController, body: dict) -> dict:
    if body:
        raise _BadRequest(f"a checkpoint request takes no parameters, got {sorted(body)}")
    return controller.request_checkpoint()


def _pin(controller: ServiceController, body: dict, *, pinned: bool = True) -> dict:
    unknown = sorted(set(body) - {"checkpoint"})
    if unknown:
        raise _BadRequest(f'unknown keys {unknown}; a pin takes {{"checkpoint": N}}')
    return controller.request_pin(_checkpoint_number(body, "checkpoint"), pinned)


def _unpin(controller: ServiceController, body: dict) -> dict:
    return _pin(controller, body, pinned=False)


_ADMIN = {
    "/admin/rollback": _rollback,
    "/admin/checkpoint": _checkpoint,
    "/admin/pin": _pin,
    "/admin/unpin": _unpin,
}


# -------------------------------------------------------------------- client


def rollback_over_http(
    url: str, *, to: int | None, last_good: bool, token: str | None, reason: str, timeout_s: float = 10
) -> dict:
    """Ask the service at `url` to roll back; returns its answer.

    Raises ServiceUnreachable when nothing answers at `url` (nothing was asked, so
    falling back to the checkpoint directory is safe), AdminRequestError when the
    service refuses (`.status` 401/403 for the token, 400/404 for the target), and
    AdminTimeout when it took the request but did not answer within `timeout_s`.
    """
    if (to is None) == (not last_good):
        raise ValueError("a rollback needs exactly one of `to` or `last_good`")
    body: dict[str, object] = {"to": to} if to is not None else {"last_good": True}
    body["reason"] = reason
    return admin_request(url, "/admin/rollback", body, token=token, timeout_s=timeout_s)


def admin_request(url: str, path: str, body: dict, *, token: str | None, timeout_s: float = 10) -> dict:
    """POST `body` as JSON to `url` + `path` with the bearer token; the JSON answer. Errors as `rollback_over_http`."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the service URL must look like http://HOST:PORT, got {url!r}")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout_s)
    where = f"{parts.scheme}://{parts.netloc}"
    try:
        try:
            connection.connect()
        except OSError as error:  # refused, unresolvable, unroutable, connect timeout: nothing was asked
            raise ServiceUnreachable(f"no service is running at {where} ({error})") from None
        headers = {"Content-Type": JSON_TYPE, "Accept": JSON_TYPE}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            connection.request("POST", parts.path.rstrip("/") + path, json.dumps(body).encode(), headers)
            response = connection.getresponse()
            raw = response.read()
        except TimeoutError:
            raise AdminTimeout(
                f"the service at {where} took the request but did not answer within {timeout_s:g} s; "
                "the action may still complete"
            ) from None
        except OSError as error:
            raise AdminRequestError(
                0,
                f"the connection to {where} broke during the request ({error}); "
                "the action may or may not have happened",
            ) from None
    finally:
        connection.close()
    try:
        answer = orjson.loads(raw)  # whatever answered: a deep or garbled body is no answer, not a crash
    except orjson.JSONDecodeError:
        answer = None
    if response.status != HTTPStatus.OK:
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            message = answer["error"]
        else:
            message = raw[:200].decode(errors="replace").strip() or response.reason
        raise AdminRequestError(response.status, message)
    if not isinstance(answer, dict):
        raise AdminRequestError(
            response.status, f"{where} answered with something that is not a JSON object; is it a continuity service?"
        )
    return answer
