"""CheckpointStore on real Orbax directories, the retention rule, and the ledger."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from continuity.checkpoints import (
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointStore,
    CorruptCheckpointError,
    Ledger,
    checkpoints_to_delete,
)
from continuity.checkpoints import ledger as ledger_module
from continuity.checkpoints import store as store_module
from continuity.checkpoints.integrity import leaves_by_path

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def learner():
    from continuity.factory import learner_for
    from continuity.learner import EWCConfig, LearnerConfig, ReplayConfig

    return learner_for(LearnerConfig(replay=ReplayConfig(capacity=64), ewc=EWCConfig(enabled=True)), (8, 8, 1), 10)


def _batch(seed: int):
    from continuity.learner import Batch

    rng = np.random.default_rng(seed)
    return Batch(
        x=rng.normal(size=(32, 8, 8, 1)).astype(np.float32),
        y=rng.integers(0, 10, 32).astype(np.int32),
        mask=np.ones(32, bool),
    )


@pytest.fixture(scope="module")
def trained(learner):
    """A learner state after a few steps: non-trivial params, optimizer moments and replay."""
    state = learner.init(0)
    for seed in range(3):
        state, _ = learner.train_step(state, _batch(seed))
    return state


def _small_state(value: float) -> dict:
    return {
        "params": {"w": np.full((4, 3), value, np.float32), "b": np.arange(3, dtype=np.float32)},
        "step": np.int32(value),
    }


def _small_like() -> dict:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), _small_state(0))


def _host_copy(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def _assert_identical(expected, actual):
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(actual)):
        b = np.asarray(b)
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        assert a.shape == b.shape, jax.tree_util.keystr(path)
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)  # bit-exact, NaN-safe


# ---------------------------------------------------------------------------- ledger


def test_ledger_appends_json_lines_with_numpy_values_and_domain_objects(tmp_path):
    from continuity.stream import Positions

    ledger = Ledger(tmp_path / "ledger.jsonl")
    record = ledger.append(
        "probe",
        accuracy=np.float32(0.5),
        per_segment=np.array([0.25, 1.0]),
        positions=Positions({("t", 0): 12}),
        p_value=float("nan"),
        step=np.int64(7),
    )
    assert record["event"] == "probe" and isinstance(record["time"], float)
    events = ledger.read()
    assert events == [json.loads(json.dumps(record))]
    assert events[0]["per_segment"] == [0.25, 1.0]
    assert events[0]["positions"] == [{"topic": "t", "partition": 0, "offset": 12}]
    assert events[0]["p_value"] is None and events[0]["step"] == 7
    with pytest.raises(TypeError, match="`blob`"):
        ledger.append("bad", blob=object())
    with pytest.raises(ValueError, match="time"):
        ledger.append("bad", time=1)
    assert len(ledger.read()) == 1


def test_ledger_ignores_a_torn_line_and_keeps_appending_after_it(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append("save", checkpoint=1)
    with open(path, "a") as handle:
        handle.write('{"event": "save", "checkp')  # a crash mid-write
    assert [e["checkpoint"] for e in ledger.read()] == [1]
    ledger.append("save", checkpoint=2)
    assert [e["checkpoint"] for e in ledger.read()] == [1, 2]
    assert Ledger(tmp_path / "missing.jsonl").read() == []


def test_ledger_events_of_some_kinds_parse_only_those_lines_in_order_and_skip_torn_ones(tmp_path, monkeypatch, caplog):
    """What looks for a few kinds (a store's corruption findings, read at each `info`) must not
    parse a service's every probe event: hundreds of MB a day."""
    from continuity.checkpoints import ledger as ledger_module

    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    for number in range(1, 4):
        ledger.append("probe", window=number, detail="x" * 1000)
        ledger.append("skip" if number == 2 else "verify", checkpoint=number, result="ok")
    with open(path, "a") as handle:
        handle.write('{"event":"verify","checkp\n')  # a crash mid-write, then more lines
    ledger.append("skipped_not_skip", checkpoint=9)  # a kind that only starts like a wanted one
    ledger.append("verify", checkpoint=4, result="corrupt")
    parsed = []
    loads = ledger_module.json.loads
    monkeypatch.setattr(ledger_module.json, "loads", lambda text, *a, **k: parsed.append(text) or loads(text, *a, **k))
    events = list(ledger.events("skip", "verify"))
    assert [(e["event"], e["checkpoint"]) for e in events] == [("verify", 1), ("skip", 2), ("verify", 3), ("verify", 4)]
    assert not any('"event":"probe"' in text for text in parsed)  # probe lines were never parsed
    assert caplog.text.count("skipping torn line") == 1
    assert [e["event"] for e in ledger.read()].count("probe") == 3  # all kinds, as before


# ---------------------------------------------------------------------------- retention rule


def test_retention_keeps_newest_last_good_and_pinned():
    numbers = range(1, 9)
    assert checkpoints_to_delete(numbers, keep_last=2, last_good=4, pinned=[1]) == [2, 3, 5, 6]
    assert checkpoints_to_delete(numbers, keep_last=3, last_good=None) == [1, 2, 3, 4, 5]
    assert checkpoints_to_delete([], keep_last=1, last_good=None) == []
    assert checkpoints_to_delete([3], keep_last=1, last_good=3, pinned=[3]) == []
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`keep_last`.*Got"):
            checkpoints_to_delete(numbers, keep_last=bad, last_good=None)


# ---------------------------------------------------------------------------- store: opening


def test_options_and_missing_directories_are_reported(tmp_path):
    with pytest.raises(ValueError, match="`keep_last` must be an integer >= 1. Got 0"):
        CheckpointStore(tmp_path / "s", keep_last=0)
    with pytest.raises(CheckpointNotFoundError, match="no-such-dir"):
        CheckpointStore(tmp_path / "no-such-dir", create=False)
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="plain.*not a checkpoint store"):
        CheckpointStore(tmp_path / "plain", create=False)
    with CheckpointStore(tmp_path / "s") as store:
        assert store.list() == [] and store.last_good() is None
        assert store.restore_latest(state_like=_small_like()) is None
        with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint 3 .*\(checkpoints: none\)"):
            store.info(3)


