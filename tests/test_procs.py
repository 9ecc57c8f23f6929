"""Several processes training one model: lockstep rounds (continuity/lockstep.py), each process
reading its share of the partitions (stream/shares.py). The processes run as subprocesses joined
by jax.distributed over gloo, each with one faked CPU device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from continuity.checkpoints import CheckpointStore
from continuity.cli import main
from continuity.learner import Batch, Classification, LearnerConfig, ModelConfig, ReplayConfig
from continuity.lockstep import Lockstep
from continuity.loop import params_digest
from continuity.stream import Batcher, Ingest, KafkaSettings, KafkaSource, Positions, create_topic
from continuity.stream.ingest import IDLE, BatchStream

REPO = Path(__file__).resolve().parent.parent


def _learner(k: int = 2):
    from continuity.factory import build_learner

    config = LearnerConfig(model=ModelConfig(kind="mlp", hidden=(8,)), batch_size=4, steps_per_dispatch=k)
    return build_learner(config, inputs=jax.ShapeDtypeStruct((2,), np.float32), task=Classification(10))


def _batch(value: float, rows: int = 4) -> Batch:
    return Batch(np.full((rows, 2), value, np.float32), np.zeros(rows, np.int32), np.ones(rows, bool))


def test_a_round_runs_the_fullest_process_s_stacks_and_the_others_pad_with_masked_micro_batches():
    # Three processes had 3, 0 and 5 micro-batches ready: with K = 2 every one dispatches 3 stacks.
    others = iter([[3, 12, 0, 0, 0], [0, 0, 1, 0, 0], [5, 20, 0, 0, 0]])
    lockstep = Lockstep(_learner(), gather=lambda mine: np.stack([next(others) for _ in range(3)]))
    agreement = lockstep.agree(3, 12, ended=False, stop=False)
    assert (agreement.dispatches, agreement.rows, agreement.ended, agreement.stop, agreement.close) == (
        3,
        32,
        False,
        False,
        False,
    )
    stacks = lockstep.stacks([_batch(1.0), _batch(2.0), _batch(3.0)], agreement)
    assert len(stacks) == 3 and all(s.mask.shape == (2, 4) for s in stacks)
    masks = np.concatenate([s.mask for s in stacks])
    assert masks.sum(axis=1).tolist() == [4, 4, 4, 0, 0, 0]  # its 3, then 3 masked micro-batches
    assert stacks[1].x[0, 0, 0] == 3.0


def test_the_stream_ends_only_when_every_process_has_ended_with_nothing_left_and_one_stop_stops_all():
    tables = iter(
        [
            [[0, 0, 1, 0, 0], [2, 8, 1, 0, 0]],  # one still has batches: not the end
            [[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]],  # one is still reading
            [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0]],
            [[1, 4, 0, 0, 1], [0, 0, 0, 1, 0]],
        ]
    )
    lockstep = Lockstep(_learner(), gather=lambda mine: np.array(next(tables)))
    assert [lockstep.agree(0, 0, ended=True, stop=False).ended for _ in range(3)] == [False, False, True]
    last = lockstep.agree(1, 4, ended=False, stop=False, close=True)
    assert last.stop and last.close
    assert lockstep.rounds == 4


def test_every_process_s_positions_are_gathered_into_one_set():
    mine = Positions({("t", 0): 5, ("t", 2): (7, 3)})
    theirs = Positions({("t", 1): 9, ("t", 3): 1})

    def gather(values):
        if values.dtype == np.int64:  # the lengths
            return np.array([[len(json.dumps(mine.to_json()))], [len(json.dumps(theirs.to_json()))]])
        longest = len(values)
        rows = []
        for positions in (mine, theirs):
            text = json.dumps(positions.to_json()).encode()
            rows.append(np.frombuffer(text + b"\0" * (longest - len(text)), np.uint8))
        return np.stack(rows)

    assert Lockstep(_learner(), gather=gather).gather_positions(mine) == mine.merged(theirs)


def test_held_out_rows_of_every_process_are_gathered_in_process_order():
    # Process 0 held out 2 rows, process 1 three: both get the same five, padding dropped.
    mine = {"x": np.array([[1.0, 1.0], [2.0, 2.0]], np.float32), "y": np.array([1, 2], np.int32)}
    theirs = {"x": np.array([[3.0, 3.0], [4.0, 4.0], [5.0, 5.0]], np.float32), "y": np.array([3, 4, 5], np.int32)}

    def gather(values):
        if values.dtype == np.int64:
            return np.array([[2], [3]])
        longest = len(values)
        leaf = "x" if values.ndim == 2 else "y"
        padded = np.zeros((longest, *theirs[leaf].shape[1:]), theirs[leaf].dtype)
        padded[:3] = theirs[leaf]
        return np.stack([values, padded])

    rows = Lockstep(_learner(), gather=gather).gather_rows(mine)
    assert rows["y"].tolist() == [1, 2, 3, 4, 5]
    assert rows["x"][:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_a_collective_that_lost_its_peer_is_told_from_other_errors():
    from continuity.lockstep import _peer_failure

    gloo = (
        "UNKNOWN: Gloo AllGather failed: [gloo/transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:51329"
    )
    assert _peer_failure(ValueError(gloo))
    assert not _peer_failure(ValueError("operands could not be broadcast together with shapes (3,) (4,)"))


def test_an_operator_rollback_over_http_is_refused_by_several_processes_with_what_to_do_instead():
    from continuity.lockstep import LockstepLoop

    loop = LockstepLoop.__new__(LockstepLoop)  # refused before the loop is asked anything
    with pytest.raises(ValueError, match=r"stop every process, run `continuity rollback --dir"):
        loop.request("rollback", to=3, reason="operator")


def _faked_devices(count: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
    }


def _start_two(
    script: str, *arguments, devices: int = 1, env: dict[str, str] | None = None
) -> tuple[int, list[subprocess.Popen]]:
    """Start tests/<script> as processes 0 and 1 of 2 (`devices` faked devices each, joined at a free port;
    `env`: more environment variables for both)."""
    from continuity.stream import free_port

    port = free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / script), str(port), str(p), "2", *map(str, arguments)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**_faked_devices(devices), **(env or {})},
        )
        for p in (0, 1)
    ]
    return port, workers


def _two_processes(script: str, *arguments, timeout: float, devices: int = 1) -> tuple[int, list[dict], list[str]]:
    """Run tests/<script> as processes 0 and 1 of 2: the port, each one's last stdout line as JSON,
    and each one's stderr."""
    port, workers = _start_two(script, *arguments, devices=devices)
    reports, errors = [], []
    for worker in workers:
        out, err = worker.communicate(timeout=timeout)
        assert worker.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
        errors.append(err)
    return port, reports, errors


