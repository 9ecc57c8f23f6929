"""The service on a broker that lost its data: it stops with exit status 4 by default, leaving
the checkpoints as they are, or goes on as `stream.on_lost_positions` says.

A broker that lost its data is a second embedded broker started on the port of a stopped
one (Tansu keeps topics in memory only). The first run trains a one-partition topic to its
end and checkpoints it; the tests then replace the broker under a copy of that run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SHORT_SESSION_SET
from prometheus_client.parser import text_string_to_metric_families

from continuity.checkpoints import CheckpointStore
from continuity.config import load_config
from continuity.service import Service
from continuity.stream import (
    EmbeddedBroker,
    FeatureSpec,
    Positions,
    ScenarioSource,
    create_topic,
    free_port,
    make_codec,
    produce_records,
)
from continuity.stream.broker import SHORT_SESSION_TIMEOUT_MS
from continuity.stream.scenarios import make_scenario

pytestmark = pytest.mark.slow  # the service end to end, several brokers

REPO = Path(__file__).resolve().parent.parent
TOPIC = "digits"
SPEC = FeatureSpec((8, 8, 1), "float32", 10)
EXAMPLES_PER_RECORD = 10


def _records(segments: int, seed: int) -> list[tuple[bytes, bytes]]:
    source = ScenarioSource(
        make_scenario("permuted-digits", segments=segments, seed=seed),
        make_codec("binary", SPEC),
        topic=TOPIC,
        examples_per_record=EXAMPLES_PER_RECORD,
    )
    return [source.encode_record(i) for i in range(len(source))]


def _overrides(bootstrap: str, directory: Path, *extra: str) -> list[str]:
    return [
        f'stream.bootstrap="{bootstrap}"',
        f'stream.topics=["{TOPIC}"]',
        'stream.group="continuity"',
        SHORT_SESSION_SET,
        f'checkpoints.dir="{directory}"',
        "model.hidden=[64]",
        "replay.capacity=256",
        "replay.batch_size=16",
        "probe.every_examples=500",
        "service.progress_every_s=0.5",
        *extra,
    ]


def _checkpoints(directory: Path) -> list[tuple[int, str, list]]:
    store = CheckpointStore(directory, create=False)
    try:
        return [(i.number, i.status, i.metadata["positions"]) for i in store.list()]
    finally:
        store.close()


def _ledger(directory: Path) -> list[dict]:
    store = CheckpointStore(directory, create=False)
    try:
        return store.ledger.read()
    finally:
        store.close()


class _TrainedRun:
    """A checkpoint directory whose newest checkpoint holds the end of a topic on a broker now gone."""

    def __init__(self, port: int, directory: Path, records: int):
        self.port, self.directory, self.records = port, directory, records

    def copy(self, where: Path) -> Path:
        shutil.copytree(self.directory, where)
        return where


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> _TrainedRun:
    directory = tmp_path_factory.mktemp("lost") / "run"
    records = _records(segments=1, seed=5)
    port = free_port()
    with EmbeddedBroker(port) as broker:
        create_topic(broker.bootstrap, TOPIC, 1)
        produce_records(broker.bootstrap, TOPIC, records)
        config = load_config(None, _overrides(broker.bootstrap, directory))
        summary = Service(config, http=False, idle_timeout_s=10.0).run()  # a group join takes seconds
    assert summary.positions == {f"{TOPIC}/0": len(records)}
    newest = _checkpoints(directory)[-1]
    assert newest[2] == Positions({(TOPIC, 0): len(records)}).to_json()
    return _TrainedRun(port, directory, len(records))


def _config_file(path: Path, bootstrap: str, directory: Path) -> Path:
    path.write_text(f"""
[stream]
bootstrap = "{bootstrap}"
topics = ["{TOPIC}"]
group = "continuity"
session_timeout_ms = {SHORT_SESSION_TIMEOUT_MS}

[model]
hidden = [64]

[replay]
capacity = 256
batch_size = 16

[probe]
every_examples = 500

[checkpoints]
dir = "{directory}"