def test_save_validates_status_and_metadata_in_the_caller(tmp_path):
    with CheckpointStore(tmp_path) as store:
        with pytest.raises(ValueError, match=r"""`metadata\["status"\]` must be 'good' or 'regressed'. Got 'ok'"""):
            store.save(_small_state(1), {}, {"status": "ok"})
        with pytest.raises(TypeError, match="`metadata.report`"):
            store.save(_small_state(1), {}, {"status": "good", "report": object()})
        assert store.numbers() == []


# ---------------------------------------------------------------------------- store: round trip


def test_save_then_restore_a_learner_state_bit_exactly_even_after_donation(tmp_path, learner, trained):
    from continuity.stream import Positions

    state = jax.tree.map(lambda a: a.copy(), trained)  # our own buffers: train_step donates them
    expected = _host_copy(state)
    probe = {
        "x": np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32),
        "y": np.arange(5, dtype=np.int32),
    }
    positions = Positions({("t", 0): 1200, ("t", 1): 980})
    with CheckpointStore(tmp_path) as store:
        number = store.save(
            state,
            probe,
            {"status": "good", "learner_step": 3, "positions": positions, "probe": {"accuracy": np.float64(0.75)}},
        )
        # The caller donates the state right after save returns: the checkpoint must not see it.
        state, _ = learner.train_step(state, _batch(99))
        state, _ = learner.train_step(state, _batch(98))
        store.wait()
        assert number == 1
        for state_like in (jax.eval_shape(lambda: learner.init(1)), learner.init(1)):
            restored = store.restore(number, state_like=state_like, probe_like=probe)
            _assert_identical(expected, restored.state)
            assert type(restored.state) is type(trained)
            assert list(restored.state.params["hidden"]) == [0, 1]  # nnx's int keys come back as ints
            _assert_identical(probe, restored.probe)
        metadata = restored.metadata
        assert metadata["status"] == "good" and metadata["checkpoint"] == 1 and metadata["schema_version"] == 2
        assert restored.verified
        assert set(metadata["integrity"]["state"]) == {path for path, _ in leaves_by_path(expected)}
        assert Positions.from_json(metadata["positions"]) == positions
        assert metadata["probe"] == {"accuracy": 0.75} and metadata["saved_at"] > 0
        # Without a probe target the arrays still come back.
        _assert_identical(probe, jax.tree.map(np.asarray, store.restore(1, state_like=state_like).probe))


def test_host_arrays_mutated_in_place_after_save_do_not_reach_the_checkpoint(tmp_path):
    # The probe store's reservoirs are NumPy arrays updated in place; Orbax copies them too.
    state = {"w": np.zeros(4_000_000, np.float32)}
    probe = {"x": np.zeros(4_000_000, np.float32)}
    with CheckpointStore(tmp_path) as store:
        store.save(state, probe, {"status": "good"})
        state["w"] += 1
        probe["x"] += 1
        store.wait()
        restored = store.restore(1, state_like=state, probe_like=probe)
        assert not np.asarray(restored.state["w"]).any() and not np.asarray(restored.probe["x"]).any()


def test_a_target_that_does_not_match_is_a_value_error_not_corruption(tmp_path, learner, trained):
    like = jax.eval_shape(lambda: learner.init(0))
    narrower = like.replace(
        params={
            **like.params,
            "head": {"bias": jax.ShapeDtypeStruct((7,), np.float32), "kernel": like.params["head"]["kernel"]},
        }
    )
    with CheckpointStore(tmp_path) as store:
        store.save(trained, {}, {"status": "good"})
        store.wait()
        with pytest.raises(
            ValueError,
            match=r"`state_like` does not match checkpoint 1: params/head/bias: "
            r"checkpoint shape \(10,\), state_like \(7,\)",
        ):
            store.restore(1, state_like=narrower)
        with pytest.raises(ValueError, match="not in state_like: step"):
            store.restore(1, state_like={k: v for k, v in vars(like).items() if k != "step"})
        with pytest.raises(ValueError, match="does not match"):
            store.restore_latest(state_like=narrower)
        assert store.ledger.read()[-1]["event"] == "save"  # nothing skipped


