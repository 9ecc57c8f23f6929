"""The loop and the CLI when the disk fills, checkpoints rot, store.json is lost, or an operator acts between runs."""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import accepted_chain, record_scenario

from continuity.checkpoints import CheckpointStore
from continuity.cli import main
from continuity.loop import params_digest
from continuity.stream import FileSource, Positions

sys.path.insert(0, str(Path(__file__).parent))
from loop_worker import build_loop

pytestmark = pytest.mark.slow  # whole recorded streams through the loop, several times

REPO = Path(__file__).resolve().parent.parent
TOTAL = 3871  # examples the loop trains from the recording below (its probe share held out)


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """permuted-digits, 3 segments, one partition, recorded to Parquet (as tests/test_loop.py)."""
    return record_scenario(tmp_path_factory.mktemp("recording") / "stream.parquet", segments=3, seed=4)


@pytest.fixture(scope="module")
def reference(recording, tmp_path_factory) -> str:
    """The params digest of an uninterrupted run: what every run below must still end with."""
    loop = build_loop(recording, tmp_path_factory.mktemp("reference"))
    summary = loop.run()
    loop.store.close()
    assert summary.examples_trained == TOTAL and summary.checkpoint_failures == 0
    return params_digest(loop.final_state)


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)


def _assert_trained_once(chain: list[dict]) -> None:
    """The surviving lineage starts at offset 0, chains without gaps or overlaps, and trained every example."""
    assert Positions.from_json(chain[0]["from"]).offset("digits", 0) in (None, 0)
    for earlier, later in zip(chain, chain[1:]):
        assert later["from"] == earlier["positions"]
    assert chain[-1]["lineage_examples"] == TOTAL


# ---------------------------------------------------------------------------- a full disk


_FULL_DISK_LOOP = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from loop_worker import build_loop
    from continuity.loop import params_digest
    WIDE = (256,)
    # Writes past RLIMIT_FSIZE fail with EFBIG, as a full disk fails them with ENOSPC. The limit
    # lets the ledger grow but no file can hold the first kernel (64 x 256 float32, 64 KiB); with
    # smaller arrays OCDBT may spread a save over several data files that each fit, and it succeeds.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    loop = build_loop(Path(sys.argv[1]), Path(sys.argv[2]), save_retry_s=(0.05, 0.2), hidden=WIDE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, hard))
    # The disk gets room again right after the third failure, on the loop's own thread (a
    # watching thread could be starved on a loaded machine until the stream has ended).
    save_failed = loop._save_failed
    def room_again(error):
        save_failed(error)
        if loop.summary.checkpoint_failures == 3:
            with loop.store._lock:  # the writer holds it for a whole write: no save is half-done meanwhile
                leftovers = [p.name for p in loop.store.directory.iterdir() if "orbax-checkpoint-tmp" in p.name]
                numbers = loop.store.numbers()
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            print(json.dumps({"leftovers_while_full": leftovers, "numbers_while_full": numbers}), flush=True)
    loop._save_failed = room_again
    summary = loop.run()
    loop.store.close()
    print(json.dumps({**summary.to_json(), "digest": params_digest(loop.final_state)}), flush=True)
