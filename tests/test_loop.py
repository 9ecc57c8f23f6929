"""The training loop with its guard, end to end over recorded and synthetic streams."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import accepted_chain, record_scenario

from continuity.benchmarks.guard import DIGITS_GUARD, run_scenario_through_loop
from continuity.checkpoints import CheckpointStore
from continuity.guard import GuardConfig
from continuity.loop import REGRESSION_STREAK, params_digest
from continuity.stream import Positions, ScenarioSource, make_codec
from continuity.stream.scenarios import make_scenario

sys.path.insert(0, str(Path(__file__).parent))
from loop_worker import SPEC, build_loop, outcome_line

pytestmark = pytest.mark.slow  # the training loop over whole streams, with restarts

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """permuted-digits, 3 segments, one partition, recorded to Parquet."""
    return record_scenario(tmp_path_factory.mktemp("recording") / "stream.parquet", segments=3, seed=4)


def _offset(positions_json) -> int:
    return Positions.from_json(positions_json).offset("digits", 0) or 0


def test_killed_and_restarted_run_ends_bit_identical_with_every_record_trained_once(recording, tmp_path):
    """The killed runs train 8 updates per dispatch, the reference one: the same model all the same,
    and the same since-start prequential accuracy over the same count of records."""
    reference = build_loop(recording, tmp_path / "reference")
    reference.run()
    reference.store.close()
    expected = outcome_line(reference)

    directory = tmp_path / "killed"
    directory.mkdir()
    ledger_path = directory / "checkpoints" / "ledger.jsonl"
    command = [sys.executable, str(REPO / "tests" / "loop_worker.py"), str(recording), str(directory), "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    chooser = random.Random(7)
    kills = 0
    for _ in range(3):
        accepts_before = _count(ledger_path, "accept")
        worker = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        # Let it get some way in (one to three new accepted windows), then kill it without warning,
        # at a random moment of the window in progress.
        target = accepts_before + chooser.randint(1, 3)
        while _count(ledger_path, "accept") < target and worker.poll() is None:
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.01)
        time.sleep(chooser.uniform(0.0, 0.05))
        if worker.poll() is None:
            worker.send_signal(signal.SIGKILL)
            kills += 1
        worker.wait()
    assert kills >= 2
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip().splitlines()[-1] == expected

    # The ledger shows the surviving lineage trained every record exactly once.
    ledger = CheckpointStore(directory / "checkpoints", create=False).ledger.read()
    assert sum(e["event"] == "restore" for e in ledger) >= 2
    final = CheckpointStore(directory / "checkpoints", create=False).last_good()
    chain = accepted_chain(ledger, final)
    assert _offset(chain[0]["from"]) == 0
    for earlier, later in zip(chain, chain[1:]):
        assert later["from"] == earlier["positions"]  # contiguous: no gap, no overlap
    total_records = len(
        ScenarioSource(make_scenario("permuted-digits", segments=3, seed=4), make_codec("binary", SPEC))
    )
    assert _offset(chain[-1]["positions"]) == total_records
    assert chain[-1]["lineage_examples"] == reference.summary.examples_trained


def test_k_updates_per_dispatch_train_the_same_model_and_ledger_as_one_without_recompiling(recording, tmp_path):
    """Windows of 400 examples end inside stacks of 8 micro-batches (the stack is sent short
    there): the windows, positions, probe verdicts and the model are those of K = 1, and the
    short stacks ran on the one compiled step."""
    runs = {}
    for k in (1, 8):
        loop = build_loop(recording, tmp_path / f"k{k}", steps_per_dispatch=k)
        summary = loop.run()
        loop.store.close()
        ledger = CheckpointStore(tmp_path / f"k{k}" / "checkpoints", create=False).ledger.read()
        runs[k] = (params_digest(loop.final_state), summary, _by_thread(ledger), loop.learner)
    (digest_1, summary_1, ledger_1, _), (digest_8, summary_8, ledger_8, learner_8) = runs[1], runs[8]
    assert digest_8 == digest_1
    assert ledger_8 == ledger_1 and sum(e["event"] == "probe" for e in ledger_8[0]) > 2
    assert (summary_8.examples_trained, summary_8.windows) == (summary_1.examples_trained, summary_1.windows)
    assert learner_8.train_steps._cache_size() == 1


def _by_thread(ledger: list[dict]) -> tuple[list[dict], list[dict]]:
    """The loop's events and the checkpoint writer's (a save finalized, retention), each in its
    own order and without what depends on the clock: the writer's land between the loop's
    wherever a save happens to finish."""
    events = [{k: v for k, v in e.items() if k not in ("time", "wall_seconds", "guard_seconds")} for e in ledger]
    writers = ("save", "save_failed", "delete")
    return [e for e in events if e["event"] not in writers], [e for e in events if e["event"] in writers]


def _count(ledger: Path, event: str) -> int:
    if not ledger.exists():
        return 0
    count = 0
    for line in ledger.read_text().splitlines():
        try:
            count += json.loads(line)["event"] == event
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return count


def test_a_live_stream_closes_windows_on_time_a_recorded_one_by_count_only(recording, tmp_path):
    # probe.every_seconds: a slow live stream is still judged regularly, while a replay's
    # windows depend on its records alone (so replays stay bit-identical).
    by_time = GuardConfig(every_examples=10**9, every_seconds=0.05)
    windows = {}
    for live in (False, True):
        loop = build_loop(recording, tmp_path / f"live-{live}", guard=by_time, live=live)
        windows[live] = loop.run().windows
        loop.store.close()
    assert windows[False] == 1  # the end of the stream closes the only window
    assert windows[True] > 1


def test_restart_restores_state_positions_and_probe(recording, tmp_path):
    first = build_loop(recording, tmp_path)
    first.max_examples = 1500
    first.run()
    first.store.close()  # its retention deletes in the background; a second store must not race it
    store = CheckpointStore(tmp_path / "checkpoints", create=False)
    saved = store.info(store.last_good()).metadata
    second = build_loop(recording, tmp_path)
    state, good = second._restore_or_start()
    assert good.positions == Positions.from_json(saved["positions"])
    assert params_digest(state) == params_digest(first.final_state)
    assert good.probe.segments == saved["probe_store"]["segments"]
    assert len(good.probe) > 0


def test_checkpoint_cadence_changes_what_is_saved_never_the_model(recording, tmp_path):
    """Every window is judged either way; a long interval saves only the final checkpoint, and
    that checkpoint still covers the whole stream and holds the same model."""
    every_window = build_loop(recording, tmp_path / "every-window")
    every_window.run()
    every_window.store.close()
    sparse = build_loop(recording, tmp_path / "sparse")
    sparse.checkpoint_every_s = 3600.0
    summary = sparse.run()
    sparse.store.close()

    assert params_digest(sparse.final_state) == params_digest(every_window.final_state)
    assert summary.windows == every_window.summary.windows > 2
    ledger = CheckpointStore(tmp_path / "sparse" / "checkpoints", create=False).ledger.read()
    accepts = [e for e in ledger if e["event"] == "accept"]
    assert len(accepts) == 1  # the stream end: the only save
    assert _offset(accepts[0]["from"]) == 0 and accepts[0]["positions"] == summary_positions(every_window)
    assert sum(e["event"] == "probe" for e in ledger) == summary.windows


def summary_positions(loop) -> dict:
    return CheckpointStore(loop.store.directory, create=False).info(loop.good_number).metadata["positions"]


@pytest.fixture(scope="module")
def guard_runs():
    """The same permuted-digits stream clean, poisoned unguarded, and poisoned guarded (digits cadence)."""
    clean = make_scenario("permuted-digits", segments=6, seed=0)
    poisoned = make_scenario("permuted-digits", segments=6, seed=0, poison=5)
    guard = DIGITS_GUARD
    return {
        "clean": run_scenario_through_loop(clean, guard=guard, seed=0),
        "unguarded": run_scenario_through_loop(poisoned, guard=replace(guard, enabled=False), seed=0),
        "guarded": run_scenario_through_loop(poisoned, guard=guard, seed=0),
    }


def test_a_clean_drifting_stream_triggers_no_rollback(guard_runs):
    assert guard_runs["clean"]["rollbacks"] == 0
    assert guard_runs["clean"]["quarantined_records"] == 0


def test_the_guard_holds_accuracy_against_a_broken_labeler(guard_runs):
    def clean_segments(run):  # the poisoned slot (5) differs between the streams; compare the rest
        return float(np.mean(run["test_accuracy"][:5]))

    clean, unguarded, guarded = (clean_segments(guard_runs[k]) for k in ("clean", "unguarded", "guarded"))
    assert guarded >= 0.98 * clean
    assert guard_runs["guarded"]["rollbacks"] >= 1 and guard_runs["guarded"]["quarantined_records"] > 0
    # Without the guard the segment whose inputs the labeler reused is wrecked.
    assert guard_runs["unguarded"]["test_accuracy"][0] < guard_runs["clean"]["test_accuracy"][0] - 0.2
    assert unguarded < 0.97 * clean
    print(
        f"\nclean {clean:.3f}  unguarded {unguarded:.3f} ({unguarded / clean:.3f})  "
        f"guarded {guarded:.3f} ({guarded / clean:.3f})"
    )


def test_windows_that_keep_regressing_are_reported_to_the_operator(caplog):
    # A broken labeler (every label wrong) over the last segment, judged every 200 examples:
    # its windows regress one after another, and a quarantine learns nothing from them.
    poisoned = make_scenario("permuted-digits", segments=2, seed=0, poison=1, poison_mode="flip")
    with caplog.at_level(logging.WARNING, logger="continuity.loop"):
        run = run_scenario_through_loop(poisoned, guard=replace(DIGITS_GUARD, every_examples=200), seed=0)
    streaks = [r.getMessage() for r in caplog.records if "windows in a row regressed" in r.getMessage()]
    assert run["rollbacks"] >= REGRESSION_STREAK
    assert streaks and streaks[0].startswith(f"{REGRESSION_STREAK} windows in a row regressed")
    assert "nothing has been learned since checkpoint" in streaks[0]