def test_empty_probe_and_numbers_listing(tmp_path):
    with CheckpointStore(tmp_path) as store:
        assert store.save(_small_state(1), {}, {"status": "good", "learner_step": 10}) == 1
        assert store.save(_small_state(2), {}, {"status": "regressed", "learner_step": 20}) == 2
        store.wait()
        restored = store.restore(2, state_like=_small_like())
        assert restored.probe == {}
        _assert_identical(_small_state(2), restored.state)
        infos = store.list()
        assert [(i.number, i.status, i.metadata["learner_step"]) for i in infos] == [
            (1, "good", 10),
            (2, "regressed", 20),
        ]
        assert store.last_good() == 1
    # Another process sees the same, from the JSON items alone.
    reopened = CheckpointStore(tmp_path, create=False)
    assert [i.status for i in reopened.list()] == ["good", "regressed"]
    assert reopened.info(1).saved_at > 0
    reopened.close()


# ---------------------------------------------------------------------------- retention, pins, head


def test_retention_never_deletes_the_last_good_or_a_pinned_checkpoint(tmp_path):
    statuses = ["good", "good", "good", "good", "regressed", "regressed", "regressed"]
    with CheckpointStore(tmp_path, keep_last=2) as store:
        for i, status in enumerate(statuses):
            number = store.save(_small_state(i), {}, {"status": status})
            if number == 2:
                store.wait()
                store.pin(2)
        store.wait()
        assert store.numbers() == [2, 4, 6, 7]
        assert store.last_good() == 4
        assert [i.pinned for i in store.list()] == [True, False, False, False]
        deleted = [e["checkpoint"] for e in store.ledger.read() if e["event"] == "delete"]
        assert sorted(deleted) == [1, 3, 5]
        _assert_identical(_small_state(3), store.restore_latest(state_like=_small_like()).state)
        # The pin persists in store.json and survives reopening; unpinning lets retention take it.
        assert CheckpointStore(tmp_path, create=False).info(2).pinned
        store.unpin(2)
        store.save(_small_state(9), {}, {"status": "regressed"})
        store.wait()
        assert store.numbers() == [4, 7, 8]
    # Orbax deletes in the background; close() waits for it, so the disk agrees now.
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [4, 7, 8]
    events = [e["event"] for e in Ledger(tmp_path / "ledger.jsonl").read()]
    assert events.count("save") == 8 and "pin" in events and "unpin" in events


def test_retention_leaves_a_directory_named_like_a_checkpoint_but_holding_none_alone(tmp_path, caplog):
    import logging

    with CheckpointStore(tmp_path, keep_last=2) as store:
        store.save(_small_state(1), {}, {"status": "good"})
        store.wait()
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "notes.txt").write_text("an operator's")
    with caplog.at_level(logging.WARNING), CheckpointStore(tmp_path, keep_last=2) as store:
        for i in range(3):
            store.save(_small_state(i), {}, {"status": "good"})
            store.wait()
    assert (tmp_path / "0" / "notes.txt").read_text() == "an operator's"
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [0, 3, 4]
    assert f"retention leaves {tmp_path / '0'} alone: named like checkpoints, but holding none" in caplog.text


def test_a_lock_file_removed_under_its_owner_is_taken_again_at_the_next_save_or_refuses_a_second_writer(
    tmp_path, caplog
):
    import logging

    from continuity.checkpoints import StoreLockedError

    with CheckpointStore(tmp_path / "a", keep_last=5) as owner:
        owner.save(_small_state(1), {}, {"status": "good"})
        owner.wait()
        (tmp_path / "a" / "store.lock").unlink()  # a clean-up job, an operator
        with caplog.at_level(logging.WARNING):
            owner.save(_small_state(2), {}, {"status": "good"})
            owner.wait()
        assert "store.lock was removed while this store owned it (checkpoints missing now: none); locked it again" in (
            caplog.text
        )
        with pytest.raises(StoreLockedError):  # the lock a second writer would find is held again
            CheckpointStore(tmp_path / "a")

    with CheckpointStore(tmp_path / "b", keep_last=5) as first:
        first.save(_small_state(1), {}, {"status": "good"})
        first.wait()
        (tmp_path / "b" / "store.lock").unlink()
        with CheckpointStore(tmp_path / "b", keep_last=5) as second:  # it found no lock: it owns the store now
            with pytest.raises(CheckpointSaveError, match=r"its store.lock was removed, and .* has locked it since"):
                first.save(_small_state(2), {}, {"status": "good"})
            assert second.save(_small_state(3), {}, {"status": "good"}) == 2
            second.wait()
    # The first wrote nothing more: 2 is the second's.
    assert sorted(int(p.name) for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == [1, 2]


def test_rollback_head_abandons_newer_checkpoints_and_numbers_keep_increasing(tmp_path):
    with CheckpointStore(tmp_path, keep_last=5) as store:
        for i in range(4):
            store.save(_small_state(i), {}, {"status": "good" if i < 3 else "regressed"})
        with pytest.raises(ValueError, match="checkpoint 4 has status 'regressed'"):
            store.set_head(4, reason="test")
        with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint 9 .*\(checkpoints: 1, 2, 3, 4\)"):
            store.set_head(9, reason="test")
        store.set_head(2, reason="bad data after 2")
        assert store.head == 2 and store.last_good() == 2
        assert [(i.number, i.abandoned, i.head) for i in store.list()] == [
            (1, False, False),
            (2, False, True),
            (3, True, False),
            (4, True, False),
        ]
        assert store.restore_latest(state_like=_small_like()).number == 2
        rollback = store.ledger.read()[-1]
        assert rollback["event"] == "rollback" and rollback["checkpoint"] == 2 and rollback["abandoned"] == [3, 4]
        assert rollback["reason"] == "bad data after 2"
    # The head is in store.json: a fresh process restores it too.
    with CheckpointStore(tmp_path, keep_last=5) as store:
        assert store.restore_latest(state_like=_small_like()).number == 2
        # The next save continues the numbering and becomes the lineage: the head clears.
        assert store.save(_small_state(7), {}, {"status": "good"}) == 5
        store.wait()
        assert store.head is None and store.last_good() == 5
        assert store.restore_latest(state_like=_small_like()).number == 5
        assert [i.abandoned for i in store.list()] == [False, False, True, True, False]
        assert store.newest_good() == 5


def test_a_checkpoint_this_process_may_not_read_is_not_taken_for_corruption_nor_abandoned(tmp_path, monkeypatch):
    """A permission fixed later must find the checkpoint still there: a read refused is not a corrupt one."""

    from continuity.checkpoints import StoreAccessError

    with CheckpointStore(tmp_path, keep_last=5) as store:
        for i in range(2):
            store.save(_small_state(i), {}, {"status": "good"})
    unreadable = tmp_path / "2" / "state"
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != unreadable and access(path, mode))
    with CheckpointStore(tmp_path, keep_last=5) as store:
        with pytest.raises(StoreAccessError) as refused:
            store.restore_latest(state_like=_small_like())
        assert str(refused.value) == f"cannot use {tmp_path} as a checkpoint store: Permission denied ({unreadable})"
        assert not [info.number for info in store.list() if info.abandoned]
    monkeypatch.undo()  # the permission fixed
    with CheckpointStore(tmp_path, keep_last=5) as store:
        assert store.restore_latest(state_like=_small_like()).number == 2


