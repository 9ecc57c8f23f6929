"""The HTTP face of a running service: health, readiness, Prometheus metrics, status, admin actions.

Endpoints (`ServiceHTTP`):

    GET  /healthz           200 "ok" while the process serves HTTP at all
    GET  /readyz            200 "ready" once the controller says so (restored + stream connected), else 503
    GET  /metrics           Prometheus text exposition of the service's own registry
    GET  /status            the controller's status as JSON
    POST /admin/rollback    {"to": N} or {"last_good": true}, optional "reason"   (bearer token)
    POST /admin/checkpoint  save a checkpoint now                                 (bearer token)
    POST /admin/pin         {"checkpoint": N}: retention never deletes it        (bearer token)
    POST /admin/unpin       {"checkpoint": N}: retention may delete it again     (bearer token)

Admin endpoints need `Authorization: Bearer <token>`: no header is 401, a wrong token
is 403, and with no token configured they are disabled (403). Binding anywhere but
loopback without a token is refused outright, so admin actions are never open to a
network. Errors are JSON `{"error": message}`; the token is never logged.

`rollback_over_http` is the client side that `continuity rollback` uses; it raises
`ServiceUnreachable` when nothing listens, so the CLI can fall back to the directory.

Threading: the server runs on one background thread and handles each request on its
own thread, so the controller's methods are called concurrently with the training
loop and with each other; the controller must be thread-safe.
"""

from __future__ import annotations

import hmac
import http.client
import json
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from continuity.config import is_loopback  # the one definition; re-exported here
from continuity.metrics import ServiceMetrics

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # admin bodies are a few keys; anything bigger is a mistake or abuse
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
    ):
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
        self._server: ThreadingHTTPServer | None = None
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
            server = server_class((self.host.strip("[]"), self.port), _Handler)
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
    daemon_threads = True
    service: ServiceHTTP


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "continuity"
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that stops sending mid-request does not hold a thread forever

    # ---------------------------------------------------------------- routing

    def do_GET(self) -> None:
        routes = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/status": self._status,
        }
        path = self.path.split("?", 1)[0]
        if path in routes:
            routes[path]()
        elif path in _ADMIN:
            self._method_not_allowed("POST")
        else:
            self._not_found(path)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in _ADMIN:
            self._admin(path)
        elif path in ("/healthz", "/readyz", "/metrics", "/status"):
            self._method_not_allowed("GET")
        else:
            self._not_found(path)

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

    def _read_json_body(self) -> dict:
        length = self._content_length()
        if length == 0:
            return {}
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _BadRequest(f"the request body must be a JSON object: {error}") from None
        if not isinstance(body, dict):
            raise _BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise _BadRequest("send the body with a Content-Length, not chunked", HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise _BadRequest("Content-Length must be an integer") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _BadRequest(
                f"the request body must be at most {MAX_BODY_BYTES} bytes, got {length}",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        return length

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if 0 <= length <= MAX_BODY_BYTES:
            self.rfile.read(length)
        else:
            self.close_connection = True

    # ---------------------------------------------------------------- responses

    def _not_found(self, path: str) -> None:
        self._send_json(
            HTTPStatus.NOT_FOUND,
            {
                "error": f"no endpoint {path}; try /healthz, /readyz, /metrics, "
                "/status, POST /admin/rollback, /admin/checkpoint, /admin/pin or /admin/unpin"
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


def _rollback(controller: ServiceController, body: dict) -> dict:
    unknown = sorted(set(body) - {"to", "last_good", "reason"})
    if unknown:
        raise _BadRequest(f'unknown keys {unknown}; a rollback takes "to" or "last_good", and "reason"')
    to, last_good = body.get("to"), body.get("last_good", False)
    if last_good not in (True, False):
        raise _BadRequest(f'"last_good" must be true or false, got {last_good!r}')
    if (to is None) == (not last_good):
        raise _BadRequest('a rollback needs exactly one of {"to": CHECKPOINT} or {"last_good": true}')
    if to is not None and (not isinstance(to, int) or isinstance(to, bool) or to < 1):
        raise _BadRequest(f'"to" must be a checkpoint number (a positive integer), got {to!r}')
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
    number = body.get("checkpoint")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise _BadRequest(f'"checkpoint" must be a checkpoint number (a positive integer), got {number!r}')
    return controller.request_pin(number, pinned)


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
        answer = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
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
