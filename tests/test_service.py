"""serve, replay and demo end to end: a real broker, real subprocesses, real checkpoint directories."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import accepted_chain, record_scenario
from prometheus_client.parser import text_string_to_metric_families

from continuity.checkpoints import CheckpointStore, Ledger
from continuity.cli import main
from continuity.stream import (
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

pytestmark = pytest.mark.slow  # serve, replay and the demo end to end

REPO = Path(__file__).resolve().parent.parent
SPEC = FeatureSpec((8, 8, 1), "float32", 10)
TOKEN = "s3cret-test-token"


def _config(path: Path, *, bootstrap: str, topic: str, directory: Path, port: int, keep_last: int = 3) -> Path:
    path.write_text(f"""
[stream]
bootstrap = "{bootstrap}"
topics = ["{topic}"]
group = "{topic}-group"
session_timeout_ms = {SHORT_SESSION_TIMEOUT_MS}  # the embedded broker holds a group join ~half of it

[model]
hidden = [64]

[replay]
capacity = 256
batch_size = 16

[probe]
every_examples = 500

[checkpoints]
dir = "{directory}"
keep_last = {keep_last}
every_seconds = 0  # every accepted window: the rollback below needs later windows to go back over

[service]
http_port = {port}
admin_token_env = "TEST_ADMIN_TOKEN"
progress_every_s = 1.0
""")
    return path


def _get(url: str, token: str | None = None, body: dict | None = None):
    request = urllib.request.Request(
        url, data=None if body is None else json.dumps(body).encode(), method="GET" if body is None else "POST"
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None, ""


def _wait(condition, timeout_s: float, what: str, process=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"serve exited early ({process.returncode}) while waiting for {what}")
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _status(url):
    code, body = _get(url + "/status")
    return json.loads(body) if code == 200 else None


def store_head(directory: Path):
    return CheckpointStore(directory, create=False).head


def _serve(config: Path) -> subprocess.Popen:
    env = {**os.environ, "TEST_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "continuity.cli", "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(process: subprocess.Popen, timeout_s: float = 20) -> tuple[int, float, str]:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=timeout_s)
    return process.returncode, time.monotonic() - started, err


def test_serve_trains_checkpoints_exposes_metrics_stops_cleanly_and_resumes(broker, topic_name, tmp_path):
    topic = topic_name()
    scenario = make_scenario("permuted-digits", segments=2, seed=1)
    source = ScenarioSource(scenario, make_codec("binary", SPEC), topic=topic)
    create_topic(broker.bootstrap, topic, 1)
    half, three_quarters = len(source) // 2, 3 * len(source) // 4
    produce_records(broker.bootstrap, topic, (source.encode_record(i) for i in range(half)))
    directory = tmp_path / "run"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = _config(tmp_path / "serve.toml", bootstrap=broker.bootstrap, topic=topic, directory=directory, port=port)

    first = _serve(config)
    try:
        _wait(lambda: _get(url + "/readyz")[0] == 200, 90, "readiness", first)
        _wait(lambda: (_status(url) or {}).get("checkpoint"), 90, "a first checkpoint", first)
        # Metrics parse with prometheus_client's own parser and carry the training figures.
        _wait(lambda: "continuity_examples_trained_total" in _get(url + "/metrics")[1], 30, "metrics", first)
        families = {f.name: f for f in text_string_to_metric_families(_get(url + "/metrics")[1])}
        trained = families["continuity_examples_trained"].samples[0].value
        assert trained > 0
        assert "continuity_probe_accuracy" in families and "continuity_step_seconds" in families
        # The train steps' own figures, summed on the device between reports.
        assert {"continuity_train_loss", "continuity_grad_norm", "continuity_replay_share"} <= set(families)
        assert families["continuity_skipped_updates"].samples[0].value == 0
        status = _status(url) or {}
        assert status["train_loss"] > 0 and status["grad_norm"] > 0 and 0 < status["replay_share"] < 1
        # Test-then-train: the trained records, each predicted before its update, over the lineage.
        prequential = status["prequential"]
        assert prequential["figure"] == "accuracy" and 0 < prequential["total"] < 1 and prequential["examples"] > 0
        assert 0 < prequential["window"] <= 1 and prequential["window_size"] == 1000
        spans = {s.labels["span"]: s.value for s in families["continuity_prequential_accuracy"].samples}
        assert spans.keys() == {"total", "window"} and all(0 < v <= 1 for v in spans.values())
        # Admin endpoints: no token, a wrong token, then the right one.
        assert _get(url + "/admin/rollback", body={"last_good": True})[0] == 401
        assert _get(url + "/admin/rollback", token="wrong", body={"last_good": True})[0] == 403
        code, body = _get(url + "/admin/rollback", token=TOKEN, body={"last_good": True, "reason": "test"})
        assert code == 200, body
        rolled_back_to = json.loads(body)["checkpoint"]
        assert rolled_back_to is not None and store_head(directory) == rolled_back_to
        # Train past the rollback before stopping (the reader was moved back in place, see
        # KafkaSource.rewind; a re-opened one would need to rejoin the group first).
        # More records arrive, so there is something past the rollback however fast the first half went.
        produce_records(broker.bootstrap, topic, (source.encode_record(i) for i in range(half, three_quarters)))
        _wait(
            lambda: ((_status(url) or {}).get("checkpoint") or 0) > rolled_back_to,
            90,
            "a checkpoint after the rollback",
            first,
        )
    finally:
        status, seconds, err = _stop(first)
    assert status == 0, err[-3000:]
    assert seconds < 15  # the issue asks for 10 s after the signal; slack for this loaded 2-core machine
    store = CheckpointStore(directory, create=False)
    ledger = store.ledger.read()
    assert any(e["event"] == "rollback" and e.get("reason") == "test" for e in ledger)
    stopped_at = [e for e in ledger if e["event"] == "stop"][-1]["positions"]

    # The rest of the stream arrives; a restart resumes exactly where the first run's checkpoint left off.
    produce_records(broker.bootstrap, topic, (source.encode_record(i) for i in range(three_quarters, len(source))))
    second = _serve(config)
    try:
        _wait(
            lambda: any(
                e["event"] == "accept" and Positions.from_json(e["positions"]).offset(topic, 0) == len(source)
                for e in store.ledger.read()
            ),
            120,
            "the whole stream trained",
            second,
        )
    finally:
        status, _, err = _stop(second)
    assert status == 0, err[-3000:]
    store = CheckpointStore(directory, create=False)  # reopened: the second run changed it
    ledger = store.ledger.read()
    restore = [e for e in ledger if e["event"] == "restore"][-1]
    assert restore["positions"] == stopped_at
    # The surviving lineage: accepted windows chained by parent, contiguous from 0 to the end.
    chain = accepted_chain(ledger, store.last_good())
    assert Positions.from_json(chain[0]["from"]).offset(topic, 0) in (None, 0)
    for earlier, later in zip(chain, chain[1:]):
        assert later["from"] == earlier["positions"]
    assert Positions.from_json(chain[-1]["positions"]).offset(topic, 0) == len(source)


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """permuted-digits, 2 segments, one partition, recorded to Parquet."""
    return record_scenario(tmp_path_factory.mktemp("replay") / "stream.parquet", segments=2, seed=2)


def test_replay_twice_gives_identical_checkpoints(recording, tmp_path, capsys):
    config = tmp_path / "replay.toml"
    # Checkpoints at every accepted window: with a time cadence (every_seconds) which windows get
    # saved depends on how fast each run went, though the model never does.
    config.write_text("[model]\nhidden = [64]\n[probe]\nevery_examples = 700\n[checkpoints]\nevery_seconds = 0\n")
    for out in ("a", "b"):
        assert main(["replay", str(recording), "--config", str(config), "--out", str(tmp_path / out)]) == 0
    printed = capsys.readouterr().out
    assert "examples trained" in printed
    stores = [CheckpointStore(tmp_path / out, create=False) for out in ("a", "b")]
    assert [i.number for i in stores[0].list()] == [i.number for i in stores[1].list()]
    from continuity.config import load_config
    from continuity.service import build_learner

    like = build_learner(load_config(config)).init(0)
    a, b = (s.restore(s.last_good(), state_like=like) for s in stores)
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a.probe), jax.tree.leaves(b.probe)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    strip = lambda m: {k: v for k, v in m.items() if k != "saved_at"}  # noqa: E731
    assert strip(a.metadata) == strip(b.metadata)


def test_replay_of_a_missing_file_is_one_clear_line(tmp_path, capsys):
    assert main(["replay", str(tmp_path / "nope.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_demo_runs_headless_and_writes_its_report(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--segments", "3", "--seconds", "150"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## In numbers" in report and "quarantined records" in report
    assert "## Regressions caught" in report  # the poisoned last segment is caught
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # The quarantined window is durable: the newest checkpoint is past it, so a restart
    # does not read those records again.
    store = CheckpointStore(tmp_path / "checkpoints", create=False)
    quarantines = [e for e in store.ledger.read() if e["event"] == "quarantine"]
    # A line per quarantine: its records, how many were poisoned, how many clean went with them.
    tallies = re.findall(
        r"^- records consumed .*: ([\d,]+) records quarantined, of which ([\d,]+) poisoned and ([\d,]+) clean$",
        report,
        re.M,
    )
    counts = [[int(n.replace(",", "")) for n in tally] for tally in tallies]
    assert [records for records, _, _ in counts] == [e["records"] for e in quarantines]
    assert all(poisoned + clean == records for records, poisoned, clean in counts)
    assert sum(poisoned for _, poisoned, _ in counts) > 0
    last_quarantine = quarantines[-1]
    newest = store.info(store.last_good()).metadata
    assert newest["positions"] == last_quarantine["to"] and newest["quarantined_records"] > 0


def _trained_to(directory: Path, topic: str, offset: int) -> bool:
    ledger = Ledger(directory / "ledger.jsonl").read()
    return any(e["event"] == "save" and Positions.from_json(e["positions"]).offset(topic, 0) == offset for e in ledger)


def test_operator_decisions_on_a_running_service_go_through_it_and_outlive_its_saves_and_retention(
    broker, topic_name, tmp_path, monkeypatch, capsys
):
    topic = topic_name()
    source = ScenarioSource(
        make_scenario("permuted-digits", segments=2, seed=3), make_codec("binary", SPEC), topic=topic
    )
    create_topic(broker.bootstrap, topic, 1)
    half = len(source) // 2
    produce_records(broker.bootstrap, topic, (source.encode_record(i) for i in range(half)))
    directory, port = tmp_path / "run", free_port()
    url = f"http://127.0.0.1:{port}"
    config = _config(
        tmp_path / "serve.toml", bootstrap=broker.bootstrap, topic=topic, directory=directory, port=port, keep_last=3
    )
    monkeypatch.delenv("CONTINUITY_ADMIN_TOKEN", raising=False)  # `--url` reads the token from here
    monkeypatch.setenv("TEST_ADMIN_TOKEN", TOKEN)  # `--config` reads it from its admin_token_env
    service = _serve(config)
    try:
        _wait(lambda: _trained_to(directory, topic, half), 120, "the first half trained and saved", service)
        numbers = CheckpointStore(directory, create=False).numbers()
        assert len(numbers) == 3
        pinned, target, abandoned = numbers  # the stream is quiet: no save happens until more arrives

        # A second service on the same directory is refused, naming the one that owns it.
        other = _config(
            tmp_path / "other.toml", bootstrap=broker.bootstrap, topic=topic, directory=directory, port=free_port()
        )
        assert main(["serve", "--config", str(other)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by `continuity serve` (pid {service.pid}, host " in err

        # The directory cannot be changed behind the service's back, and nothing is half-applied.
        before = (directory / "store.json").read_bytes()
        for argv in (["rollback", "--to", str(target)], ["checkpoints", "pin", str(pinned)]):
            assert main([*argv, "--dir", str(directory)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "refused" in err and f"pid {service.pid}" in err
            assert f"--url {url}" in err  # the owner's address, from its lock file
        # Through the service without a token: refused by it.
        assert main(["rollback", "--url", url, "--to", str(target)]) == 2
        assert "$CONTINUITY_ADMIN_TOKEN, which is not set" in capsys.readouterr().err
        assert (directory / "store.json").read_bytes() == before
        # Reading works while the service owns the directory.
        assert main(["checkpoints", "list", "--dir", str(directory)]) == 0
        assert main(["checkpoints", "verify", "--dir", str(directory)]) == 0
        assert capsys.readouterr().out.count(": ok (") == 3

        # With the token (from the config's admin_token_env), through the service, on its loop's thread.
        assert main(["checkpoints", "pin", str(pinned), "--config", str(config)]) == 0
        assert f"the service at {url} pinned checkpoint {pinned}" in capsys.readouterr().out
        assert main(["rollback", "--config", str(config), "--to", str(target), "--reason", "bad upstream"]) == 0
        assert f"rolled back to checkpoint {target}" in capsys.readouterr().out
        assert (_status(url) or {}).get("checkpoint") == target

        # The rest of the stream: several saves, and retention after each (keep_last = 3).
        produce_records(broker.bootstrap, topic, (source.encode_record(i) for i in range(half, len(source))))
        _wait(lambda: _trained_to(directory, topic, len(source)), 120, "the whole stream trained and saved", service)
    finally:
        service.kill()  # SIGKILL: the kernel drops its lock
        service.communicate()
    with CheckpointStore(directory, keep_last=3) as store:  # a new owner at once: no stale lock
        ledger = store.ledger.read()
        numbers = store.numbers()
        assert pinned in numbers and store.info(pinned).pinned  # kept through every retention since
        assert len([n for n in numbers if n > abandoned]) >= 3  # retention ran with the new lineage
        rollback = next(e for e in ledger if e["event"] == "rollback" and e.get("reason") == "bad upstream")
        assert rollback["checkpoint"] == target and rollback["abandoned"] == [abandoned]
        after = ledger[ledger.index(rollback) :]
        assert next(e for e in after if e["event"] == "accept")["parent"] == target
        chain = [e["checkpoint"] for e in accepted_chain(ledger, store.last_good())]
        assert target in chain and abandoned not in chain  # the operator's decision held
        assert store.head is None  # cleared by the first save after it, which descends from it
