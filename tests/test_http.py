"""The service's HTTP endpoints and metrics on a real loopback server, and `continuity rollback --url`."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import _progress  # one snapshot factory for the metric and HTTP tests

from continuity.checkpoints import CheckpointStore
from continuity.cli import main
from continuity.http import (
    AdminRequestError,
    ServiceHTTP,
    ServiceUnreachable,
    is_loopback,
    rollback_over_http,
)
from continuity.metrics import ServiceMetrics

TOKEN = "s3cret-token"


class FakeController:
    """Records admin calls; checkpoint 404s for numbers above `newest`, ValueError for a regressed one."""

    def __init__(self):
        self.is_ready = False
        self.calls = []
        self.newest = 5
        self.lock = threading.Lock()

    def status(self):
        return {"checkpoint": self.newest, "positions": {"digits/0": 1200}, "ready": self.is_ready}

    def ready(self):
        return self.is_ready

    def request_rollback(self, to, reason):
        with self.lock:
            self.calls.append(("rollback", to, reason))
        if to == 4:
            raise ValueError("checkpoint 4 is regressed, not good")
        if to is not None and to > self.newest:
            raise LookupError(f"no checkpoint {to}")
        if to == 3:
            raise RuntimeError("device on fire")
        return {"checkpoint": to or self.newest, "reason": reason}

    def request_checkpoint(self):
        with self.lock:
            self.calls.append(("checkpoint",))
        self.newest += 1
        return {"checkpoint": self.newest}

    def request_pin(self, checkpoint, pinned):
        with self.lock:
            self.calls.append(("pin" if pinned else "unpin", checkpoint))
        if checkpoint > self.newest:
            raise LookupError(f"no checkpoint {checkpoint}")
        return {"checkpoint": checkpoint, "pinned": pinned}


@pytest.fixture
def controller():
    return FakeController()


@pytest.fixture
def service(controller):
    metrics = ServiceMetrics()
    with ServiceHTTP(controller, metrics, port=0, admin_token=TOKEN) as http:
        yield http


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _post(url: str, body=None, token: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- read-only endpoints
# (what /metrics holds is tests/test_metrics.py's)


def test_health_ready_status_and_unknown_paths(service, controller):
    status, _, body = _get(service.url + "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert _get(service.url + "/readyz")[0] == 503
    controller.is_ready = True
    assert _get(service.url + "/readyz")[:3:2] == (200, b"ready\n")

    status, headers, body = _get(service.url + "/status")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"checkpoint": 5, "positions": {"digits/0": 1200}, "ready": True}

    status, headers, body = _get(service.url + "/nope")
    assert status == 404 and "no endpoint /nope" in json.loads(body)["error"]
    status, headers, body = _get(service.url + "/admin/rollback")  # GET on an admin endpoint
    assert status == 405 and headers["Allow"] == "POST"
    assert controller.calls == []


def test_metrics_endpoint_is_prometheus_text(service):
    service.metrics.observe(_progress(), {"digits/0": 17})
    status, headers, body = _get(service.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    # The parser drops counters' `_total` suffix from family names; samples keep it.
    assert {
        "continuity_examples_trained",
        "continuity_dead_letters",
        "continuity_rollbacks",
        "continuity_quarantined_records",
        "continuity_probe_accuracy",
        "continuity_ewc_lambda",
        "continuity_consumer_lag",
        "continuity_checkpoint",
        "continuity_examples_per_second",
        "continuity_step_seconds",
    } <= set(families)
    assert families["continuity_examples_trained"].type == "counter"
    assert families["continuity_step_seconds"].type == "histogram"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("continuity_examples_trained_total", ())] == 640
    assert samples[("continuity_probe_accuracy", (("segment", "s1"),))] == 0.87
    assert samples[("continuity_consumer_lag", (("partition", "digits/0"),))] == 17
    assert samples[("continuity_ewc_lambda", ())] == 12.5
    assert samples[("continuity_step_seconds_bucket", (("le", "0.0005"),))] == 1
    assert samples[("continuity_step_seconds_bucket", (("le", "+Inf"),))] == 3


# ---------------------------------------------------------------------------- admin endpoints


def test_admin_rollback_with_the_right_token(service, controller):
    status, answer = _post(service.url + "/admin/rollback", {"to": 2, "reason": "bad labels"}, TOKEN)
    assert (status, answer) == (200, {"checkpoint": 2, "reason": "bad labels"})
    status, answer = _post(service.url + "/admin/rollback", {"last_good": True}, TOKEN)
    assert status == 200 and answer["checkpoint"] == 5
    status, answer = _post(service.url + "/admin/checkpoint", None, TOKEN)
    assert (status, answer) == (200, {"checkpoint": 6})
    assert controller.calls == [
        ("rollback", 2, "bad labels"),
        ("rollback", None, "rollback over HTTP"),
        ("checkpoint",),
    ]


def test_admin_without_or_with_a_wrong_token_is_refused(service, controller):
    status, answer = _post(service.url + "/admin/rollback", {"to": 2})
    assert status == 401 and "Bearer" in answer["error"]
    status, answer = _post(service.url + "/admin/rollback", {"to": 2}, "not-the-token")
    assert (status, answer) == (403, {"error": "wrong admin token"})
    status, answer = _post(service.url + "/admin/checkpoint", None, TOKEN + "x")
    assert status == 403
    assert controller.calls == []


def test_admin_disabled_without_a_configured_token(controller):
    with ServiceHTTP(controller, ServiceMetrics(), port=0) as http:
        status, answer = _post(http.url + "/admin/rollback", {"to": 2}, "anything")
        assert status == 403 and "disabled" in answer["error"]
        assert 'admin_token_env = "CONTINUITY_ADMIN_TOKEN" in the [service] section' in answer["error"]
        assert _get(http.url + "/healthz")[0] == 200
    assert controller.calls == []


def test_process_1_of_several_serves_health_and_labelled_metrics_but_refers_status_predict_and_admin_to_process_0(
    controller,
):
    refer_to = "process 0 of 2 serves it, on port 8080 of its host"
    metrics = ServiceMetrics(labels={"process": "1"})
    metrics.observe(_progress(), {"digits/1": 3})
    with ServiceHTTP(controller, metrics, port=0, admin_token=TOKEN, refer_to=refer_to) as http:
        assert _get(http.url + "/healthz")[::2] == (200, b"ok\n")
        assert _get(http.url + "/readyz")[0] == 503  # its own readiness
        status, _, body = _get(http.url + "/metrics")
        samples = [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]
        assert status == 200 and samples and all(s.labels.get("process") == "1" for s in samples)
        status, _, body = _get(http.url + "/status")
        assert status == 409 and json.loads(body)["error"] == f"/status is not served here: {refer_to}"
        for path in ("/admin/rollback", "/admin/checkpoint", "/predict"):
            status, answer = _post(http.url + path, {"to": 2}, TOKEN)
            assert status == 409 and answer["error"] == f"{path} is not served here: {refer_to}"
    assert controller.calls == []


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"to": 4}, 400, "regressed"),  # controller ValueError
        ({"to": 99}, 404, "no checkpoint 99"),  # controller LookupError
        ({"to": 3}, 500, "device on fire"),  # anything else
        ({}, 400, "exactly one"),
        ({"to": 2, "last_good": True}, 400, "exactly one"),
        ({"to": "2"}, 400, "positive integer"),
        ({"to": 2, "force": True}, 400, "unknown keys"),
        ({"last_good": True, "reason": ""}, 400, "reason"),
    ],
)
def test_admin_rollback_errors_are_json(service, body, status, words):
    got, answer = _post(service.url + "/admin/rollback", body, TOKEN)
    assert got == status and words in answer["error"]


def test_admin_rejects_bad_bodies(service, controller):
    assert _post(service.url + "/admin/rollback", token=TOKEN, raw=b"{not json")[0] == 400
    assert _post(service.url + "/admin/rollback", token=TOKEN, raw=b"[1]")[0] == 400
    assert _post(service.url + "/admin/rollback", token=TOKEN, raw=b" " * 70_000)[0] == 413
    assert _post(service.url + "/admin/checkpoint", {"now": True}, TOKEN)[0] == 400
    assert controller.calls == []


def test_the_token_is_never_logged(service, caplog):
    caplog.set_level("DEBUG", logger="continuity.http")
    _post(service.url + "/admin/rollback", {"to": 2}, TOKEN)
    _post(service.url + "/admin/rollback", {"to": 2}, "wrong-" + TOKEN)
    _get(service.url + "/healthz")
    assert caplog.records and TOKEN not in caplog.text and TOKEN not in repr(service)


def test_admin_pin_and_unpin_go_to_the_controller(service, controller):
    assert _post(service.url + "/admin/pin", {"checkpoint": 3}, TOKEN) == (200, {"checkpoint": 3, "pinned": True})
    assert _post(service.url + "/admin/unpin", {"checkpoint": 3}, TOKEN) == (200, {"checkpoint": 3, "pinned": False})
    status, answer = _post(service.url + "/admin/pin", {"checkpoint": 9}, TOKEN)
    assert status == 404 and "no checkpoint 9" in answer["error"]
    for body in ({}, {"checkpoint": "3"}, {"checkpoint": 0}, {"checkpoint": 3, "keep": True}):
        assert _post(service.url + "/admin/pin", body, TOKEN)[0] == 400
    assert _post(service.url + "/admin/unpin", {"checkpoint": 3})[0] == 401
    assert controller.calls == [("pin", 3), ("unpin", 3), ("pin", 9)]


# ---------------------------------------------------------------------------- hostile clients


def _until(condition, timeout_s: float = 10.0) -> bool:
    """Whether `condition()` turns true within `timeout_s` (a liveness bound, not a timing claim)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _closed_by_peer(connection: socket.socket) -> bool:
    try:
        return connection.recv(4096) == b""
    except ConnectionResetError:
        return True


