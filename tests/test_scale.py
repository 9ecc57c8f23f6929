"""One model over several local devices ([scale] devices): the same training as one device, and
deterministic. Devices are faked CPU devices (XLA_FLAGS), so those tests run in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from conftest import record_scenario

from continuity import replay
from continuity.checkpoints import CheckpointStore
from continuity.cli import main
from continuity.config import ConfigError, load_config
from continuity.factory import device_count
from continuity.learner import Classification, Learner, mlp
from continuity.loop import params_digest

REPO = Path(__file__).resolve().parent.parent
FOUR_DEVICES = "--xla_force_host_platform_device_count=4"


def _faked(devices_flag: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": devices_flag}


def test_scale_devices_is_all_by_default_and_the_batch_must_divide_by_a_count(tmp_path):
    assert load_config(None).scale.devices == "all"
    assert load_config(None, ["scale.devices=4"]).scale.devices == 4
    with pytest.raises(ConfigError, match=r"\[learner\] batch_size: must divide by scale.devices = 3.*Got 32"):
        load_config(None, ["scale.devices=3"])
    for bad in ("0", '"some"', "true"):
        with pytest.raises(ConfigError, match=r'\[scale\] devices.*must be "all" or an integer >= 1'):
            load_config(None, [f"scale.devices={bad}"])


def test_one_process_is_the_default_and_several_need_a_coordinator_and_a_process_id_below_their_count():
    scale = load_config(None).scale
    assert (scale.coordinator, scale.num_processes, scale.process_id) == (None, 1, 0)
    two = ["scale.num_processes=2", 'scale.coordinator="10.0.0.1:1234"']
    assert load_config(None, [*two, "scale.process_id=1"]).scale.process_id == 1
    with pytest.raises(ConfigError, match=r"\[scale\] coordinator: is required when num_processes > 1"):
        load_config(None, ["scale.num_processes=2"])
    with pytest.raises(
        ConfigError, match=r"\[scale\] process_id \(from --set\): must be below num_processes = 2.*Got 2"
    ):
        load_config(None, [*two, "scale.process_id=2"])
    with pytest.raises(
        ConfigError, match=r'\[scale\] coordinator \(from --set\): must be "host:port".*Got \'10.0.0.1\''
    ):
        load_config(None, ['scale.coordinator="10.0.0.1"'])
    with pytest.raises(ConfigError, match=r"\[learner\] batch_size: must divide by scale.num_processes = 3.*Got 32"):
        load_config(None, ["scale.num_processes=3", 'scale.coordinator="h:1"'])
    # The processes leave the digest alone: a checkpoint of 2 processes restores in 1.
    assert load_config(None, [*two, "scale.process_id=1"]).digest() == load_config(None).digest()


def test_the_process_keys_come_from_jax_environment_variables_when_the_config_leaves_them_out():
    environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    scale = load_config(None, environ=environ).scale
    assert (scale.coordinator, scale.num_processes, scale.process_id) == ("10.0.0.1:1234", 4, 3)
    assert load_config(None, ["scale.process_id=1"], environ=environ).scale.process_id == 1  # --set wins
    with pytest.raises(ConfigError, match=r"\[scale\] process_id: environment variable JAX_PROCESS_ID: expected an"):
        load_config(None, environ={**environ, "JAX_PROCESS_ID": "first"})


def test_serve_with_a_bad_process_id_is_one_line_and_exit_status_two(capsys):
    code = main(["serve", "--set", "scale.num_processes=2", "--set", 'scale.coordinator="h:1"', "--process-id", "5"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "continuity: error: config: [scale] process_id (from --set): must be below num_processes = 2 "
        "(processes count from 0). Got 5."
    ]


def test_a_sharded_replay_buffer_needs_a_capacity_and_a_draw_that_divide_by_the_devices(capsys):
    sharded = ["scale.devices=4", 'scale.replay_layout="sharded"']
    assert load_config(None).scale.replay_layout == "replicated"
    assert load_config(None, [*sharded, "replay.capacity=1000"]).scale.replay_layout == "sharded"
    with pytest.raises(
        ConfigError, match=r"\[replay\] capacity \(from --set\): must divide by the 4 devices.*Got 1002"
    ):
        load_config(None, [*sharded, "replay.capacity=1002"])
    with pytest.raises(ConfigError, match=r"\[replay\] batch_size \(from --set\): must divide by the 4 devices.*Got 6"):
        load_config(None, [*sharded, "replay.capacity=1000", "replay.batch_size=6"])
    # Several processes: serve does not shard the buffer over them (process 0 saves alone).
    two = ["scale.num_processes=2", 'scale.coordinator="h:1"', "scale.devices=2", 'scale.replay_layout="sharded"']
    with pytest.raises(ConfigError, match=r"\[scale\] replay_layout.*not run over several processes.*replicated"):
        load_config(None, [*two, "replay.capacity=1000"])
    assert load_config(None, [*two, "replay.capacity=0"]).scale.num_processes == 2  # no buffer, nothing to shard
    assert load_config(None, [*sharded, "replay.capacity=0", "replay.batch_size=6"]).learner.replay.enabled is False
    with pytest.raises(ConfigError, match=r"\[scale\] replay_layout.*must be one of 'replicated', 'sharded'"):
        load_config(None, ['scale.replay_layout="split"'])
    # The layout leaves the digest alone: a checkpoint restores onto either, its buffer re-dealt.
    assert (
        load_config(None, [*sharded, "replay.capacity=1000"]).digest()
        == load_config(None, ["replay.capacity=1000"]).digest()
    )


def test_a_learner_refuses_a_replay_buffer_without_one_shard_per_device():
    policy = replay.sharded(replay.reservoir(8), 2)
    with pytest.raises(ValueError, match=r"one shard per device: 1 device\(s\), 2 shards"):
        Learner(mlp, optax.sgd(0.1), Classification(3), inputs=_spec(), batch_size=8, replay=policy)


def test_the_device_count_leaves_the_config_digest_alone():
    # A checkpoint saved on 4 devices restores on 1 without a config-mismatch warning, as K does.
    assert load_config(None, ["scale.devices=4"]).digest() == load_config(None, ["scale.devices=1"]).digest()


def test_more_devices_than_jax_sees_is_a_config_error_naming_scale_devices():
    present = len(jax.local_devices())
    with pytest.raises(ConfigError, match=rf"\[scale\] devices: must be at most the {present} local"):
        device_count(load_config(None, [f"scale.devices={present + 1}", "learner.batch_size=" + str(present + 1)]))
    assert device_count(load_config(None)) == present  # "all"


def test_a_learner_refuses_more_devices_than_there_are():
    with pytest.raises(ValueError, match="`devices` must be between 1 and"):
        Learner(mlp, optax.sgd(0.1), Classification(3), inputs=_spec(), batch_size=8, devices=99)


def _spec():
    return jax.ShapeDtypeStruct((4,), np.float32)


def _four_device_worker(*arguments: str) -> dict:
    """tests/scale_worker.py with `arguments` on 4 faked CPU devices: its report (the last stdout line)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scale_worker.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=240,
        env=_faked(FOUR_DEVICES),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_four_devices_train_and_evaluate_the_same_model_as_one_on_the_same_global_batch_with_no_recompiles():
    # 75 dispatches of K = 4: 298 updates, with padding rows, a short last stack and a consolidation.
    report = _four_device_worker("75")
    assert report["devices"] == 4
    assert report["examples"][0] == report["examples"][1] > 0
    assert report["max_param"] > 0.1  # trained weights, not a model that stayed at zero
    # Only the order of the gradient's float sums differs (an all-reduce over 4 partial sums).
    assert report["max_param_diff"] < 1e-5
    assert report["compiles_after_first"] == 0
    # Evaluation split over the devices scores every row as one device does.
    assert report["evaluated"] == [2600, 2600] and report["same_outcomes"]
    assert report["max_loss_diff"] < 1e-5 and report["accuracy"] > 0.3  # a trained model (chance: 0.1)