""")


def test_a_full_disk_costs_no_training_leaves_no_leftovers_and_saves_resume_when_there_is_room(recording, tmp_path):
    uninterrupted = build_loop(recording, tmp_path / "reference", hidden=(256,))
    uninterrupted.run()
    uninterrupted.store.close()
    reference = params_digest(uninterrupted.final_state)
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_LOOP, str(recording), str(tmp_path), str(REPO / "tests")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    while_full, summary = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert while_full["numbers_while_full"] == []  # no failed save became a checkpoint
    # A failed save's array writes can outlive its error and recreate its temporary directory
    # for a while: the store sweeps such a directory before the next save and when it closes.
    late_while_full = {int(name.split(".")[0]) for name in while_full["leftovers_while_full"]}
    assert summary["checkpoint_failures"] >= 3 and summary["unsaved"] is None
    assert summary["examples_trained"] == TOTAL  # training never stopped
    assert summary["digest"] == reference  # and trained exactly what an uninterrupted run trains
    directory = tmp_path / "checkpoints"
    assert _leftovers(directory) == []
    with CheckpointStore(directory, create=False) as store:
        ledger = store.ledger.read()
        failed = [e["checkpoint"] for e in ledger if e["event"] == "save_failed"]
        removed = [e["checkpoint"] for e in ledger if e["event"] == "delete" and e["reason"] == "failed save"]
        assert len(failed) == summary["checkpoint_failures"] and removed == failed
        swept = {
            e["checkpoint"] for e in ledger if e["event"] == "delete" and e["reason"] == "late writes of a failed save"
        }
        assert late_while_full <= swept <= set(failed)  # only failed saves' leftovers, every one swept
        # EFBIG, as the OS words it or as TensorStore codes it, whichever write failed first.
        first_error = next(e for e in ledger if e["event"] == "save_failed")["error"]
        assert "File too large" in first_error or f"os_error_code='{errno.EFBIG}'" in first_error, first_error
        assert not set(failed) & set(store.numbers())
        # The surviving lineage skips the failed numbers and still covers the stream once.
        chain = accepted_chain(ledger, store.last_good())
        assert not {e["checkpoint"] for e in chain} & set(failed)
        _assert_trained_once(chain)


class _CommitRecordingSource(FileSource):
    """A recorded stream that remembers which positions the loop committed."""

    commits: ClassVar[list[Positions]] = []

    def commit(self, positions: Positions) -> None:
        self.commits.append(positions)


def test_failed_saves_are_retried_with_backoff_in_one_line_each_and_offsets_never_pass_a_finalized_checkpoint(
    recording, tmp_path, reference, caplog
):
    _CommitRecordingSource.commits = []
    loop = build_loop(recording, tmp_path, source=_CommitRecordingSource, save_retry_s=(0.01, 0.04))
    real_write, failures = loop.store._write, {"left": 4}

    def flaky_write(*args):
        if failures["left"]:
            failures["left"] -= 1
            _no_space()
        return real_write(*args)

    loop.store._write = flaky_write
    with caplog.at_level(logging.ERROR, logger="continuity.loop"):
        summary = loop.run()
    loop.store.close()
    assert summary.checkpoint_failures == 4 and summary.unsaved is None
    assert params_digest(loop.final_state) == reference
    errors = [r for r in caplog.records if r.name == "continuity.loop"]
    assert len(errors) == 4 and all(r.exc_info is None and "\n" not in r.getMessage() for r in errors)
    assert [r.getMessage().split("retrying in ")[1].split(" s")[0] for r in errors] == ["0.01", "0.02", "0.04", "0.04"]
    assert all("No space left on device" in r.getMessage() for r in errors)
    ledger = CheckpointStore(tmp_path / "checkpoints", create=False).ledger.read()
    finalized = [Positions.from_json(e["positions"]) for e in ledger if e["event"] == "save"]
    assert _CommitRecordingSource.commits and all(c in finalized for c in _CommitRecordingSource.commits)
    assert len([e for e in ledger if e["event"] == "save_failed"]) == 4


class _QuietAfterRecordingSource(_CommitRecordingSource):
    """A live stream: the recording's records, then nothing more for as long as it is read."""

    read_all: ClassVar[bool] = False

    def poll(self, timeout_s: float = 0.1):
        runs = super().poll(timeout_s)
        type(self).read_all = type(self).read_all or super().finished
        return runs

    @property
    def finished(self) -> bool:
        return False


def test_a_stream_gone_quiet_still_takes_its_last_save_committing_and_serving_it_without_another_record(
    recording, tmp_path
):
    import dataclasses
    import threading
    import time

    _QuietAfterRecordingSource.commits, _QuietAfterRecordingSource.read_all = [], False
    served: list[int] = []
    stop = threading.Event()
    loop = build_loop(recording, tmp_path, source=_QuietAfterRecordingSource, live=True, stop=stop.is_set)
    loop.stream = dataclasses.replace(loop.stream, judge_idle_s=0.2)
    loop.on_accepted = lambda model: served.append(model.checkpoint)
    runner = threading.Thread(target=loop.run)
    runner.start()
    try:
        deadline, seen, still_since = time.monotonic() + 120, None, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - still_since < 5:
            now_seen = (_QuietAfterRecordingSource.read_all, loop.summary.examples_trained, loop.good_number)
            if now_seen != seen:  # reading, training or saving: not quiet yet
                seen, still_since = now_seen, time.monotonic()
            time.sleep(0.1)
        saved = loop._saved  # the last window's, judged and saved once the stream went quiet
        while time.monotonic() < deadline and not (served and served[-1] == saved.number):
            time.sleep(0.1)
        served_then, committed = list(served), list(_QuietAfterRecordingSource.commits)
    finally:
        stop.set()
        runner.join(timeout=60)
        loop.store.close()
    # The last checkpoint, saved while the stream was quiet, is served and its positions committed.
    assert seen is not None and seen[0] and seen[2] == saved.number
    assert served_then and served_then[-1] == saved.number
    assert committed and committed[-1] == saved.positions