def _exchange(port: int, request: bytes) -> bytes:
    """Send raw `request` bytes and read every byte answered until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except ConnectionResetError:  # closed with request bytes unread: what came before still counts
            pass
    return answer


def _responses(answer: bytes) -> list[tuple[int, dict, bytes]]:
    """The (status, headers, body) of each HTTP/1.1 response in `answer`, in order."""
    responses = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        length = int(headers.get("content-length", len(rest)))
        responses.append((int(status_line.split()[1]), headers, rest[:length]))
        answer = rest[length:]
    return responses


def test_slow_header_clients_beyond_the_cap_neither_stop_a_normal_client_nor_pile_up_threads(controller, capfd):
    with ServiceHTTP(controller, ServiceMetrics(), port=0, max_connections=4) as http:
        threads_before = threading.active_count()
        slow = []
        try:
            for _ in range(20):  # each sends half a request and never the rest
                connection = socket.create_connection(("127.0.0.1", http.port), timeout=10)
                connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
                slow.append(connection)
            status, _, body = _get(http.url + "/healthz")
            assert (status, body) == (200, b"ok\n")
            assert _until(lambda: threading.active_count() - threads_before <= 4)
            # The ones that waited longest gave their slots to newer connections: closed, not answered.
            assert _closed_by_peer(slow[0])
        finally:
            for connection in slow:
                connection.close()
        # Hung-up clients end their handlers quietly: no traceback per connection on stderr.
        assert _until(lambda: threading.active_count() <= threads_before)
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_that_trickles_its_headers_is_cut_off_at_the_header_deadline(controller):
    with ServiceHTTP(controller, ServiceMetrics(), port=0, header_timeout_s=0.5) as http:
        with socket.create_connection(("127.0.0.1", http.port), timeout=10) as connection:
            connection.sendall(b"GET /healthz HTTP/1.1\r\n")
            started = time.monotonic()
            closed = False
            while not closed and time.monotonic() - started < 20:  # a byte per 0.1 s: no read ever times out
                try:
                    connection.sendall(b"X")
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                time.sleep(0.1)
                connection.setblocking(False)
                try:
                    closed = connection.recv(4096) == b""
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed = True
                connection.setblocking(True)
            assert closed
        assert _get(http.url + "/healthz")[0] == 200


def test_a_body_that_stalls_is_answered_408_at_the_body_deadline(controller):
    with ServiceHTTP(controller, ServiceMetrics(), port=0, admin_token=TOKEN, body_timeout_s=0.5) as http:
        with socket.create_connection(("127.0.0.1", http.port), timeout=10) as connection:
            connection.sendall(
                b"POST /admin/rollback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"to": 2'
            )
            answer = connection.makefile("rb").read()  # until the server closes
    assert answer.startswith(b"HTTP/1.1 408") and b"stalled after 8 of 100 bytes" in answer
    assert controller.calls == []


def test_a_connection_beyond_the_cap_gets_503_when_every_slot_is_busy():
    release = threading.Event()

    class Busy(FakeController):
        def request_checkpoint(self):
            answer = super().request_checkpoint()
            release.wait(30)
            return answer

    controller = Busy()
    with ServiceHTTP(controller, ServiceMetrics(), port=0, admin_token=TOKEN, max_connections=2) as http:
        busy = [threading.Thread(target=_post, args=(http.url + "/admin/checkpoint", None, TOKEN)) for _ in range(2)]
        for thread in busy:
            thread.start()
        assert _until(lambda: len(controller.calls) == 2)  # both slots are inside a request, none waits for headers
        status, headers, body = _get(http.url + "/healthz")
        assert status == 503 and headers["Retry-After"] == "1" and b"too many connections" in body
        release.set()
        for thread in busy:
            thread.join()
        assert _get(http.url + "/healthz")[0] == 200


def test_a_burst_of_100_connections_at_once_is_answered_every_one(service):
    # The accept thread takes connections one at a time; the kernel's listen queue holds the
    # rest meanwhile. One it cannot hold is dropped silently: that client waits out SYN
    # retries (1 s, 3 s, ...) or hangs, and the 503 beyond `max_connections` never engages.
    clients = 100
    start = threading.Barrier(clients)
    answers = []

    def client() -> None:
        start.wait()
        try:
            # 3 s: a liveness bound; an answered burst takes a fraction of a second.
            with socket.create_connection(("127.0.0.1", service.port), timeout=3) as connection:
                connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: burst\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := connection.recv(4096):
                    answer += chunk
            answers.append(answer.split(b"\r\n", 1)[0])
        except OSError as error:  # reset, refused or timed out
            answers.append(repr(error).encode())

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tally = {answer: answers.count(answer) for answer in answers}
    assert len(answers) == clients and set(tally) <= {b"HTTP/1.1 200 OK", b"HTTP/1.1 503 Service Unavailable"}, tally


@pytest.mark.parametrize(
    "request_bytes, status, words",
    [
        (b"PUT /admin/rollback HTTP/1.1\r\nHost: x\r\n\r\n", 501, "PUT"),
        (b"DELETE /status HTTP/1.1\r\nHost: x\r\n\r\n", 501, "GET, HEAD and POST"),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 501, "OPTIONS"),
        (b"garbage\r\n\r\n", 400, "garbage"),
        (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 505, "9.9"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "65536 bytes"),
        (b"GET /healthz HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", 431, "more than 100 headers"),
        (b"GET /healthz HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431, "line too long"),
    ],
    ids=["PUT", "DELETE", "OPTIONS", "garbage", "HTTP/9.9", "long path", "many headers", "long header"],
)
def test_requests_the_http_parser_refuses_get_json_errors_with_their_status(service, request_bytes, status, words):
    [(got, headers, body)] = _responses(_exchange(service.port, request_bytes))
    assert (got, headers["content-type"], headers["connection"]) == (status, "application/json", "close")
    assert words.lower() in json.loads(body)["error"].lower()


@pytest.mark.parametrize(
    "lengths, words",
    [
        (b"Content-Length: -5\r\n", "Content-Length"),
        (b"Content-Length: abc\r\n", "Content-Length"),
        (b"Content-Length: 1_0\r\n", "Content-Length"),  # int() reads 10; a proxy in front would not
        (b"Content-Length: 2\r\nContent-Length: 13\r\n", "conflicting Content-Length"),
    ],
    ids=["negative", "not a number", "underscore", "conflicting"],
)
def test_a_content_length_that_is_not_one_plain_number_is_400_and_closes_the_connection(
    service, controller, lengths, words
):
    request = (
        b"POST /admin/rollback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n%s\r\n"
        b'{"to": 2}\r\n\r\n'
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ) % (TOKEN.encode(), lengths)
    responses = _responses(_exchange(service.port, request))
    assert [status for status, _, _ in responses] == [400]  # nothing after it is read as a request
    assert words in json.loads(responses[0][2])["error"]
    assert controller.calls == []


def test_conflicting_content_lengths_on_a_refused_request_close_the_connection_before_what_follows(service, controller):
    smuggled = (
        b"POST /admin/checkpoint HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    request = (
        b"POST /admin/checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Content-Length: " + str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled
    )
    responses = _responses(_exchange(service.port, request))
    assert [status for status, _, _ in responses] == [401]
    assert controller.calls == []  # the bytes one header calls a body never ran as a request


def test_a_body_that_is_not_utf8_or_holds_an_integer_beyond_64_bits_is_400_saying_so(service, controller):
    status, answer = _post(service.url + "/admin/rollback", token=TOKEN, raw=b"\xff\xfe")
    assert status == 400 and "not valid UTF-8" in answer["error"] and "surrogates" not in answer["error"]
    for path, key in (("/admin/rollback", "to"), ("/admin/pin", "checkpoint")):
        raw = b'{"%s": 99999999999999999999}' % key.encode()
        status, answer = _post(service.url + path, token=TOKEN, raw=raw)
        assert status == 400 and "out of range" in answer["error"] and "e+20" not in answer["error"], answer
    assert controller.calls == []


def test_a_deeply_nested_admin_body_is_400_not_500(service, controller):
    nested = b'{"to": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"  # within the body limit
    status, answer = _post(service.url + "/admin/rollback", token=TOKEN, raw=nested)
    assert status == 400 and "JSON object" in answer["error"]
    for raw in (b"\xff\xfe", b'{"to": 1e400}', b'{"reason": "\\udfff", "last_good": true}'):
        assert _post(service.url + "/admin/rollback", token=TOKEN, raw=raw)[0] == 400, raw
    assert controller.calls == []


def test_head_is_answered_like_get_without_a_body(service):
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=5)
    try:
        for path in ("/healthz", "/metrics", "/status"):
            connection.request("HEAD", path)
            response = connection.getresponse()
            assert response.status == 200 and int(response.headers["Content-Length"]) > 0
            assert response.read() == b""
        connection.request("GET", "/healthz")  # the same connection: no stray body was sent
        assert connection.getresponse().read() == b"ok\n"
    finally:
        connection.close()


# ---------------------------------------------------------------------------- binding


def test_non_loopback_bind_needs_a_token(controller):
    for host in ("0.0.0.0", "", "::", "10.1.2.3", "example.org"):
        with pytest.raises(ValueError, match="refusing to expose admin endpoints"):
            ServiceHTTP(controller, ServiceMetrics(), host=host, port=0)
    ServiceHTTP(controller, ServiceMetrics(), host="0.0.0.0", port=0, admin_token=TOKEN)  # allowed
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    with pytest.raises(ValueError, match="port"):
        ServiceHTTP(controller, ServiceMetrics(), port=70000)


def test_wildcard_bind_with_token_serves_on_loopback(controller):
    with ServiceHTTP(controller, ServiceMetrics(), host="0.0.0.0", port=0, admin_token=TOKEN) as http:
        assert http.port != 0 and http.url == f"http://127.0.0.1:{http.port}"
        assert _get(http.url + "/healthz")[0] == 200
    with pytest.raises(urllib.error.URLError):  # stopped means closed
        urllib.request.urlopen(http.url + "/healthz", timeout=2)


# ---------------------------------------------------------------------------- client


def test_rollback_over_http(service, controller):
    answer = rollback_over_http(service.url, to=2, last_good=False, token=TOKEN, reason="r")
    assert answer == {"checkpoint": 2, "reason": "r"}
    with pytest.raises(AdminRequestError) as refused:
        rollback_over_http(service.url, to=2, last_good=False, token="bad", reason="r")
    assert (refused.value.status, refused.value.message) == (403, "wrong admin token")
    with pytest.raises(AdminRequestError) as missing:
        rollback_over_http(service.url, to=99, last_good=False, token=TOKEN, reason="r")
    assert missing.value.status == 404
    assert controller.calls == [("rollback", 2, "r"), ("rollback", 99, "r")]


def test_rollback_over_http_to_a_closed_port_is_unreachable():
    with pytest.raises(ServiceUnreachable) as error:
        rollback_over_http(f"http://127.0.0.1:{_closed_port()}", to=None, last_good=True, token=TOKEN, reason="r")
    assert isinstance(error.value, ConnectionError)


# ---------------------------------------------------------------------------- the CLI


@pytest.fixture
def store_dir(tmp_path):
    directory = tmp_path / "ckpts"
    with CheckpointStore(directory, keep_last=10) as store:
        for i, status in enumerate(["good", "good", "regressed"]):
            store.save({"w": np.full(3, i, np.float32)}, {}, {"status": status, "learner_step": 10 * (i + 1)})
    return directory


def test_cli_rollback_over_http(service, controller, monkeypatch, capsys, store_dir):
    monkeypatch.setenv("CONTINUITY_ADMIN_TOKEN", TOKEN)
    assert main(["rollback", "--url", service.url, "--to", "2", "--reason", "ops", "--dir", str(store_dir)]) == 0
    assert "rolled back to checkpoint 2" in capsys.readouterr().out
    assert controller.calls == [("rollback", 2, "ops")]
    with CheckpointStore(store_dir, create=False) as store:
        assert store.head is None  # the service did it; the directory was not touched

    monkeypatch.setenv("OTHER_TOKEN", "wrong")
    assert main(["rollback", "--url", service.url, "--last-good", "--token-env", "OTHER_TOKEN"]) == 2
    assert "wrong admin token" in capsys.readouterr().err
    monkeypatch.delenv("CONTINUITY_ADMIN_TOKEN")
    assert main(["rollback", "--url", service.url, "--last-good"]) == 2
    assert "$CONTINUITY_ADMIN_TOKEN, which is not set" in capsys.readouterr().err
    assert len(controller.calls) == 1


def test_cli_rollback_falls_back_to_the_directory(store_dir, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["rollback", "--url", url, "--to", "1", "--dir", str(store_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"no service is running at {url}")
    assert out[1].startswith("the next start restores checkpoint 1")
    with CheckpointStore(store_dir, create=False) as store:
        assert store.head == 1

    assert main(["rollback", "--url", url, "--last-good"]) == 2
    assert "pass --dir DIR" in capsys.readouterr().err
    assert main(["rollback", "--last-good"]) == 2
    assert "--url URL" in capsys.readouterr().err


def test_cli_rollback_finds_the_service_and_directory_in_the_config(
    service, controller, tmp_path, monkeypatch, capsys, store_dir
):
    pytest.importorskip("continuity.config")
    monkeypatch.delenv("CONTINUITY_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("SERVICE_TOKEN", TOKEN)
    config = tmp_path / "continuity.toml"
    config.write_text(
        f'[checkpoints]\ndir = "{store_dir}"\n\n[service]\nhttp_host = "127.0.0.1"\n'
        f'http_port = {service.port}\nadmin_token_env = "SERVICE_TOKEN"\n'
    )
    assert main(["rollback", "--config", str(config), "--to", "2"]) == 0
    assert f"the service at {service.url} rolled back to checkpoint 2" in capsys.readouterr().out
    assert controller.calls == [("rollback", 2, "manual rollback")]

    # No service at the configured port: the config's checkpoint directory instead.
    port = _closed_port()
    assert main(["rollback", "--config", str(config), "--set", f"service.http_port={port}", "--to", "1"]) == 0
    out = capsys.readouterr().out
    assert f"no service is running at http://127.0.0.1:{port}" in out and f"directory {store_dir}" in out
    with CheckpointStore(store_dir, create=False) as store:
        assert store.head == 1


def test_cli_pin_and_unpin_go_through_the_service_or_fall_back_to_the_directory(
    service, controller, monkeypatch, capsys, store_dir
):
    monkeypatch.setenv("CONTINUITY_ADMIN_TOKEN", TOKEN)
    assert main(["checkpoints", "pin", "2", "--url", service.url, "--dir", str(store_dir)]) == 0
    assert main(["checkpoints", "unpin", "1", "--url", service.url]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"the service at {service.url} pinned checkpoint 2",
        f"the service at {service.url} unpinned checkpoint 1",
    ]
    assert controller.calls == [("pin", 2), ("unpin", 1)]
    with CheckpointStore(store_dir, create=False) as store:
        assert not store.info(2).pinned  # the service did it; the directory was not touched
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["checkpoints", "pin", "2", "--url", url, "--dir", str(store_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"no service is running at {url}; pin in the checkpoint directory {store_dir} instead",
        "checkpoint 2 pinned",
    ]
    with CheckpointStore(store_dir, create=False) as store:
        assert store.info(2).pinned
    assert main(["checkpoints", "pin", "2"]) == 2
    assert "pin needs --url URL or --config FILE" in capsys.readouterr().err