def _four_partitions(broker, topic: str, *, classes: int):
    """`topic` created with 4 partitions, and the codec its records are written with (2 features)."""
    from continuity.stream import BinaryCodec, FeatureSpec

    create_topic(broker.bootstrap, topic, 4)
    return topic, BinaryCodec(FeatureSpec((2,), "float32", classes))


def _two_free_ports() -> int:
    """A port P free with P + 1: process i of two serves HTTP on P + i."""
    import socket

    from continuity.stream import free_port

    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


@pytest.mark.slow
def test_two_processes_each_reading_two_of_four_partitions_train_every_record_once_in_lockstep_and_one_resumes(
    broker, topic_name, tmp_path
):
    from continuity.stream import produce_records

    topic, codec = _four_partitions(broker, topic_name(), classes=10)
    n = 600
    for partition in range(4):  # uneven partitions: 50, 75, 100 and 125 records
        ids = [i for i in range(n) if (i * 7) % 4 == partition][: 50 + 25 * partition]
        produce_records(
            broker.bootstrap, topic, [(None, codec.encode(np.array([i, i]), i % 10)) for i in ids], partition=partition
        )
    expected = sorted(i for p in range(4) for i in [i for i in range(n) if (i * 7) % 4 == p][: 50 + 25 * p])
    _, reports, _ = _two_processes("procs_worker.py", broker.bootstrap, topic, tmp_path / "checkpoints", timeout=240)
    assert [r["devices"] for r in reports] == [2, 2]  # one mesh over both processes' devices
    for report in reports:
        assert {i for i in report["ids"]} and all((i * 7) % 4 % 2 == report["process"] for i in report["ids"])
    trained = sorted(reports[0]["ids"] + reports[1]["ids"])
    held_out = sorted(reports[0]["held_out"] + reports[1]["held_out"])
    assert held_out and sorted(trained + held_out) == expected  # every record once: trained or held out
    # The global totals count every trained row once; both processes hold the same model.
    assert reports[0]["fresh_rows"] == reports[1]["fresh_rows"] == len(trained)
    # The probe's rows, gathered: the same on both processes, every process's held-out rows.
    assert reports[0]["probe"] == reports[1]["probe"] and sorted(reports[0]["probe"]) == held_out
    assert reports[0]["digest"] == reports[1]["digest"]
    assert reports[0]["rounds"] == reports[1]["rounds"]
    ends = {p: 50 + 25 * p for p in range(4)}
    for report in reports:  # every partition of every process, gathered
        assert {e["partition"]: e["offset"] for e in report["positions"]} == ends
    # Process 0 checkpointed the model alone; both put what it restored on the mesh.
    assert reports[0]["restored_digest"] == reports[1]["restored_digest"] == reports[0]["digest"]

    # A restart as ONE process resumes every partition at the position the two saved.
    more = {p: [1000 + 10 * p + j for j in range(10)] for p in range(4)}
    for p, ids in more.items():
        produce_records(
            broker.bootstrap, topic, [(None, codec.encode(np.array([i, i]), i % 10)) for i in ids], partition=p
        )
    with CheckpointStore(tmp_path / "checkpoints", create=False) as store:
        saved = store.restore(store.last_good(), state_like=_worker_learner().init(0))
    assert params_digest(saved.state) == reports[0]["digest"]
    start = Positions.from_json(saved.metadata["positions"])
    source = KafkaSource(KafkaSettings(broker.bootstrap, (topic,)), start=start, until_end=True)
    batcher = Batcher(codec.spec, 16, ownership=source.ownership, start=start)
    rest = []
    with Ingest(source, codec) as ingest:
        stream = BatchStream(ingest, batcher, max_wait_s=0.1)
        while (batch := stream.next()) is not None:
            if batch is not IDLE:
                rest.extend(int(v) for v in batch.x[batch.mask][:, 0])
    assert sorted(rest) == sorted(i for ids in more.values() for i in ids)  # the new records, and only them
    assert main(["checkpoints", "list", "--dir", str(tmp_path / "checkpoints")]) == 0