# ---------------------------------------------------------------------------- corruption and crashes


def _data_files(step_dir: Path) -> list[Path]:
    return [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)  # Orbax: "Event loop is closed" after a failed read
def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_good_one(tmp_path):
    with CheckpointStore(tmp_path) as store:
        store.save(_small_state(1), {}, {"status": "good"})
        store.save(_small_state(2), {}, {"status": "good"})
        store.wait()
    for path in _data_files(tmp_path / "2"):
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncate every data file
    skipped = []
    with CheckpointStore(tmp_path, create=False, owner=True) as store:
        with pytest.raises(CorruptCheckpointError, match="checkpoint 2 is corrupt"):
            store.restore(2, state_like=_small_like())
        restored = store.restore_latest(state_like=_small_like(), on_skip=lambda n, e: skipped.append((n, e)))
        assert restored.number == 1
        _assert_identical(_small_state(1), restored.state)
        assert [n for n, _ in skipped] == [2] and isinstance(skipped[0][1], CorruptCheckpointError)
        skip = [e for e in store.ledger.read() if e["event"] == "skip"]
        assert [e["checkpoint"] for e in skip] == [2] and "corrupt" in skip[0]["error"]
        assert store.last_good() == 1 and store.info(2).abandoned
        # Nothing was deleted by restoring.
        assert store.numbers() == [1, 2]


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)  # Orbax: "Event loop is closed" after a failed read
def test_deleted_data_files_and_bad_json_are_corruption_too(tmp_path):
    with CheckpointStore(tmp_path) as store:
        for i in range(3):
            store.save(_small_state(i), {}, {"status": "good"})
        store.wait()
    for path in _data_files(tmp_path / "3"):
        path.unlink()
    (tmp_path / "2" / "meta" / "metadata").write_text("{not json")
    with CheckpointStore(tmp_path, create=False, owner=True) as store:
        assert store.info(2).status == "corrupt"
        assert store.restore_latest(state_like=_small_like()).number == 1
        assert [e["checkpoint"] for e in store.ledger.read() if e["event"] == "skip"] == [3, 2]


def test_writes_a_failed_save_left_running_are_swept_before_the_next_save(tmp_path):
    # A failed save's other array writes can finish after its directory was removed, and
    # recreate it (seen under a full disk): the next save removes it before writing.
    with CheckpointStore(tmp_path) as store:
        real_write = store._write

        def no_space(*_args):
            raise OSError(errno.ENOSPC, "No space left on device")

        store._write = no_space
        assert store.save(_small_state(1), {}, {"status": "good"}) == 1
        with pytest.raises(CheckpointSaveError):
            store.wait()
        late = tmp_path / "1.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp" / "ocdbt.process_0" / "d"
        late.mkdir(parents=True)
        (late / "data").write_bytes(b"\0" * 64)
        store._write = real_write
        assert store.save(_small_state(2), {}, {"status": "good"}) == 2
        store.wait()
        assert store.numbers() == [2] and not (tmp_path / "1.orbax-checkpoint-tmp").exists()
        swept = [e for e in store.ledger.read() if e["event"] == "delete"]
        assert [(e["checkpoint"], e["reason"]) for e in swept] == [(1, "late writes of a failed save")]


def test_writes_a_failed_last_save_left_running_are_swept_when_the_owner_closes(tmp_path):
    store = CheckpointStore(tmp_path)
    store._write = lambda *_args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    assert store.save(_small_state(1), {}, {"status": "good"}) == 1
    with pytest.raises(CheckpointSaveError):
        store.wait()
    late = tmp_path / "1.orbax-checkpoint-tmp" / "state.orbax-checkpoint-tmp"
    late.mkdir(parents=True)
    store.close()
    assert not (tmp_path / "1.orbax-checkpoint-tmp").exists()
    with CheckpointStore(tmp_path, create=False) as reader:
        swept = [e for e in reader.ledger.read() if e["event"] == "delete"]
    assert [(e["checkpoint"], e["reason"]) for e in swept] == [(1, "late writes of a failed save")]