def test_saves_failing_longer_than_max_unsaved_seconds_stop_the_run_cleanly(recording, tmp_path):
    _CommitRecordingSource.commits = []
    loop = build_loop(
        recording, tmp_path, source=_CommitRecordingSource, max_unsaved_s=0.001, save_retry_s=(0.01, 0.01)
    )
    loop.store._write = _no_space
    summary = loop.run()
    loop.store.close()
    assert summary.unsaved is not None and summary.unsaved.startswith("checkpoints could not be saved for")
    assert "checkpoints.max_unsaved_seconds = 0.001" in summary.unsaved
    assert 0 < summary.examples_trained < TOTAL and summary.checkpoint_failures >= 2
    assert _CommitRecordingSource.commits == []  # nothing finalized, nothing committed
    assert _leftovers(tmp_path / "checkpoints") == []
    with CheckpointStore(tmp_path / "checkpoints", create=False) as store:
        assert store.numbers() == []


def test_checkpoints_wait_while_dead_letters_are_held_in_memory_and_go_on_once_they_are_written(
    recording, tmp_path, caplog
):
    """Dead letters held while their file's disk is full: no checkpoint commits positions past
    them (the saves fail and retry, training goes on); once written, checkpoints follow."""
    _CommitRecordingSource.commits = []
    loop = build_loop(recording, tmp_path, source=_CommitRecordingSource, save_retry_s=(0.01, 0.01))
    held = ["dead letters not yet written to dead-letters.jsonl (No space left on device) are held in memory"]
    loop.stream.dead_letters.unwritten = lambda: held[0]  # type: ignore[method-assign]
    original = loop._train_window
    windows = []

    def train_window(*args, **kwargs):  # the disk has room again after the third window
        windows.append(1)
        if len(windows) == 4:
            held[0] = None
        return original(*args, **kwargs)

    loop._train_window = train_window  # type: ignore[method-assign]
    summary = loop.run()
    loop.store.close()
    assert summary.examples_trained == TOTAL and summary.checkpoint_failures >= 2 and summary.unsaved is None
    assert "checkpoint not saved: dead letters not yet written to dead-letters.jsonl" in caplog.text
    ledger = [json.loads(line) for line in (tmp_path / "checkpoints" / "ledger.jsonl").read_text().splitlines()]
    accepts = [e for e in ledger if e["event"] == "accept"]
    assert accepts and min(e["lineage_examples"] for e in accepts) > 1000  # none of the first windows' saves
    assert len(_CommitRecordingSource.commits) >= 1  # and then positions were committed


def test_serve_and_replay_exit_5_in_one_line_when_checkpoints_cannot_be_saved(recording, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(CheckpointStore, "_write", _no_space)
    config = tmp_path / "replay.toml"
    config.write_text("[model]\nhidden = [64]\n[probe]\nevery_examples = 400\n")
    argv = ["replay", str(recording), "--config", str(config), "--out", str(tmp_path / "run")]
    settings = ["--set", "checkpoints.every_seconds=0", "--set", "checkpoints.max_unsaved_seconds=0.001"]
    assert main(argv + settings) == 5
    captured = capsys.readouterr()
    lines = [line for line in captured.err.replace("\r", "\n").splitlines() if line.startswith("continuity:")]
    assert len(lines) == 1 and lines[0].startswith("continuity: checkpoints could not be saved for")
    assert "checkpoint failures" in captured.out
    # Never stopped by the limit, the run still says at the end that its model is not saved.
    assert main(argv + ["--set", "checkpoints.max_unsaved_seconds=0", "--out", str(tmp_path / "run2")]) == 5
    lines = [
        line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("continuity:")
    ]
    assert len(lines) == 1 and "is not checkpointed" in lines[0]


# ---------------------------------------------------------------------------- recordings that rot


def _damaged_copy(recording: Path, out: Path, column: str, group: int) -> None:
    """`recording` rewritten in row groups of 4,096 rows (what the file source reads at a time),
    with the first page header of `column` in row group `group` overwritten with junk."""
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(recording), out, row_group_size=4096)
    metadata = pq.ParquetFile(out).metadata.row_group(group)
    chunk = next(c for c in (metadata.column(i) for i in range(metadata.num_columns)) if c.path_in_schema == column)
    data = bytearray(out.read_bytes())
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data[start : start + 64] = b"\xff" * 64  # no reader takes this for a page header
    out.write_bytes(bytes(data))


