"""CheckpointStore on real Orbax directories, the retention rule, and the ledger."""

from __future__ import annotations

import json
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
    CheckpointStore,
    CorruptCheckpointError,
    Ledger,
    checkpoints_to_delete,
)

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
        assert metadata["status"] == "good" and metadata["checkpoint"] == 1 and metadata["schema_version"] == 1
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
    with CheckpointStore(tmp_path, create=False) as store:
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
    with CheckpointStore(tmp_path, create=False) as store:
        assert store.info(2).status == "corrupt"
        assert store.restore_latest(state_like=_small_like()).number == 1
        assert [e["checkpoint"] for e in store.ledger.read() if e["event"] == "skip"] == [3, 2]


def test_an_unfinalized_directory_is_ignored_then_cleaned_up(tmp_path):
    with CheckpointStore(tmp_path) as store:
        store.save(_small_state(1), {}, {"status": "good"})
        store.wait()
    # The layout Orbax 0.12.8 leaves when a process dies mid-save: the step under a temporary name.
    partial = tmp_path / "2.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "1", partial)
    for path in _data_files(partial):
        path.unlink()
    with CheckpointStore(tmp_path) as store:
        assert store.numbers() == [1]
        assert store.restore_latest(state_like=_small_like()).number == 1
        assert store.save(_small_state(3), {}, {"status": "good"}) == 3  # never reuses a number
        store.wait()
        assert not partial.exists()
        assert {"event": "delete", "checkpoint": 2, "reason": "unfinalized"}.items() <= store.ledger.read()[-1].items()


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