def test_an_unfinalized_directory_is_removed_when_the_owner_opens_the_store(tmp_path):
    with CheckpointStore(tmp_path) as store:
        store.save(_small_state(1), {}, {"status": "good"})
        store.wait()
    # The layout Orbax 0.12.8 leaves when a process dies mid-save: the step under a temporary name.
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "1", partial)
    for path in _data_files(partial):
        path.unlink()
    with CheckpointStore(tmp_path, create=False) as reader:  # a reader leaves it alone
        assert reader.numbers() == [1] and partial.exists()
    with CheckpointStore(tmp_path) as store:
        assert not partial.exists()
        assert {"event": "delete", "checkpoint": 2, "reason": "unfinalized"}.items() <= store.ledger.read()[-1].items()
        assert store.numbers() == [1]
        assert store.restore_latest(state_like=_small_like()).number == 1
        assert store.save(_small_state(3), {}, {"status": "good"}) == 3  # never reuses a number


@pytest.mark.slow  # a subprocess
def test_a_process_killed_mid_save_leaves_only_finalized_checkpoints(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        sys.path.insert(0, {str(REPO)!r})
        from continuity.checkpoints import CheckpointStore
        store = CheckpointStore(sys.argv[1])
        store.save({{"w": np.ones(8, np.float32)}}, {{}}, {{"status": "good"}})
        store.wait()
        big = {{f"w{{i}}": np.full(2_000_000, i, np.float32) for i in range(8)}}  # 64 MB: still writing
        store.save(big, {{}}, {{"status": "good"}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    with CheckpointStore(tmp_path, create=False) as store:
        numbers = store.numbers()
        assert numbers == [1] or (numbers == [1, 2] and not partial.exists())
        for number in numbers:  # whatever is listed was committed whole
            like = (
                {"w": jax.ShapeDtypeStruct((8,), np.float32)}
                if number == 1
                else {f"w{i}": jax.ShapeDtypeStruct((2_000_000,), np.float32) for i in range(8)}
            )
            store.restore(number, state_like=like)
    with CheckpointStore(tmp_path) as store:  # the writer restarts
        assert store.restore_latest(
            state_like={"w": jax.ShapeDtypeStruct((8,), np.float32)}
        ).number == 1 or numbers == [1, 2]
        assert store.save({"w": np.zeros(8, np.float32)}, {}, {"status": "good"}) == 3
        store.wait()
    assert not partial.exists()


# ---------------------------------------------------------------------------- export


def test_export_params_as_msgpack_and_npz_loadable_without_the_project(tmp_path, learner, trained):
    from flax import serialization

    with CheckpointStore(tmp_path / "s") as store:
        store.save(trained, {}, {"status": "good"})
        store.wait()
        params = jax.tree.map(np.asarray, trained.params)
        expected = {"head": params["head"], "hidden": {str(k): v for k, v in params["hidden"].items()}}

        out = store.export_params(1, tmp_path / "params.msgpack")
        loaded = serialization.msgpack_restore(out.read_bytes())
        _assert_identical(expected, loaded)

        out = store.export_params(1, tmp_path / "params.npz")
        with np.load(out) as npz:
            assert sorted(npz.files) == [
                "head/bias",
                "head/kernel",
                "hidden/0/bias",
                "hidden/0/kernel",
                "hidden/1/bias",
                "hidden/1/kernel",
            ]
            np.testing.assert_array_equal(npz["hidden/1/kernel"], expected["hidden"]["1"]["kernel"])

        with pytest.raises(ValueError, match=r"`out` must end in one of \.msgpack, \.npz. Got .*params\.pt"):
            store.export_params(1, tmp_path / "params.pt")
        with pytest.raises(ValueError, match="no state subtree 'weights'"):
            store.export_params(1, tmp_path / "p.npz", params_path=("weights",))
        with pytest.raises(CheckpointNotFoundError):
            store.export_params(2, tmp_path / "p.npz")
        assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------- integrity: digests and file manifest


def _random_state(seed: int) -> dict:
    """Incompressible float params: Orbax's zstd stores them raw, so a flipped byte decompresses silently."""
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": rng.normal(size=(64, 64)).astype(np.float32), "b": np.ones(3, np.float32)},
        "step": np.int32(1),
    }


def _random_like() -> dict:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), _random_state(0))


def _flip_bytes_in_the_largest_state_file(step_dir: Path) -> Path:
    """Overwrite 8 bytes in the middle of the biggest state data file, keeping its size (silent disk corruption)."""
    biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
    biggest.write_bytes(bytes(data))
    return biggest