[service]
http_port = 0
progress_every_s = 1.0
""")
    return path


def test_serve_stops_with_status_4_on_a_broker_that_lost_its_log_leaving_the_checkpoints_as_they_are(
    trained_run, tmp_path
):
    directory = trained_run.copy(tmp_path / "run")
    before = _checkpoints(directory)
    with EmbeddedBroker(trained_run.port) as broker:  # the same address, none of the data
        create_topic(broker.bootstrap, TOPIC, 1)
        produce_records(broker.bootstrap, TOPIC, _records(segments=1, seed=6)[:20])
        config = _config_file(tmp_path / "serve.toml", broker.bootstrap, directory)
        process = subprocess.run(
            [sys.executable, "-m", "continuity.cli", "serve", "--config", str(config)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert process.returncode == 4, process.stderr[-3000:]
    err = process.stderr
    assert "Traceback" not in err
    (error,) = [line for line in err.splitlines() if " ERROR " in line]
    assert f"digits/0 at offset {trained_run.records}" in error and "the topic was recreated" in error
    assert err.rstrip().splitlines()[-1].startswith("continuity: stopped: saved stream positions the broker no longer")
    assert _checkpoints(directory) == before  # nothing saved, nothing moved
    ledger = _ledger(directory)
    (lost,) = [e for e in ledger if e["event"] == "lost_positions"]
    assert lost["action"] == "halt"
    assert [(p["topic"], p["partition"], p["offset"]) for p in lost["partitions"]] == [(TOPIC, 0, trained_run.records)]
    stop = ledger[-1]
    assert stop["event"] == "stop" and stop["stopped_on_lost_positions"] and stop["examples_trained"] == 0


def test_serve_with_earliest_trains_a_recreated_topic_from_its_start(trained_run, tmp_path):
    directory = trained_run.copy(tmp_path / "run")
    new = _records(segments=1, seed=7)[:60]
    with EmbeddedBroker(trained_run.port) as broker:
        create_topic(broker.bootstrap, TOPIC, 1)
        produce_records(broker.bootstrap, TOPIC, new)
        config = load_config(None, _overrides(broker.bootstrap, directory, 'stream.on_lost_positions="earliest"'))
        service = Service(config, http=False, idle_timeout_s=10.0)  # a group join takes seconds
        summary = service.run()
    assert not summary.stopped_on_lost_positions
    ((lost,),) = [[p for p in summary.lost_positions]]
    assert (lost["action"], lost["offset"], lost["resumed_at"]) == ("earliest", trained_run.records, 0)
    assert summary.positions == {f"{TOPIC}/0": len(new)}  # every record of the new log, from its start
    newest = CheckpointStore(directory, create=False)
    final = newest.info(newest.last_good()).metadata
    assert Positions.from_json(final["positions"]) == Positions({(TOPIC, 0): len(new)})
    assert final["topics"][TOPIC]["id"] != _first_topic_id(trained_run.directory)  # the new topic, from now on
    assert [e["action"] for e in newest.ledger.read() if e["event"] == "lost_positions"] == ["earliest"]
    assert _metric(service, "continuity_lost_positions") == 1


def _first_topic_id(directory: Path) -> str:
    store = CheckpointStore(directory, create=False)
    try:
        return store.info(store.last_good()).metadata["topics"][TOPIC]["id"]
    finally:
        store.close()


def _metric(service: Service, name: str) -> float:
    from prometheus_client import generate_latest

    families = {f.name: f for f in text_string_to_metric_families(generate_latest(service.metrics.registry).decode())}
    return families[name].samples[0].value


def test_serve_halts_when_its_broker_is_replaced_by_an_empty_one_while_it_runs(tmp_path):
    records = _records(segments=1, seed=8)
    port = free_port()
    directory = tmp_path / "run"
    broker = EmbeddedBroker(port).start()
    try:
        create_topic(broker.bootstrap, TOPIC, 1)
        produce_records(broker.bootstrap, TOPIC, records)
        config = load_config(None, _overrides(broker.bootstrap, directory, "checkpoints.every_seconds=0"))
        service = Service(config, http=False)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(summary=service.run()), daemon=True)
        thread.start()
        _wait(lambda: _accepted_up_to(directory) == len(records), 120, "the topic trained to its end", thread)
        trained = service.status()["examples_trained"]
        broker.stop()
        _wait(lambda: "broker unreachable" in (service.stream_note() or ""), 30, "the outage noticed", thread)
        assert not service.ready()
        broker = EmbeddedBroker(port).start()  # empty: the topic comes back with more records than were read
        create_topic(broker.bootstrap, TOPIC, 1)
        produce_records(broker.bootstrap, TOPIC, _records(segments=1, seed=9) * 2)
        thread.join(60)
        assert not thread.is_alive(), "the service did not stop on the lost positions"
    finally:
        service.stop_event.set()
        broker.stop()
    summary = result["summary"]
    assert summary.stopped_on_lost_positions and summary.examples_trained == trained  # nothing of the new log
    ((lost,),) = [[p for p in summary.lost_positions]]
    assert (lost["action"], lost["offset"]) == ("halt", len(records)) and "recreated" in lost["reason"]
    assert _metric(service, "continuity_lost_positions") == 1
    assert _accepted_up_to(directory) == len(records)
    assert [e["event"] for e in _ledger(directory)][-2:] == ["lost_positions", "stop"]


def _accepted_up_to(directory: Path) -> int:
    if not (directory / "ledger.jsonl").exists():
        return 0
    ends = [
        Positions.from_json(e["positions"]).offset(TOPIC, 0) or 0
        for e in (json.loads(line) for line in (directory / "ledger.jsonl").read_text().splitlines() if line)
        if e["event"] == "accept"
    ]
    return max(ends, default=0)


def _wait(condition, timeout_s: float, what: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert thread.is_alive(), f"the service ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