def _worker_like():
    """The state tests/procs_service.py trains, on one device (its config's learner)."""
    from procs_service import settings

    from continuity.config import load_config
    from continuity.service import build_learner

    return build_learner(load_config(None, settings("h:1", "t", "unused"))).init(0)


def _worker_learner():
    """The learner tests/procs_worker.py trains, on one device."""
    from continuity.factory import build_learner

    config = LearnerConfig(
        model=ModelConfig(kind="mlp", hidden=(16,)),
        batch_size=16,
        replay=ReplayConfig(capacity=64, batch_size=8),
        steps_per_dispatch=2,
    )
    return build_learner(config, inputs=jax.ShapeDtypeStruct((2,), np.float32), task=Classification(10))


def _ledger_chains(entries: list[dict], ends: dict[int, int]) -> None:
    """The accepted checkpoints' windows follow each other without gap or overlap up to `ends`."""
    reached: dict[int, int] = {}
    for entry in entries:
        if entry["event"] != "accept":
            continue
        start = {p["partition"]: p["offset"] for p in entry["from"]}
        assert start == {k: v for k, v in reached.items() if k in start}, (start, reached)
        reached = {p["partition"]: p["offset"] for p in entry["positions"]}
    assert reached == ends


@pytest.mark.slow
def test_two_serving_processes_over_four_partitions_train_one_model_in_lockstep_windows_and_checkpoint_every_partition(
    broker, topic_name, tmp_path
):
    from continuity.checkpoints.ledger import Ledger
    from continuity.stream import produce_records

    topic, codec = _four_partitions(broker, topic_name(), classes=10)
    ends = {p: 60 + 30 * p for p in range(4)}  # 60, 90, 120 and 150 records
    for p, count in ends.items():
        records = [(None, codec.encode(np.array([i, i]), i % 10)) for i in range(1000 * p, 1000 * p + count)]
        produce_records(broker.bootstrap, topic, records, partition=p)
    directory = tmp_path / "checkpoints"
    http = _two_free_ports()
    port, reports, errors = _two_processes(
        "procs_service.py", broker.bootstrap, topic, directory, f"service.http_port={http}", timeout=300
    )
    for p, err in enumerate(errors):
        assert f"process {p} of 2 joined at 127.0.0.1:{port}: 1 device(s) here, 2 in all" in err
    # HTTP: process i on port + i; each serves /healthz and /metrics (labelled with its process);
    # /status, /predict and the admin endpoints only on process 0, process 1 naming it.
    for p, report in enumerate(reports):
        answers = report["http"]
        assert answers["GET /healthz"] == [200, "ok\n"]
        assert (
            answers["GET /metrics"][0] == 200
            and f'continuity_examples_trained_total{{process="{p}"}}' in answers["GET /metrics"][1]
        )
    assert f"HTTP on http://127.0.0.1:{http}\n" in errors[0] and f"HTTP on http://127.0.0.1:{http + 1}\n" in errors[1]
    assert reports[0]["http"]["GET /status"][0] == 200
    assert reports[0]["http"]["POST /admin/checkpoint"][0] == 403  # served: disabled without a token
    assert reports[0]["http"]["POST /predict"][0] in (400, 503)  # served: no instances, or no model yet
    for request in ("GET /status", "POST /admin/checkpoint", "POST /predict"):
        status, body = reports[1]["http"][request]
        assert status == 409, request
        assert f"process 0 of 2 serves it, on port {http} of its host" in json.loads(body)["error"]
    summaries = [r["summary"] for r in reports]
    assert reports[0]["digest"] == reports[1]["digest"]  # one model
    assert summaries[0]["windows"] == summaries[1]["windows"] >= 2  # windows closed at the same steps
    assert summaries[0]["examples_trained"] == summaries[1]["examples_trained"]
    everything = sum(ends.values())
    assert 0.8 * everything < summaries[0]["examples_trained"] < everything  # all but the held-out ~10%
    for summary in summaries:  # every partition of every process, in both stores
        assert summary["positions"] == {f"{topic}/{p}": end for p, end in ends.items()}
    _ledger_chains(Ledger(directory / "ledger.jsonl").read(), ends)  # process 0's store holds the model
    with CheckpointStore(directory, create=False) as store:
        assert [info.condition for info in store.list()] == ["intact"] * len(store.numbers())
        assert params_digest(store.restore(store.last_good(), state_like=_worker_like()).state) == reports[1]["digest"]
    # Process 1 judged the same windows (its ledger of decisions) and saved no arrays.
    judged = [Ledger(d / "ledger.jsonl").read() for d in (directory, tmp_path / "checkpoints.process-1")]
    assert [e["to"] for e in judged[0] if e["event"] == "probe"] == [
        e["to"] for e in judged[1] if e["event"] == "probe"
    ]
    assert CheckpointStore(tmp_path / "checkpoints.process-1", create=False).numbers() == []
    # A restart as ONE process from process 0's store resumes every partition at its saved position.
    for p in range(4):
        records = [(None, codec.encode(np.array([i, i]), i % 10)) for i in range(1000 * p + 500, 1000 * p + 510)]
        produce_records(broker.bootstrap, topic, records, partition=p)
    from procs_service import settings

    from continuity.config import load_config
    from continuity.service import Service

    one = Service(load_config(None, settings(broker.bootstrap, topic, str(directory))), idle_timeout_s=2.0, http=False)
    summary = one.run()
    assert summary.restored_from is not None
    after = {p: end + 10 for p, end in ends.items()}
    assert summary.positions == {f"{topic}/{p}": end for p, end in after.items()}
    assert 0 < summary.examples_trained <= 40  # the new records only (less what was held out)
    _ledger_chains(Ledger(directory / "ledger.jsonl").read(), after)
    assert main(["checkpoints", "list", "--dir", str(directory)]) == 0