def _two_processes(*runs: str) -> list[list[dict]]:
    """Each worker's reports, one per run ("DISPATCHES:LAYOUT"): 2 processes x 2 faked CPU devices,
    jax.distributed over gloo, one mesh of 4, joined once for every run."""
    from continuity.stream import free_port

    port = free_port()
    workers = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "scale_worker.py"), str(port), str(process), "2", *runs],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_faked("--xla_force_host_platform_device_count=2"),
        )
        for process in (0, 1)
    ]
    reports = []
    for worker in workers:
        out, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for process, runs_of_process in enumerate(reports):
        assert [r["process"] for r in runs_of_process] == [process] * len(runs)
        assert {r["devices"] for r in runs_of_process} == {4}
    return reports


@pytest.mark.slow
def test_two_processes_of_two_devices_train_one_model_with_a_replicated_or_a_sharded_replay_buffer():
    """Each process feeds half of every batch's rows; the replicated buffer's model is the one-device
    model on the whole batches, the sharded one keeps each shard on the process feeding its device."""
    (replicated_0, sharded_0), (replicated_1, sharded_1) = _two_processes("40:replicated", "20:sharded")
    for reports in ([replicated_0, replicated_1], [sharded_0, sharded_1]):
        assert reports[0]["digest"] == reports[1]["digest"]  # one model, the same bits on every process
        for report in reports:  # every row trained once: the global totals are one device's on the whole batches
            assert report["examples"][1] == report["examples"][0] > 0
            assert report["compiles_after_first"] == 0
    assert replicated_0["max_param_diff"] < 1e-5 and replicated_1["max_param_diff"] < 1e-5
    # Process 0 feeds devices 0 and 1 and holds their shards, process 1 devices 2 and 3.
    assert [sharded_0["shards_held"], sharded_1["shards_held"]] == [{"0": [0], "1": [1]}, {"2": [2], "3": [3]}]


