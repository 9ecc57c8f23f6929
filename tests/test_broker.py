"""The embedded broker: starts on a free port, answers, stops, never outlives its parent; `continuity broker`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from continuity.stream.broker import EmbeddedBroker, answers_metadata, free_port


def _wait(predicate, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_embedded_broker_answers_then_stops():
    with EmbeddedBroker() as broker:
        assert answers_metadata("127.0.0.1", broker.port)
        port = broker.port
    assert not answers_metadata("127.0.0.1", port, timeout_s=0.3)


def test_broker_dies_with_the_process_that_started_it():
    code = (
        "import sys, os; sys.path.insert(0, os.getcwd());"
        "from stream.broker import EmbeddedBroker;"
        "b = EmbeddedBroker().start(); print(b._process.pid, b.port, flush=True); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    pid, port = map(int, out.stdout.split())
    assert _wait(lambda: not answers_metadata("127.0.0.1", port, timeout_s=0.2))
    assert _wait(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2])


_INTERRUPTED_ON_ANOTHER_THREAD = """
import signal, threading, time
from continuity.stream.broker import EmbeddedBroker
with EmbeddedBroker() as broker:
    def interrupt():
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # this thread, not the main one
    threading.Thread(target=interrupt, daemon=True).start()
    try:
        broker.wait()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def _sigint_as_in_a_terminal() -> None:
    """Runs in the child before exec: SIGINT's default action, which Python replaces with its
    KeyboardInterrupt. A suite started in the background by a non-interactive shell (`make test &`)
    inherits SIGINT ignored, and Python leaves an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_sigint_the_kernel_hands_another_thread_still_stops_the_foreground_broker():
    # A process-directed SIGINT (Ctrl-C, `kill -INT`) may land on any thread that does not block
    # it; its Python handler then waits for the main thread, which must not sit in a bare waitpid.
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_ON_ANOTHER_THREAD],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    assert result.returncode == 0 and result.stdout.strip() == "interrupted", result.stderr[-2000:]


def test_continuity_broker_command_runs_in_the_foreground_until_interrupted():
    port = free_port()
    process = subprocess.Popen(
        # faulthandler: a SIGABRT prints where each thread is (below, if SIGINT does not end it)
        [sys.executable, "-X", "faulthandler", "-m", "continuity.cli", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    try:
        assert _wait(lambda: answers_metadata("127.0.0.1", port, timeout_s=0.2), 60)
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=60)  # read as it waits: a full pipe would block it
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            output, _ = process.communicate(timeout=30)
            pytest.fail(f"`continuity broker` still ran 60 s after SIGINT; where it was:\n{output[-6000:]}")
        assert not answers_metadata("127.0.0.1", port, timeout_s=0.3)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0 and f"127.0.0.1:{port}" in output


@pytest.mark.parametrize(
    ("host", "taken", "reason"),
    [
        ("192.0.2.1", False, "Cannot assign requested address"),  # TEST-NET-1: no machine's own address
        ("127.0.0.1", True, "Address already in use"),  # something that is not a Kafka broker holds it
    ],
    ids=["not-this-machines-address", "port-taken"],
)
def test_continuity_broker_where_it_cannot_listen_is_one_line_and_status_2_not_tansus_panic(host, taken, reason):
    with socket.socket() as holder:
        port = free_port()
        if taken:
            holder.bind((host, port))
            holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "continuity.cli", "broker", "--host", host, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"continuity: error: cannot listen on {host}:{port}: {reason}"]
    assert "panicked" not in result.stderr + result.stdout