def test_a_damaged_recording_trains_up_to_the_damage_saves_and_stops_in_one_line_exit_2_and_resumes_when_whole(
    recording, tmp_path, capsys
):
    damaged = tmp_path / "damaged.parquet"
    _damaged_copy(recording, damaged, "value", 1)
    before = 4096  # the first row group, whole
    run = tmp_path / "run"
    settings = ["--set", "probe.every_examples=1000", "--set", "checkpoints.every_seconds=3600"]
    assert main(["replay", str(damaged), "--out", str(run), *settings]) == 2
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("continuity:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"continuity: error: recording {str(damaged)!r} is damaged after its first {before:,} records: "
    )
    assert lines[0].endswith("; the run stopped there: a restart resumes from the last checkpoint")

    # What was trained before the damage and accepted is saved, though no save was due yet.
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    (failed,) = [e for e in ledger if e["event"] == "source_failed"]
    saved = Positions.from_json(failed["positions"]).offset("digits", 0)
    assert 0 < saved <= before and any(e["event"] == "save" for e in ledger)

    # The recording made whole again: the replay resumes there and trains the rest, each example once.
    assert main(["replay", str(recording), "--out", str(run), *settings]) == 0
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    (restore,) = [e for e in ledger if e["event"] == "restore"]
    assert Positions.from_json(restore["positions"]).offset("digits", 0) == saved
    chain = accepted_chain(ledger, max(e["checkpoint"] for e in ledger if e["event"] == "accept"))
    _assert_trained_once(chain)


def test_a_recording_whose_offsets_cannot_be_read_is_refused_in_one_line_exit_2_before_training(
    recording, tmp_path, capsys
):
    damaged = tmp_path / "damaged.parquet"
    _damaged_copy(recording, damaged, "offset", 1)
    assert main(["replay", str(damaged), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"continuity: error: recording {str(damaged)!r} is damaged: its offsets cannot be read (")
    assert err.count("\n") == 1
    assert not (tmp_path / "run" / "ledger.jsonl").exists()


# ---------------------------------------------------------------------------- checkpoints that rot


def _flip(step_dir: Path) -> None:
    biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    biggest.write_bytes(bytes(data))


def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_and_all_corrupt_refuses_to_start_fresh(
    recording, tmp_path, capsys, caplog
):
    directory = tmp_path / "run"
    config = tmp_path / "continuity.toml"
    config.write_text(
        f'[stream]\nbootstrap = "127.0.0.1:9"\n[model]\nhidden = [64]\n[probe]\nevery_examples = 400\n'
        f'[checkpoints]\ndir = "{directory}"\nkeep_last = 5\nevery_seconds = 0\n[service]\nhttp_port = 0\n'
    )
    assert main(["replay", str(recording), "--config", str(config)]) == 0
    with CheckpointStore(directory, create=False) as store:
        numbers, newest = store.numbers(), store.last_good()
    assert len(numbers) == 5 and newest == numbers[-1]
    # The newest rots: the next start restores the one before it, and says so.
    _flip(directory / str(newest))
    with caplog.at_level(logging.WARNING):
        assert main(["replay", str(recording), "--config", str(config)]) == 0
    # Where the flipped bytes land decides who notices: the array decoder, or the content digest.
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"checkpoint {newest} is corrupt: ")]
    assert len(skipped) == 1 and ("its arrays cannot be read" in skipped[0] or "state array" in skipped[0])
    assert skipped[0].endswith("; trying the previous good checkpoint") and "\n" not in skipped[0]
    with CheckpointStore(directory, create=False) as store:
        restore = [e for e in store.ledger.read() if e["event"] == "restore"][-1]
        assert restore["checkpoint"] == numbers[-2]
        numbers = store.numbers()
    # Every checkpoint rots: serve refuses to start over from the stream's start.
    for number in numbers:
        _flip(directory / str(number))
    capsys.readouterr()
    assert main(["serve", "--config", str(config)]) == 2
    banner, err = capsys.readouterr().err.splitlines()  # "continuity serve: ... HTTP on ...", then the one error
    assert banner.startswith("continuity serve: ") and err.startswith("continuity: error: ")
    assert "but none can be restored" in err and "--start-fresh" in err and "checkpoints verify" in err
    assert main(["replay", str(recording), "--config", str(config)]) == 2
    capsys.readouterr()
    # Told to, it does: a new model, numbered after the old ones.
    assert main(["replay", str(recording), "--config", str(config), "--start-fresh"]) == 0
    with CheckpointStore(directory, create=False) as store:
        ledger = store.ledger.read()
        assert [e for e in ledger if e["event"] == "start"][-1]["fresh"] is True
        assert store.last_good() > max(numbers)
        assert accepted_chain(ledger, store.last_good())[0]["parent"] is None


