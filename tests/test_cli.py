"""The command line's own surface: --version, where a store is named, argument names, `checkpoints diff`,
and one config digest from `config check` to the checkpoints."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from conftest import record_scenario

from continuity.checkpoints import SCHEMA_VERSION, CheckpointStore
from continuity.cli import main

# A test of a run that once waited forever inside JAX, where pytest-timeout's signal cannot
# interrupt it: should it regress, the thread method ends the worker instead of CI's budget.
ENDS_A_HANG = pytest.mark.timeout(120, method="thread")


def _state(w: np.ndarray, step: int) -> dict:
    return {
        "params": {"dense": {"w": w, "b": np.zeros(2, np.float32)}},
        "opt": {"count": np.int32(step)},
        "step": np.int32(step),
    }


def _metadata(offset: int, step: int, accuracy: float, strength: float) -> dict:
    return {
        "status": "good",
        "learner_step": step,
        "positions": [{"topic": "t", "partition": 0, "offset": offset}],
        "ewc_strength": strength,
        "probe": {"accuracy": accuracy, "segments": {"a": accuracy, "b": 0.5}},
    }


@pytest.fixture
def store_dir(tmp_path) -> Path:
    """Three checkpoints: 1 and 2 differ in one params array (by at most 0.25) and in metadata; 3 repeats 2."""
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    changed = w.copy()
    changed[1, 0] += 0.25
    changed[2, 1] -= 0.125
    directory = tmp_path / "ckpts"
    with CheckpointStore(directory, keep_last=10) as store:
        store.save(_state(w, 10), {}, _metadata(100, 10, 0.75, 40.0))
        store.save(_state(changed, 20), {}, _metadata(200, 20, 0.8, 10.0))
        store.save(_state(changed, 20), {}, _metadata(200, 20, 0.8, 10.0))
    return directory


@pytest.fixture
def config_file(tmp_path, store_dir) -> Path:
    """A service config whose [checkpoints] dir is the store."""
    path = tmp_path / "continuity.toml"
    path.write_text(f'[checkpoints]\ndir = "{store_dir}"\n')
    return path


def test_version_prints_the_installed_distributions_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"continuity {version('continuity')}"


@pytest.mark.parametrize(
    "command",
    [
        ["checkpoints", "list"],
        ["checkpoints", "show", "2"],
        ["checkpoints", "diff", "1", "2"],
        ["checkpoints", "verify"],
        ["checkpoints", "repair"],
        ["checkpoints", "export", "2", "--out", "{tmp}/params.npz"],
    ],
)
def test_every_checkpoints_command_finds_the_store_from_a_config_as_from_a_dir(
    command, store_dir, config_file, tmp_path, capsys
):
    argv = [part.format(tmp=tmp_path) for part in command]
    assert main([*argv, "--dir", str(store_dir)]) == 0
    by_dir = capsys.readouterr().out
    assert main([*argv, "--config", str(config_file)]) == 0
    assert capsys.readouterr().out == by_dir
    # --set overrides the config's dir like any other key.
    elsewhere = tmp_path / "other.toml"
    elsewhere.write_text('[checkpoints]\ndir = "/nonexistent"\n')
    assert main([*argv, "--config", str(elsewhere), "--set", f'checkpoints.dir="{store_dir}"']) == 0
    assert capsys.readouterr().out == by_dir


def test_a_store_is_named_by_exactly_one_of_dir_or_config(store_dir, config_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["checkpoints", "list", "--dir", str(store_dir), "--config", str(config_file)])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["checkpoints", "list"])
    assert exit_info.value.code == 2 and "one of the arguments --dir --config is required" in capsys.readouterr().err
    assert main(["checkpoints", "list", "--dir", str(store_dir), "--set", "checkpoints.keep_last=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set overrides a config: give it with --config FILE" in err


@pytest.mark.parametrize(
    "command",
    [
        ["checkpoints", "show"],
        ["checkpoints", "diff"],
        ["checkpoints", "verify"],
        ["checkpoints", "export"],
        ["checkpoints", "pin"],
        ["checkpoints", "unpin"],
        ["rollback"],
    ],
)
def test_checkpoint_arguments_are_named_like_the_ckpt_column_of_the_table(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    usage = capsys.readouterr().out
    assert "CKPT" in usage and "STEP" not in usage


def test_diff_names_the_arrays_the_largest_params_difference_and_the_metadata_that_differ(store_dir, capsys):
    assert main(["checkpoints", "diff", "1", "2", "--dir", str(store_dir), "--json"]) == 0
    difference = json.loads(capsys.readouterr().out)
    params = difference["params"]
    assert params["identical"] is False and params["differ"] == ["params/dense/w"]
    assert params["max_abs_difference"] == 0.25
    assert params["sha256"][0] != params["sha256"][1]
    assert difference["state"]["differ"] == ["opt/count", "params/dense/w", "step"]
    assert difference["state"]["arrays"] == 4 and difference["probe"]["arrays"] == 0
    assert difference["metadata"] == {
        "learner_step": [10, 20],
        "positions": [
            [{"topic": "t", "partition": 0, "offset": 100}],
            [{"topic": "t", "partition": 0, "offset": 200}],
        ],
        "ewc_strength": [40.0, 10.0],
        "probe a": [0.75, 0.8],
        "probe accuracy": [0.75, 0.8],
    }

    assert main(["checkpoints", "diff", "1", "2", "--dir", str(store_dir)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "checkpoint 1 vs checkpoint 2"
    assert text[1] == "params:   1 arrays differ; largest |a - b| 0.25: params/dense/w"
    assert text[2] == "state:    3 of 4 arrays differ: opt/count, params/dense/w, step"
    assert "  positions       t/0:100 -> t/0:200" in text and "  ewc_strength    40 -> 10" in text


def test_diff_of_checkpoints_with_the_same_content_says_so(store_dir, capsys):
    assert main(["checkpoints", "diff", "2", "3", "--dir", str(store_dir)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[1].startswith("params:   identical (SHA-256 ") and text[2] == "state:    all 4 arrays equal"
    assert text[-1].startswith("metadata: no difference in status, learner_step")


def test_diff_of_a_missing_checkpoint_is_one_line_and_status_2(store_dir, capsys):
    assert main(["checkpoints", "diff", "1", "9", "--dir", str(store_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint 9" in err


@pytest.mark.slow  # a replay through the whole loop
def test_config_check_prints_the_digest_saved_in_checkpoints_written_from_that_config(tmp_path, capsys):
    recording = record_scenario(tmp_path / "stream.parquet", segments=1, seed=0)
    config = tmp_path / "continuity.toml"
    config.write_text("[model]\nhidden = [32]\n[probe]\nevery_examples = 500\n[checkpoints]\nevery_seconds = 0.0\n")
    assert main(["config", "check", "--config", str(config), "--json"]) == 0
    digest = json.loads(capsys.readouterr().out)["digest"]

    out = tmp_path / "run"
    assert main(["replay", str(recording), "--config", str(config), "--out", str(out)]) == 0
    with CheckpointStore(out, create=False) as store:
        saved = [store.info(number).metadata for number in store.numbers()]
        started = [e for e in store.ledger.read() if e["event"] == "start"]
    assert len(saved) >= 2 and {m["config_digest"] for m in saved} == {digest}
    assert started[0]["config_digest"] == digest
    # One schema key: the store's, for the whole JSON item.
    assert all(m["schema_version"] == SCHEMA_VERSION and "schema" not in m for m in saved)


def test_a_store_the_file_system_will_not_let_be_used_is_one_line_never_a_traceback(store_dir, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("not a store")
    assert main(["checkpoints", "list", "--dir", str(a_file)]) == 2
    assert capsys.readouterr().err == f"continuity: error: cannot use {a_file} as a checkpoint store: not a directory\n"
    (store_dir / "store.lock").unlink()
    (store_dir / "store.lock").mkdir()  # what an operator's mistake or a broken volume leaves
    assert main(["checkpoints", "pin", "2", "--dir", str(store_dir)]) == 2
    assert capsys.readouterr().err == (
        f"continuity: error: pin refused: cannot use {store_dir} as a checkpoint store: Is a directory "
        f"({store_dir / 'store.lock'})\n"
    )
    (store_dir / "store.lock").rmdir()
    (store_dir / "ledger.jsonl").unlink()
    (store_dir / "ledger.jsonl").mkdir()  # found later than the store's opening: the command's last resort
    assert main(["checkpoints", "list", "--dir", str(store_dir)]) == 1
    assert capsys.readouterr().err == f"continuity: error: [Errno 21] Is a directory: '{store_dir / 'ledger.jsonl'}'\n"


def test_serve_on_a_taken_http_port_or_with_a_file_for_its_store_is_one_line_and_status_2(tmp_path, capsys):
    import socket

    common = ["serve", "--set", 'stream.bootstrap="127.0.0.1:1"']
    a_file = tmp_path / "afile"
    a_file.write_text("not a store")
    assert main([*common, "--set", f'checkpoints.dir="{a_file}"']) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"continuity: error: cannot use {a_file} as a checkpoint store: not a directory (checkpoints.dir)"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        store = tmp_path / "checkpoints"
        assert main([*common, "--set", f'checkpoints.dir="{store}"', "--set", f"service.http_port={port}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"continuity: error: cannot serve HTTP on 127.0.0.1:{port}: Address already in use (service.http_host, "
        "service.http_port; port 0 picks a free one)"
    )
    with CheckpointStore(store, keep_last=3):  # the refused service let its store go
        pass


def test_output_cut_short_by_its_reader_ends_quietly():
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", "from continuity.cli import main; raise SystemExit(main(['config', 'example']))"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child.stdout.close()  # `| head -0`: nobody reads
    _, err = child.communicate(timeout=120)
    assert child.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_late_callbacks_into_a_closed_event_loop_are_not_echoed_and_other_unraisable_errors_still_are():
    """What TensorStore's late callbacks raise after Orbax closed its loop on a damaged checkpoint (a
    traceback per array, after the one line that said what is wrong), simulated by objects whose
    finalizer raises: the CLI's hook drops that one error and passes on every other."""
    import subprocess
    import sys

    script = (
        "from continuity.cli import _drop_late_callbacks_into_closed_loops as install\n"
        "install(); install()\n"
        "class Late:\n"
        "    def __init__(self, message): self.message = message\n"
        "    def __del__(self): raise RuntimeError(self.message)\n"
        "Late('Event loop is closed'); Late('something else broke')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "Event loop is closed" not in done.stderr
    assert done.stderr.count("RuntimeError: something else broke") == 1


@pytest.mark.slow  # a replay to its start
@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("learner.optimizer_args={b1=[1, 2]}", "[learner] optimizer_args: optax.adam fails with them: TypeError"),
        ('probe.golden="{tmp}/missing.npz"', "probe.golden: golden probe file '{tmp}/missing.npz' does not exist."),
        ('probe.golden="{tmp}/stream.parquet"', "probe.golden: golden probe file '{tmp}/stream.parquet' is not a .npz"),
        ('publish.dir="{tmp}/stream.parquet"', "publish.dir: cannot publish models in '{tmp}/stream.parquet' (a file,"),
    ],
)
def test_settings_that_pass_the_config_check_but_cannot_work_stop_the_start_in_one_line(
    tmp_path, capsys, setting, said
):
    recording = record_scenario(tmp_path / "stream.parquet", segments=1, seed=0)
    argv = ["replay", str(recording), "--set", setting.replace("{tmp}", str(tmp_path)), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("continuity: error: ") and said.replace("{tmp}", str(tmp_path)) in err[-1]
    assert not any("Traceback" in line for line in err)


def _replay_fails_in_one_line(tmp_path, capsys, *arguments: str) -> str:
    """`replay` of a one-segment recording with `arguments`: it must exit 2 without a traceback;
    returns its last line on stderr (the error)."""
    recording = record_scenario(tmp_path / "stream.parquet", segments=1, seed=0)
    assert main(["replay", str(recording), *arguments, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    return err[-1]


@ENDS_A_HANG
@pytest.mark.slow  # a replay to its start
def test_a_model_the_memory_cannot_hold_fails_at_its_first_state_in_one_line_not_a_wait_forever(
    tmp_path, capsys, monkeypatch
):
    """A model past the config's memory check (no memory figure to check against) fails at its
    first state in one line naming the model's part, exit 2: it used to leave the loop waiting
    forever on its first read of the state (JAX 0.10 never readies the outputs of a computation
    whose input failed to allocate)."""
    monkeypatch.setattr("continuity.factory.host_memory", lambda: None, raising=False)
    huge = ["--set", "model.hidden=[10000000,10000000]"]  # 400 TB: no machine allocates it
    line = _replay_fails_in_one_line(tmp_path, capsys, *huge)
    assert line.startswith("continuity: error: cannot allocate the learner's first state (Out of memory")
    assert line.endswith(
        "): the model's part of it (its parameters, their optimizer state, EWC's anchor and Fisher) takes "
        "2,000.0 TB: a smaller model"
    )


@ENDS_A_HANG
@pytest.mark.slow  # a replay to its first step
def test_a_train_step_whose_buffers_the_memory_cannot_hold_fails_at_the_first_dispatch_in_one_line(
    tmp_path, capsys, monkeypatch
):
    """A state that fits and a step that does not (here: a step that also returns a 400 TB
    array): the run's first dispatch is waited for, so the failed allocation is one line and
    exit 2, not a loop waiting forever on its first read of the step's outputs."""
    import jax.numpy as jnp

    from continuity.learner.learner import Learner

    real = Learner._train_steps

    def with_a_huge_output(self, state, batches):
        state, metrics = real(self, state, batches)
        wide = jnp.ones(10**7, jnp.float32)
        return state, {**metrics, "huge": jnp.outer(wide, wide)}

    monkeypatch.setattr(Learner, "_train_steps", with_a_huge_output)
    line = _replay_fails_in_one_line(tmp_path, capsys)
    assert line.startswith("continuity: error: the train step cannot allocate its buffers (")
    assert "Out of memory" in line
    assert line.endswith(
        "): lower learner.batch_size or learner.steps_per_dispatch, use a smaller model, or free the device's memory"
    )


@ENDS_A_HANG
@pytest.mark.slow  # a replay through a few dispatches
def test_a_dispatch_that_runs_out_of_memory_mid_run_ends_it_in_one_line_not_a_wait_forever(
    tmp_path, capsys, monkeypatch
):
    """Memory others take while the service runs: a later dispatch fails to allocate. Its outputs
    would never be ready to read (JAX 0.10), and the loop waited forever at the window's close;
    it now ends the run in one line, exit 2."""
    import jax
    import jax.numpy as jnp

    from continuity.learner.learner import Learner

    wide = jnp.ones(10**7, jnp.float32)  # its outer product: 400 TB, a failed allocation
    failed = jax.jit(lambda a: (jnp.outer(a, a), jnp.zeros((), jnp.int32)))(wide)[1]
    real_init = Learner.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        steps, calls = self.train_steps, []

        def train_steps(state, batches):
            state, metrics = steps(state, batches)
            calls.append(1)
            return (state.replace(nonfinite_rows=failed) if len(calls) == 3 else state), metrics

        self.train_steps = train_steps

    monkeypatch.setattr(Learner, "__init__", init)
    line = _replay_fails_in_one_line(tmp_path, capsys)
    assert line.startswith("continuity: error: the train step cannot allocate its buffers (")
    assert "Out of memory" in line


@pytest.mark.slow  # a replay to its start
def test_a_first_state_the_memory_cannot_hold_is_one_line_and_status_2_naming_replay_capacity(
    tmp_path, capsys, monkeypatch
):
    """What slips past the config's memory check (here: no memory figure to check against) fails at
    the first allocation in one line naming replay.capacity, not JAX's RESOURCE_EXHAUSTED traceback."""
    monkeypatch.setattr("continuity.factory.host_memory", lambda: None, raising=False)
    huge = ["--set", "replay.capacity=1000000000", "--set", "stream.feature_shape=[4096]"]  # 16.4 TB
    line = _replay_fails_in_one_line(tmp_path, capsys, *huge)
    assert line.startswith("continuity: error: cannot allocate the learner's first state (RESOURCE_EXHAUSTED")
    assert line.endswith(
        "): its replay buffer of replay.capacity = 1,000,000,000 examples takes 16.4 TB: lower replay.capacity"
    )


def test_a_store_a_replay_holds_is_refused_naming_the_replay_not_a_service(tmp_path, capsys):
    from continuity.config import load_config
    from continuity.service import Service

    recording = record_scenario(tmp_path / "stream.parquet", segments=1, seed=0)
    config = load_config(None, [f'checkpoints.dir="{tmp_path / "run"}"'])
    service = Service(config, recording=recording, http=False)
    try:
        assert main(["checkpoints", "pin", "1", "--dir", str(tmp_path / "run")]) == 2
    finally:
        service.store.close()
    assert "is in use by `continuity replay` (pid " in capsys.readouterr().err


def test_a_replay_stopped_by_an_error_ends_its_progress_bar_line_so_the_error_has_its_own(capsys):
    from types import SimpleNamespace

    from continuity.commands.service import _ProgressBar
    from continuity.stream import Positions

    bar = _ProgressBar({("t", 0): (0, 100)})
    bar.break_line()  # nothing drawn: nothing to end
    assert capsys.readouterr().err == ""
    bar(SimpleNamespace(positions=Positions({}), examples_per_second=10.0, rollbacks=0), None)
    bar.break_line()
    drawn = capsys.readouterr().err
    assert drawn.startswith("\r[") and drawn.endswith("rollbacks 0  \n") and drawn.count("\n") == 1