def test_a_same_size_byte_flip_in_a_state_file_is_found_on_restore_and_the_previous_good_one_restored(tmp_path):
    with CheckpointStore(tmp_path) as store:
        store.save(_random_state(1), {}, {"status": "good"})
        store.save(_random_state(2), {}, {"status": "good"})
        store.wait()
    flipped = _flip_bytes_in_the_largest_state_file(tmp_path / "2")
    sizes = json.loads((tmp_path / "2" / "files.json").read_text())["sizes"]
    assert sizes[str(flipped.relative_to(tmp_path / "2"))] == flipped.stat().st_size  # the cheap check cannot see it
    skipped = []
    with CheckpointStore(tmp_path, create=False, owner=True) as store:
        with pytest.raises(
            CorruptCheckpointError, match=r"checkpoint 2 is corrupt: state array params/w does not match"
        ):
            store.restore(2, state_like=_random_like())
        restored = store.restore_latest(state_like=_random_like(), on_skip=lambda n, e: skipped.append(n))
        assert skipped == [2] and restored.number == 1 and restored.verified
        _assert_identical(_random_state(1), restored.state)
        assert store.info(2).abandoned and store.last_good() == 1
        assert [e["checkpoint"] for e in store.ledger.read() if e["event"] == "skip"] == [2]


