"""/readyz follows the stream: 503 while the broker is down, 200 once it is back and partitions
are assigned; the progress line says how long the broker has been unreachable.

The service reaches the embedded broker only through a TCP proxy (the broker advertises the
proxy's port), so "the broker is down" is a closed proxy: Tansu keeps topics in memory only.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import SHORT_SESSION_SET

from continuity.benchmarks.tcp_proxy import TcpProxy
from continuity.config import load_config
from continuity.service import Service, format_progress
from continuity.stream import (
    EmbeddedBroker,
    FeatureSpec,
    ScenarioSource,
    create_topic,
    free_port,
    make_codec,
    produce_records,
)
from continuity.stream.scenarios import make_scenario

pytestmark = pytest.mark.slow  # the service with HTTP through a broker outage

TOPIC = "digits"


def _get(url: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None, ""


def test_readyz_is_503_while_the_broker_is_down_and_200_once_it_is_back_and_partitions_are_assigned(tmp_path):
    proxy_port = free_port()
    lines: list[str] = []
    with EmbeddedBroker(advertised_port=proxy_port) as broker:
        proxy = TcpProxy(proxy_port, broker.port).start()
        create_topic(broker.bootstrap, TOPIC, 1)
        proxy.cut()  # the broker is unreachable when the service starts
        scenario = ScenarioSource(
            make_scenario("permuted-digits", segments=1, seed=4),
            make_codec("binary", FeatureSpec((8, 8, 1), "float32", 10)),
            topic=TOPIC,
            examples_per_record=10,
        )
        config = load_config(
            None,
            [
                f'stream.bootstrap="{broker.bootstrap}"',
                f'stream.topics=["{TOPIC}"]',
                SHORT_SESSION_SET,
                f'checkpoints.dir="{tmp_path / "run"}"',
                "model.hidden=[32]",
                "service.http_port=0",
                "service.progress_every_s=0.5",
            ],
        )
        service = Service(config, progress=lambda p, lag: lines.append(format_progress(p, lag)))
        urls: list[str] = []
        thread = threading.Thread(target=service.run, args=(urls.append,), daemon=True)
        thread.start()
        try:

            def wait(condition, what: str, timeout_s: float = 60.0):
                deadline = time.monotonic() + timeout_s
                while not condition():
                    assert thread.is_alive(), f"the service ended while waiting for {what}"
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    time.sleep(0.2)

            wait(lambda: urls and _get(urls[0] + "/healthz")[0] == 200, "HTTP")
            url = urls[0]
            # Down from the start: alive, not ready, and every report says so.
            wait(lambda: "broker unreachable for" in json.loads(_get(url + "/status")[1])["stream"], "the status")
            assert _get(url + "/readyz")[0] == 503
            wait(lambda: any("broker unreachable for" in line for line in lines), "a progress line")

            proxy.restore()
            produce_records(broker.bootstrap, TOPIC, (scenario.encode_record(i) for i in range(20)))
            wait(lambda: _get(url + "/readyz")[0] == 200, "readiness once the broker is up and partitions assigned")
            assert json.loads(_get(url + "/status")[1])["stream"] == "reading"

            proxy.cut()  # down again, mid-run
            wait(lambda: _get(url + "/readyz")[0] == 503, "/readyz to turn 503 in the outage")
            wait(lambda: "broker unreachable for" in json.loads(_get(url + "/status")[1])["stream"], "the status")

            proxy.restore()
            wait(lambda: _get(url + "/readyz")[0] == 200, "readiness once the broker is back")
        finally:
            service.stop_event.set()
            thread.join(60)
            proxy.cut()
    assert not thread.is_alive()