def _held_out(topic: str, ends: dict[int, int]) -> int:
    """How many of the records [0, end) of each partition tests/procs_service.py's config holds out for
    the probe (the holdout hashes each record's partition and offset)."""
    from procs_service import settings

    from continuity.config import load_config
    from continuity.stream import ExampleBlock, Holdout

    config = load_config(None, settings("h:1", topic, "unused"))
    holdout = Holdout(config.probe.holdout_fraction, salt=config.service.seed)
    held = 0
    for partition, n in ends.items():
        rows = np.arange(n)
        block = ExampleBlock(
            topic,
            partition,
            np.zeros((n, 2), np.float32),
            np.zeros(n, np.int32),
            rows.astype(np.int32),
            np.zeros(n, np.int32),
            rows.astype(np.int64),
            np.ones(n, np.int32),
            [None] * n,
            [None] * n,
        )
        held += int(holdout.select(block).sum())
    return held


def _wait_for_accept(ledger: Path, timeout: float) -> None:
    """Until process 0's ledger records an accepted (checkpointed) window."""
    import time

    from continuity.checkpoints.ledger import Ledger

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger.exists() and any(e["event"] == "accept" for e in Ledger(ledger).read()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no accepted window in {ledger} within {timeout} s")


@pytest.mark.slow
def test_a_process_killed_mid_stream_stops_the_other_unsaved_and_a_restart_of_both_trains_every_record_once(
    broker, topic_name, tmp_path
):
    import signal

    from continuity.checkpoints.ledger import Ledger
    from continuity.processes import PEER_LOST_EXIT_STATUS
    from continuity.stream import produce_records

    topic, codec = _four_partitions(broker, topic_name(), classes=10)
    ends = {p: 400 + 100 * p for p in range(4)}
    for p, count in ends.items():
        records = [(None, codec.encode(np.array([i, i]), i % 10)) for i in range(10_000 * p, 10_000 * p + count)]
        produce_records(broker.bootstrap, topic, records, partition=p)
    directory = tmp_path / "checkpoints"
    # 2 processes x 2 devices: one mesh of 4, each process feeding its 2 devices.
    _, workers = _start_two("procs_service.py", broker.bootstrap, topic, directory, devices=2)
    try:
        _wait_for_accept(directory / "ledger.jsonl", timeout=240)
        workers[1].send_signal(signal.SIGKILL)
        out, err = workers[0].communicate(timeout=120)  # it stops on its own
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    # Process 0 stops on its own, one of two ways, whichever comes first (README, "A dead peer"):
    # its next collective fails (PeerLost: one line, status 6), or JAX's coordination service,
    # which process 0 hosts, sees process 1's connection gone and aborts it (SIGABRT, JAX's line).
    # Under load process 0 may be far from its next collective (saving, polling) when the
    # service notices first. Killed in the middle of a collective's transfer, process 1 leaves
    # process 0 a short message, on which XLA's CPU collectives abort rather than raise.
    assert workers[0].returncode in (PEER_LOST_EXIT_STATUS, -signal.SIGABRT), err[-3000:]
    if workers[0].returncode == PEER_LOST_EXIT_STATUS:
        lost = [line for line in err.splitlines() if "lost process 1" in line]
        assert len(lost) == 1 and lost[0].startswith("continuity: process 0 of 2: lost process 1 (")
        assert "stopping without saving" in lost[0]
    else:
        assert (
            "Terminating process because the JAX distributed service detected fatal errors" in err
            or "Received data size doesn't match expected size" in err
        ), err[-3000:]
    assert "summary" not in out  # no report: it did not finish
    entries = Ledger(directory / "ledger.jsonl").read()
    assert not [e for e in entries if e["event"] == "stop"]  # it stopped as it was, nothing more saved
    accepted = [e for e in entries if e["event"] == "accept"]
    killed_at = {p["partition"]: p["offset"] for p in accepted[-1]["positions"]}
    assert killed_at != ends  # mid-stream

    # Both again: they resume at process 0's last checkpoint and run to the end of every partition.
    _, reports, _ = _two_processes("procs_service.py", broker.bootstrap, topic, directory, timeout=300, devices=2)
    assert reports[0]["digest"] == reports[1]["digest"]
    for report in reports:
        assert report["devices"] == 4
        assert report["summary"]["restored_from"] == accepted[-1]["checkpoint"]
        assert report["summary"]["positions"] == {f"{topic}/{p}": end for p, end in ends.items()}
    entries = Ledger(directory / "ledger.jsonl").read()
    _ledger_chains(entries, ends)  # every partition, without gap or overlap
    last = [e for e in entries if e["event"] == "accept"][-1]
    # Every record trained exactly once in the final model's lineage, but those held out for the probe.
    assert last["lineage_examples"] == sum(ends.values()) - _held_out(topic, ends)


@pytest.mark.slow
def test_a_process_stuck_with_its_heartbeats_going_on_is_named_by_the_other_which_stops_unsaved_in_bounded_time(
    broker, topic_name, tmp_path
):
    """Process 1's ledger hangs at its first window's verdict, as on a hung disk: nothing fails and JAX's
    heartbeats go on, so only the watch can end process 0's wait at its next collective."""
    import signal

    from continuity.checkpoints.ledger import Ledger
    from continuity.processes import PEER_LOST_EXIT_STATUS
    from continuity.stream import produce_records

    topic, codec = _four_partitions(broker, topic_name(), classes=10)
    for p in range(4):
        records = [(None, codec.encode(np.array([i, i]), i % 10)) for i in range(1000 * p, 1000 * p + 150)]
        produce_records(broker.bootstrap, topic, records, partition=p)
    directory = tmp_path / "checkpoints"
    _, workers = _start_two(
        "procs_service.py",
        broker.bootstrap,
        topic,
        directory,
        "scale.peer_timeout_s=20",  # above a compile on a loaded machine: own work a peer waits out
        env={"HANG_LEDGER_AT": "1:probe"},
    )
    try:
        out, err = workers[0].communicate(timeout=240)
        _, err_1 = workers[1].communicate(timeout=60)  # JAX aborts it once process 0, its coordinator, is gone
        hung = workers[1].returncode
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    assert workers[0].returncode == PEER_LOST_EXIT_STATUS, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("continuity: process 0 of 2: process 1 (")]
    assert len(said) == 1, err[-2000:] + "\n--- process 1:\n" + err_1[-3000:]
    assert "has not reached round " in said[0] and "but stuck" in said[0]  # the round after the window it hung in
    assert "raise [scale] peer_timeout_s (now 20 s); stopping without saving" in said[0]
    assert "summary" not in out
    assert hung == -signal.SIGABRT
    accepted = [e for e in Ledger(directory / "ledger.jsonl").read() if e["event"] == "accept"]
    assert len(accepted) == 1  # the window process 1 hung in is the last one either saved