@pytest.mark.slow
def test_a_replay_buffer_sharded_over_four_devices_keeps_each_devices_rows_and_restores_onto_any_count(tmp_path):
    report = _four_device_worker("sharded", "20", str(tmp_path / "store"))
    assert report["devices"] == 4 and report["compiles_after_first"] == 0 and report["examples"] > 0
    # Each shard is full (64 = 256 / 4) of rows fed to its own device only.
    assert report["shard_sizes"] == [64] * 4
    assert report["shards_hold_their_devices_rows"] == [[0], [1], [2], [3]]
    assert report["accuracy"] > 0.3  # it trains (chance: 0.1), on other replayed rows than one device:
    assert report["max_param_diff_vs_1_device"] > 1e-4
    # No row crosses between devices: the replicated buffer gathers the fresh rows (features among
    # them) into every copy; the sharded one gathers only the per-row metrics the host reads, (K, B).
    collectives = report["collectives"]
    assert "f32[32,8,8,1]" in collectives["replicated"]["all-gather"]
    assert sorted(collectives["sharded"]["all-gather"]) == ["f32[4,32]", "pred[4,32]"]
    assert "collective-permute" not in collectives["sharded"]
    # Either layout joins each device's fresh rows with its own share of the replayed ones, so
    # the joined batch is never re-split over the devices.
    assert "collective-permute" not in collectives["replicated"]
    # Saved and restored onto the same mesh: every leaf back, the shards on their devices, and the
    # next dispatch the same as without the round trip, with no compile.
    assert report["restored_same"] and report["restored_spec"] and report["resumes_exactly"]
    assert report["compiles_on_restore"] == 0
    # Onto one device (one buffer) and onto 2 devices (2 shards): every held example re-dealt, the
    # examples offered still counted, and training goes on.
    for name, shards in (("one_device", 1), ("two_devices", 2)):
        assert report["elsewhere"][name] == {
            "same_examples": True,
            "shards": shards,
            "seen": report["seen"],
            "trained": True,
        }
    # A restore not told how to re-deal names the leaves that differ.
    assert "replay/bucket: checkpoint shape (4, 64), state_like (256,)" in report["refused_without_reshape"]


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """permuted-digits, 2 segments, one partition, recorded to Parquet."""
    return record_scenario(tmp_path_factory.mktemp("scale") / "stream.parquet", segments=2, seed=2)