def test_serve_rebuilds_a_garbled_store_file_with_a_warning(recording, tmp_path, caplog, capsys):
    directory = tmp_path / "run"
    config = tmp_path / "replay.toml"
    config.write_text(
        f'[model]\nhidden = [64]\n[probe]\nevery_examples = 400\n[checkpoints]\ndir = "{directory}"\nkeep_last = 5\n'
        "every_seconds = 0\n"
    )
    assert main(["replay", str(recording), "--config", str(config)]) == 0
    with CheckpointStore(directory, create=False) as store:
        pinned = store.numbers()[0]
    assert main(["checkpoints", "pin", str(pinned), "--dir", str(directory)]) == 0
    (directory / "store.json").write_text('{"schema_version": 2, "pinned": [')
    with caplog.at_level(logging.WARNING, logger="continuity.checkpoints.store"):
        assert main(["replay", str(recording), "--config", str(config)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "continuity.checkpoints.store"]
    assert len(warnings) == 1 and "is not a readable store file" in warnings[0] and "rebuilt" in warnings[0]
    with CheckpointStore(directory, create=False) as store:
        assert store.info(pinned).pinned  # the pin survived the garbled file
        assert any(e["event"] == "repair" for e in store.ledger.read())


# ---------------------------------------------------------------------------- an operator acts on a stopped service


def test_a_rollback_and_a_pin_made_while_stopped_outlive_the_next_runs_saves_and_retention(
    recording, tmp_path, reference, capsys
):
    first = build_loop(recording, tmp_path, max_examples=2000, keep_last=2)
    first.run()
    first.store.close()
    directory = tmp_path / "checkpoints"
    with CheckpointStore(directory, create=False) as store:
        older, newest = store.numbers()[-2:]
    assert main(["rollback", "--dir", str(directory), "--to", str(older), "--reason", "bad upstream"]) == 0
    assert main(["checkpoints", "pin", str(newest), "--dir", str(directory)]) == 0  # pinned though abandoned
    assert capsys.readouterr().out.splitlines()[0].startswith(f"the next start restores checkpoint {older}")

    second = build_loop(recording, tmp_path, keep_last=2)
    summary = second.run()
    second.store.close()
    assert summary.restored_from == older
    with CheckpointStore(directory, create=False) as store:
        ledger = store.ledger.read()
        numbers = store.numbers()
        assert newest in numbers and store.info(newest).pinned and store.info(newest).abandoned
        assert len(numbers) == 3  # keep_last=2 and the pin: retention ran, and kept the pin
        restarted = ledger.index([e for e in ledger if e["event"] == "restore"][-1])
        first_accept = next(e for e in ledger[restarted:] if e["event"] == "accept")
        assert first_accept["parent"] == older and first_accept["checkpoint"] > newest
        chain = accepted_chain(ledger, store.last_good())
        assert older in [e["checkpoint"] for e in chain] and newest not in [e["checkpoint"] for e in chain]
        _assert_trained_once(chain)
    assert params_digest(second.final_state) == reference  # every record trained once in the surviving lineage