def test_verify_reads_every_array_back_and_reports_one_line_per_checkpoint(tmp_path, capsys):
    from continuity.cli import main

    with CheckpointStore(tmp_path) as store:
        for seed in (1, 2, 3):
            store.save(_random_state(seed), {"x": np.arange(6, dtype=np.float32)}, {"status": "good"})
        store.wait()
    assert main(["checkpoints", "verify", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0:2] for line in lines] == [
        [f"checkpoint {n}", " ok (4 arrays, 16,424 bytes)"] for n in (1, 2, 3)
    ]

    _flip_bytes_in_the_largest_state_file(tmp_path / "2")
    assert main(["checkpoints", "list", "--dir", str(tmp_path)]) == 0  # cheap: it cannot know yet
    assert capsys.readouterr().out.splitlines()[2].split()[-1] == "good"
    assert main(["checkpoints", "verify", "--dir", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("checkpoint 1: ok") and lines[2].startswith("checkpoint 3: ok")
    assert lines[1].startswith("checkpoint 2: corrupt: state array params/w does not match its digest (crc32c saved")
    assert main(["checkpoints", "verify", "2", "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr().out.count("\n") == 1
    # What verify found is in the ledger, so the cheap listing knows it now.
    assert main(["checkpoints", "list", "--dir", str(tmp_path)]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert "corrupt: state array params/w does not match its digest" in row
    # show prints the params digest (the SHA-256 params_digest computes) and a digest of the whole state.
    assert main(["checkpoints", "show", "3", "--dir", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    from continuity.checkpoints.integrity import params_sha256

    assert shown["params_sha256"] == params_sha256(_random_state(3)) and len(shown["state_digest"]) == 64
    assert shown["condition"] == "intact" and shown["problem"] is None


@contextlib.contextmanager
def _ledger_refusing_writes(directory: Path):
    """`directory`'s ledger refusing every write with EACCES, as a store in another user's
    directory does. Simulated where the ledger opens its file: the tests may run as root,
    whom file modes do not stop, on file systems where `chattr +i` is not there."""
    ledger_path = directory / "ledger.jsonl"

    def refusing(file, mode="r", *args, **kwargs):
        if Path(file) == ledger_path and set(mode) & set("wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return open(file, mode, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ledger_module, "open", refusing, raising=False)
        yield


def test_verify_on_a_store_it_may_not_write_reports_every_finding_says_none_is_recorded_and_loses_no_line(
    tmp_path, capsys
):
    from continuity.cli import main

    with CheckpointStore(tmp_path) as store:
        for seed in (1, 2, 3):
            store.save(_random_state(seed), {}, {"status": "good"})
        store.wait()
    _flip_bytes_in_the_largest_state_file(tmp_path / "2")
    ledger = tmp_path / "ledger.jsonl"
    written = ledger.read_bytes()
    with _ledger_refusing_writes(tmp_path):
        assert main(["checkpoints", "verify", "--dir", str(tmp_path)]) == 1
        captured = capsys.readouterr()
        assert ledger.read_bytes() == written
    lines = captured.out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("checkpoint 1: ok") and lines[2].startswith("checkpoint 3: ok")
    assert lines[1].startswith("checkpoint 2: corrupt: state array params/w does not match its digest")
    assert captured.err == (
        f"continuity: verify could not record the findings above in {ledger}: the store is read-only to this "
        "process (no permission to write its ledger); the store was left as it was\n"
    )
    # Writable again: the next verify records its findings, as ever.
    assert main(["checkpoints", "verify", "2", "--dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == ""
    assert ledger.read_bytes().startswith(written) and ledger.read_text().count('"event":"verify"') == 1


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)  # Orbax: "Event loop is closed" after a failed read
def test_a_truncated_or_incomplete_checkpoint_never_lists_as_good(tmp_path, capsys):
    from continuity.cli import main

    with CheckpointStore(tmp_path) as store:
        for seed in (1, 2, 3):
            store.save(_random_state(seed), {}, {"status": "good"})
        store.wait()
    for path in _data_files(tmp_path / "2"):
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    next(p for p in _data_files(tmp_path / "3")).unlink()
    assert main(["checkpoints", "list", "--dir", str(tmp_path), "--json"]) == 0
    listed = {c["checkpoint"]: c for c in json.loads(capsys.readouterr().out)}
    assert listed[1]["status"] == "good" and listed[1]["condition"] == "intact"
    assert listed[2]["status"] == "corrupt" and "bytes," in listed[2]["problem"]
    assert listed[3]["status"] == "corrupt" and listed[3]["problem"].endswith("is missing")
    assert main(["checkpoints", "list", "--dir", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows[0].split()[-1] == "good" and [r.split()[7] for r in rows[1:]] == ["corrupt:", "corrupt:"]
    # A checkpoint saved before digests existed (schema 1: no digests, no manifest) is "not verified".
    (tmp_path / "1" / "files.json").unlink()
    meta = tmp_path / "1" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    del saved["integrity"]
    meta.write_text(json.dumps(saved))
    assert main(["checkpoints", "list", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith("good (not verified)")
    assert main(["checkpoints", "verify", "1", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "checkpoint 1: not verified: saved without content digests"


def test_digest_verification_covers_the_probe_and_export(tmp_path):
    probe = {"x": np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)}
    with CheckpointStore(tmp_path) as store:
        store.save(_random_state(1), probe, {"status": "good"})
        store.wait()
    biggest = max((p for p in (tmp_path / "1" / "probe").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    with CheckpointStore(tmp_path, create=False) as store:
        with pytest.raises(CorruptCheckpointError, match="probe array x does not match"):
            store.restore(1, state_like=_random_like(), probe_like=probe)
        store.export_params(1, tmp_path / "p.npz")  # the params are intact: exporting them is fine
    _flip_bytes_in_the_largest_state_file(tmp_path / "1")
    with CheckpointStore(tmp_path, create=False) as store:
        with pytest.raises(CorruptCheckpointError, match="state array params/w does not match"):
            store.export_params(1, tmp_path / "q.npz")
    assert not (tmp_path / "q.npz").exists()


# ---------------------------------------------------------------------------- store.json: rebuilt when lost or garbled


def test_rebuild_recovers_pins_head_abandoned_and_numbers_from_the_ledger():
    from continuity.checkpoints.store_file import rebuild

    events = [
        {"event": "save", "checkpoint": 1},
        {"event": "save", "checkpoint": 2},
        {"event": "pin", "checkpoint": 1},
        {"event": "pin", "checkpoint": 2},
        {"event": "unpin", "checkpoint": 2},
        {"event": "save", "checkpoint": 3},
        {"event": "rollback", "window": 4, "to_checkpoint": 3, "scopes": ["s1"]},  # the guard's: not a head
        {"event": "save", "checkpoint": 4},
        {"event": "rollback", "checkpoint": 2, "reason": "ops", "previous_head": None, "abandoned": [3, 4]},
        {"event": "accept", "checkpoint": 6, "parent": 2},  # handed out, never finalized
        {"event": "skip", "checkpoint": 5},
    ]
    rebuilt = rebuild(events, finalized=[1, 2, 3, 4, 5], unfinalized=[7])
    assert (rebuilt.pinned, rebuilt.abandoned, rebuilt.head, rebuilt.reserved) == ({1}, {3, 4, 5}, 2, 7)
    # A later save continues from the head: the head no longer applies; retention's deletes drop the marks.
    events += [{"event": "save", "checkpoint": 8}, {"event": "delete", "checkpoint": 3}]
    rebuilt = rebuild(events, finalized=[1, 2, 4, 5, 8])
    assert (rebuilt.pinned, rebuilt.abandoned, rebuilt.head, rebuilt.reserved) == ({1}, {4, 5}, None, 8)
    assert rebuild([], finalized=[2, 3]).reserved == 3


def _store_with_marks(directory: Path) -> dict:
    with CheckpointStore(directory, keep_last=10) as store:
        for i in range(5):
            store.save(_small_state(i), {}, {"status": "good"})
        store.wait()
        store.pin(1)
        store.set_head(3, reason="ops")
    return json.loads((directory / "store.json").read_text())


@pytest.mark.parametrize("garbage", ["{not json", "", '{"pinned": []}', "\x00" * 40])
def test_a_garbled_store_file_is_one_clear_line_and_repair_rebuilds_it(tmp_path, capsys, garbage):
    from continuity.cli import main

    original = _store_with_marks(tmp_path)
    assert (original["pinned"], original["head"], original["abandoned"], original["reserved"]) == ([1], 3, [4, 5], 5)
    (tmp_path / "store.json").write_text(garbage)
    for argv in (["checkpoints", "list"], ["checkpoints", "pin", "2"], ["rollback", "--to", "2"]):
        assert main([*argv, "--dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "store.json is not a readable store file" in err
        assert f"continuity checkpoints repair --dir {tmp_path}" in err
    assert main(["checkpoints", "repair", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "head 3, pinned 1, abandoned 4, 5, numbers handed out up to 5" in out
    assert json.loads((tmp_path / "store.json").read_text()) == original
    assert main(["checkpoints", "repair", "--dir", str(tmp_path)]) == 0
    assert "is readable" in capsys.readouterr().out
    # A lost store.json is rebuilt the same way.
    (tmp_path / "store.json").unlink()
    with CheckpointStore(tmp_path, repair=True) as store:
        assert store.repaired is not None and store.head == 3 and store.info(1).pinned
        assert store.save(_small_state(9), {}, {"status": "good"}) == 6  # numbers are never reused


# ---------------------------------------------------------------------------- one owner at a time


_HOLD_STORE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from continuity.checkpoints import CheckpointStore
    store = CheckpointStore(sys.argv[1])
    print("owned", flush=True)
    time.sleep(300)
""")


@pytest.mark.slow  # a subprocess
def test_a_store_has_one_owner_and_a_sigkilled_owner_does_not_block_the_next(tmp_path):
    import socket
    import subprocess

    from continuity.checkpoints import ReadOnlyStoreError, StoreLockedError

    with CheckpointStore(tmp_path) as store:
        store.save(_small_state(1), {}, {"status": "good"})
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_STORE, str(tmp_path), str(REPO)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "owned"
        with pytest.raises(StoreLockedError) as refused:
            CheckpointStore(tmp_path)
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message
        # Readers take no lock: listing and restoring work while the directory is owned.
        with CheckpointStore(tmp_path, create=False) as reader:
            assert reader.numbers() == [1] and reader.restore(1, state_like=_small_like()).verified
            with pytest.raises(ReadOnlyStoreError, match="read-only; pinning needs its owner"):
                reader.pin(1)
    finally:
        os.kill(holder.pid, 9)
        holder.wait()
    with CheckpointStore(tmp_path) as store:  # the kernel dropped the dead owner's lock
        assert store.save(_small_state(2), {}, {"status": "good"}) == 2


# ---------------------------------------------------------------------------- a full disk, through the real Orbax path


_FULL_DISK = textwrap.dedent("""
    import json, resource, signal, sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from continuity.checkpoints import CheckpointSaveError, CheckpointStore
    # Writes past RLIMIT_FSIZE fail with EFBIG, as a full disk fails them with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    big = {"params": {"w": np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)}}
    out = {}
    with CheckpointStore(sys.argv[1]) as store:
        store.save({"params": {"w": np.ones(4, np.float32)}}, {}, {"status": "good"})
        store.wait()
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        store.save(big, {}, {"status": "good"})
        try:
            store.wait()
        except CheckpointSaveError as error:
            out["error"] = str(error)
        out["after_failure"] = sorted(p.name for p in store.directory.iterdir())
        out["numbers_after_failure"] = store.numbers()
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
        out["saved"] = store.save(big, {}, {"status": "good"})
        store.wait()
        out["numbers"] = store.numbers()
    print(json.dumps(out))
""")


def test_a_long_save_error_keeps_its_start_and_the_operating_systems_reason():
    # TensorStore's error for a failed open names the OS reason mid-line, then dumps the array's spec.
    spec = '{"driver":"zarr","metadata":{"shape":[256,10]}' + ',"x":1' * 80 + "}"
    opening = (
        'OUT_OF_RANGE: Error opening "zarr" driver: Error writing "ewc.anchor.head.kernel/.zarray" in OCDBT '
        'database at local file "/tmp/run/checkpoints/3.orbax-checkpoint-tmp/": Failed to write 189 bytes to '
        f"file 4: File too large [os_error_code='27'] [source locations='x.cc:1'] [tensorstore_spec='{spec}']"
    )
    line = store_module.first_line(opening + "\nsecond line")
    assert len(line) <= 300 and line.startswith('OUT_OF_RANGE: Error opening "zarr"')
    assert line.endswith("File too large [os_error_code='27']")
    writing = 'OUT_OF_RANGE: Error writing local file "/tmp/a": ' + "x" * 300 + ": No space left [os_error_code=28]"
    assert store_module.first_line(writing).endswith("No space left [os_error_code=28]")
    assert store_module.first_line("short") == "short"


@pytest.mark.slow  # a subprocess
def test_a_save_that_fails_for_lack_of_space_leaves_nothing_behind_and_the_next_one_succeeds(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert "saving checkpoint 2" in out["error"] and "File too large" in out["error"]
    assert out["after_failure"] == ["1", "ledger.jsonl", "store.json", "store.lock"]  # no *.orbax-checkpoint-tmp*
    assert out["numbers_after_failure"] == [1]
    assert out["saved"] == 3 and out["numbers"] == [1, 3]  # number 2 is never reused
    with CheckpointStore(tmp_path, create=False) as store:
        like = {"params": {"w": jax.ShapeDtypeStruct((256, 256), np.float32)}}
        assert store.restore(3, state_like=like).verified
        events = store.ledger.read()
        assert {"event": "delete", "checkpoint": 2, "reason": "failed save"}.items() <= next(
            e for e in events if e["event"] == "delete"
        ).items()
        assert [e["checkpoint"] for e in events if e["event"] == "save_failed"] == [2]


def test_ledger_lines_a_full_disk_refuses_are_held_and_written_in_order_later(tmp_path, monkeypatch, caplog):
    import builtins
    import errno

    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.append("save", checkpoint=1)
    real_open = builtins.open
    full = {"on": True}

    def refusing_open(path, mode="r", *args, **kwargs):
        if full["on"] and str(path).endswith("ledger.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with caplog.at_level("ERROR", logger="continuity.checkpoints.ledger"):
        for n in (2, 3, 4):
            ledger.append("save", checkpoint=n)  # never raises: the service goes on
    assert ledger.held == 3 and len(caplog.records) == 1  # one error for the spell, not one per line
    assert [e["checkpoint"] for e in ledger.read()] == [1]
    full["on"] = False
    ledger.append("save", checkpoint=5)
    assert ledger.held == 0
    assert [e["checkpoint"] for e in ledger.read()] == [1, 2, 3, 4, 5]