_REPLAY_TWICE = """
import json, sys
import jax, numpy as np
from continuity import replay
from continuity.checkpoints import CheckpointStore
from continuity.cli import main
from continuity.config import load_config
from continuity.learner import Batch, compilation_count
from continuity.service import build_learner
recording, config, out = sys.argv[1:4]
for run in ("a", "b"):
    code = main(["replay", recording, "--config", config, "--out", out + "/" + run])
    if code:
        sys.exit(code)
# A checkpoint restored onto the mesh trains on the step a fresh state compiled.
learner = build_learner(load_config(config))
stack = learner.stack([Batch(np.zeros((32, 8, 8, 1), np.float32), np.zeros(32, np.int32), np.ones(32, bool))])
fresh, _ = learner.train_steps(learner.init(0), learner.put_stack(stack))
jax.block_until_ready(fresh)
before = compilation_count()
with CheckpointStore(out + "/a", create=False) as store:
    restored = store.restore(store.last_good(), state_like=learner.init(0))
state, _ = learner.train_steps(restored.state, learner.put_stack(stack))
jax.block_until_ready(state)
sharding = jax.tree.leaves(restored.state.params)[0].sharding
print(json.dumps({"devices": len(sharding.device_set), "replicated": sharding.is_fully_replicated,
                  "compiles": compilation_count() - before}))
"""


@pytest.mark.slow
def test_a_stream_replayed_on_four_devices_twice_gives_identical_checkpoints_that_restore_onto_the_mesh(
    recording, tmp_path
):
    config = tmp_path / "replay.toml"
    config.write_text(
        "[model]\nhidden = [64]\n[probe]\nevery_examples = 700\n"
        "[checkpoints]\nevery_seconds = 0\n[scale]\ndevices = 4\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", _REPLAY_TWICE, str(recording), str(config), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=_faked(FOUR_DEVICES),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    restored_on_the_mesh = json.loads(result.stdout.strip().splitlines()[-1])
    assert restored_on_the_mesh == {"devices": 4, "replicated": True, "compiles": 0}
    stores = [CheckpointStore(tmp_path / run, create=False) for run in ("a", "b")]
    numbers = [[i.number for i in store.list()] for store in stores]
    assert numbers[0] == numbers[1] and numbers[0]
    # Read back in this one-device process: a replicated state restores onto one device.
    one_device = load_config(config, ["scale.devices=1"])
    from continuity.service import build_learner

    like = build_learner(one_device).init(0)
    a, b = (store.restore(store.last_good(), state_like=like) for store in stores)
    assert a.metadata["integrity"] == b.metadata["integrity"]  # every array's CRC, the params' SHA-256
    assert params_digest(a.state) == params_digest(b.state)
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # And a one-device replay of the same records ends at the same model, up to float rounding.
    assert (
        main(
            [
                "replay",
                str(recording),
                "--config",
                str(config),
                "--set",
                "scale.devices=1",
                "--out",
                str(tmp_path / "one"),
            ]
        )
        == 0
    )
    with CheckpointStore(tmp_path / "one", create=False) as store:
        one = store.restore(store.last_good(), state_like=like)
    assert one.metadata["learner_step"] == a.metadata["learner_step"]
    for x, y in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(a.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.slow
def test_a_checkpoint_of_a_buffer_sharded_over_four_devices_resumes_on_one_device_with_its_examples_re_dealt(
    tmp_path,
):
    first, both = (record_scenario(tmp_path / f"{n}.parquet", segments=n, seed=2) for n in (1, 2))
    config = tmp_path / "sharded.toml"
    config.write_text(
        "[model]\nhidden = [64]\n[probe]\nevery_examples = 700\n[checkpoints]\nevery_seconds = 0\n"
        '[scale]\ndevices = 4\nreplay_layout = "sharded"\n'
    )
    out = tmp_path / "store"
    command = ["replay", str(first), "--config", str(config), "--out", str(out), "--json", str(tmp_path / "a.json")]
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from continuity.cli import main; sys.exit(main(sys.argv[1:]))", *command],
        capture_output=True,
        text=True,
        timeout=240,
        env=_faked(FOUR_DEVICES),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads((tmp_path / "a.json").read_text())
    # The same store, one device (one buffer): the checkpoint restores, its buffer re-dealt, and the
    # second segment trains on from the saved position.
    command = ["replay", str(both), "--config", str(config), "--set", "scale.devices=1", "--out", str(out)]
    assert main([*command, "--json", str(tmp_path / "b.json")]) == 0
    resumed = json.loads((tmp_path / "b.json").read_text())
    assert resumed["restored_from"] == sharded["last_checkpoint"] is not None
    assert resumed["examples_trained"] > 0 and resumed["rollbacks"] == 0
    assert resumed["positions"]["digits/0"] > sharded["positions"]["digits/0"]