def _decisions(ledger: list[dict]) -> list[tuple]:
    """The guard's decisions in a ledger, as every process of a run must take them: each window's
    verdict (over every partition), rollback and quarantine (whose positions are the process's own)."""
    same = {"probe": ("window", "to", "verdict"), "rollback": ("window", "scopes", "fired"), "quarantine": ("reason",)}
    return [
        (e["event"], *(json.dumps(e.get(k), sort_keys=True) for k in same[e["event"]]))
        for e in ledger
        if e["event"] in same
    ]


def _quadrants(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n points of the square [-1, 1)^2, labelled by their quadrant (4 classes)."""
    x = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)


@pytest.mark.slow
def test_a_poisoned_partition_of_process_1_is_rolled_back_on_both_processes_and_quarantined_by_process_1(
    broker, topic_name, tmp_path
):
    from continuity.checkpoints.ledger import Ledger
    from continuity.stream import produce_records

    topic, codec = _four_partitions(broker, topic_name(), classes=4)
    rng = np.random.default_rng(0)
    clean, poisoned = 800, range(800, 1200)  # partition 3: 800 clean, 400 mislabelled, 400 clean
    ends = {0: clean, 1: clean, 2: clean, 3: 1600}
    for p, count in ends.items():
        x, y = _quadrants(rng, count)
        if p == 3:  # a broken labeler: every label of the stretch moved to the next class
            y[poisoned.start : poisoned.stop] = (y[poisoned.start : poisoned.stop] + 1) % 4
        produce_records(
            broker.bootstrap, topic, [(None, codec.encode(x[i], int(y[i]))) for i in range(count)], partition=p
        )
    directory = tmp_path / "checkpoints"
    guarded = [
        "stream.num_classes=4",
        "learner.learning_rate=0.02",
        "replay.capacity=0",  # no replayed rows or EWC penalty to hold the model where it was: the
        "ewc.enabled=false",  # mislabelled stretch damages it whichever partitions its windows mix
        "probe.enabled=true",
        "probe.every_examples=400",
        "probe.window_examples=40",
        "probe.max_retries=0",
        "probe.tolerance=0.05",  # the probe is small (40 rows a window): a drop of 0.05 already counts
    ]
    _, reports, _ = _two_processes("procs_service.py", broker.bootstrap, topic, directory, *guarded, timeout=400)
    summaries = [r["summary"] for r in reports]
    assert reports[0]["digest"] == reports[1]["digest"]
    for summary in summaries:  # training went on to the end of every partition
        assert summary["positions"] == {f"{topic}/{p}": end for p, end in ends.items()}
    assert summaries[0]["rollbacks"] == summaries[1]["rollbacks"] >= 1
    # The same verdicts, rollbacks and quarantines on both processes, window by window.
    ledgers = [Ledger(d / "ledger.jsonl").read() for d in (directory, tmp_path / "checkpoints.process-1")]
    decisions = [_decisions(ledger) for ledger in ledgers]
    assert decisions[0] == decisions[1] and "quarantine" in {event for event, *_ in decisions[0]}
    for process, ledger in enumerate(ledgers):  # each quarantined its own partitions' records of the window
        for entry in (e for e in ledger if e["event"] == "quarantine"):
            assert {p["partition"] % 2 for p in entry["to"]} == {process}
    # Process 1 owns partition 3: it wrote the poisoned records it read; process 0 wrote none of its.
    quarantined = [
        [json.loads(line) for line in (d / "quarantine.jsonl").read_text().splitlines()]
        if (d / "quarantine.jsonl").exists()
        else []
        for d in (directory, tmp_path / "checkpoints.process-1")
    ]
    assert all(r["partition"] % 2 == 0 for r in quarantined[0])
    mine = [r["offset"] for r in quarantined[1] if r["partition"] == 3]
    assert all(r["partition"] % 2 == 1 for r in quarantined[1]) and any(o in poisoned for o in mine)
    # Training continued: a window after the last quarantine was accepted.
    entries = Ledger(directory / "ledger.jsonl").read()
    last_quarantine = max(i for i, e in enumerate(entries) if e["event"] == "quarantine")
    assert any(e["event"] == "accept" for e in entries[last_quarantine:])
