"""`continuity checkpoints ...` and `continuity rollback` on real store directories."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from continuity.checkpoints import CheckpointStore
from continuity.checkpoints import store as store_module
from continuity.cli import main
from continuity.commands.checkpoints import format_positions, rollback_in_directory
from continuity.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def _state(value: float) -> dict:
    return {
        "params": {"dense": {"w": np.full((3, 2), value, np.float32), "b": np.zeros(2, np.float32)}},
        "step": np.int32(value),
    }


@pytest.fixture
def store_dir(tmp_path):
    """Four checkpoints: good, good, good (probe 0.9), regressed."""
    directory = tmp_path / "ckpts"
    with CheckpointStore(directory, keep_last=10) as store:
        for i, status in enumerate(["good", "good", "good", "regressed"]):
            store.save(
                _state(i),
                {},
                {
                    "status": status,
                    "learner_step": 100 * (i + 1),
                    "positions": [
                        {"topic": "t", "partition": 0, "offset": 1200 + i},
                        {"topic": "t", "partition": 1, "offset": 980, "skip": 2},
                    ],
                    "probe": {"accuracy": 0.9 - 0.1 * (i == 3)},
                },
            )
    return directory


def test_list_prints_a_table_and_json(store_dir, capsys):
    assert main(["checkpoints", "list", "--dir", str(store_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["CKPT", "STEP", "SAVED", "POSITIONS", "PROBE", "PINNED", "STATUS"]
    assert len(lines) == 5
    assert lines[1].split()[:2] == ["1", "100"] and "t/0:1200 t/1:980+2" in lines[1] and "0.9000" in lines[1]
    assert lines[4].split()[-1] == "regressed"

    assert main(["checkpoints", "list", "--dir", str(store_dir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["checkpoint"], c["status"], c["pinned"]) for c in listed] == [
        (1, "good", False),
        (2, "good", False),
        (3, "good", False),
        (4, "regressed", False),
    ]
    assert listed[0]["metadata"]["learner_step"] == 100


def test_show_pin_unpin(store_dir, capsys):
    assert main(["checkpoints", "pin", "2", "--dir", str(store_dir)]) == 0
    assert "pinned" in capsys.readouterr().out
    assert main(["checkpoints", "show", "2", "--dir", str(store_dir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["pinned"] is True and shown["abandoned"] is False
    assert shown["metadata"]["learner_step"] == 200 and shown["metadata"]["checkpoint"] == 2
    assert main(["checkpoints", "list", "--dir", str(store_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[-2:] == ["yes", "good"]
    assert main(["checkpoints", "unpin", "2", "--dir", str(store_dir)]) == 0
    capsys.readouterr()
    with CheckpointStore(store_dir, create=False) as store:
        assert not store.info(2).pinned
        assert [e["event"] for e in store.ledger.read()][-2:] == ["pin", "unpin"]


def test_export_writes_params_only(store_dir, tmp_path, capsys):
    out = tmp_path / "p.npz"
    assert main(["checkpoints", "export", "3", "--dir", str(store_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    with np.load(out) as npz:
        assert sorted(npz.files) == ["dense/b", "dense/w"]
        np.testing.assert_array_equal(npz["dense/w"], np.full((3, 2), 2, np.float32))


@pytest.mark.parametrize(
    ("destination", "reason"),
    [
        ("afile/p.npz", "{tmp}/afile is a file, not a directory"),
        ("afile/deeper/p.msgpack", "{tmp}/afile is a file, not a directory"),
        ("adir.npz", "it is a directory (name a file in it)"),
        ("readonly/p.npz", "Permission denied (writing in {tmp}/readonly)"),
    ],
)
def test_an_export_that_cannot_be_written_names_the_destination_and_why_not_the_store(
    store_dir, tmp_path, capsys, monkeypatch, destination, reason
):
    (tmp_path / "afile").write_text("in the way")
    (tmp_path / "adir.npz").mkdir()
    (tmp_path / "readonly").mkdir()

    def refusing_in_readonly(file, mode="r", *args, **kwargs):
        # Another user's directory, simulated: the tests may run as root, whom modes do not stop.
        if Path(file).parent == tmp_path / "readonly" and set(mode) & set("wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(store_module, "open", refusing_in_readonly, raising=False)
    out = tmp_path / destination
    assert main(["checkpoints", "export", "3", "--dir", str(store_dir), "--out", str(out)]) == 2
    said = reason.format(tmp=tmp_path)
    assert capsys.readouterr().err == f"continuity: error: cannot export to {out}: {said}\n"
    assert not list(tmp_path.glob("**/.*.tmp"))  # nothing half-written left behind


def test_rollback_to_and_last_good(store_dir, capsys):
    assert main(["rollback", "--dir", str(store_dir), "--to", "2"]) == 0
    assert capsys.readouterr().out.strip().startswith("the next start restores checkpoint 2 (learner step 200")
    assert main(["checkpoints", "list", "--dir", str(store_dir)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[-1] for row in rows] == ["good", "HEAD", "abandoned", "abandoned"]
    assert rows[1].split()[-2:] == ["good", "HEAD"]
    # --last-good: newest good not abandoned is the head already.
    assert rollback_in_directory(store_dir, last_good=True) == 0
    assert "already restores checkpoint 2" in capsys.readouterr().out
    with CheckpointStore(store_dir, create=False) as store:
        assert store.head == 2 and store.info(3).abandoned
        rollback = [e for e in store.ledger.read() if e["event"] == "rollback"]
        assert [(e["checkpoint"], e["reason"]) for e in rollback] == [(2, "manual rollback")]


def test_rollback_last_good_skips_regressed(store_dir, capsys):
    assert main(["rollback", "--dir", str(store_dir), "--last-good", "--reason", "cleanup"]) == 0
    assert "restores checkpoint 3" in capsys.readouterr().out
    with CheckpointStore(store_dir, create=False) as store:
        assert store.head == 3 and store.info(4).abandoned


@pytest.mark.parametrize(
    "argv, message",
    [
        (["checkpoints", "list", "--dir", "{missing}"], "no checkpoint store at"),
        (["checkpoints", "list", "--dir", "{empty}"], "holds no checkpoints yet"),
        (["checkpoints", "show", "7", "--dir", "{store}"], r"no checkpoint 7 in .* \(checkpoints: 1, 2, 3, 4\)"),
        (["checkpoints", "pin", "7", "--dir", "{store}"], "no checkpoint 7"),
        (["checkpoints", "export", "7", "--dir", "{store}", "--out", "{tmp}/p.npz"], "no checkpoint 7"),
        (["checkpoints", "export", "1", "--dir", "{store}", "--out", "{tmp}/p.pt"], r"\.msgpack, \.npz"),
        (["rollback", "--dir", "{store}", "--to", "4"], "status 'regressed'"),
        (["rollback", "--dir", "{store}", "--to", "9"], "no checkpoint 9"),
        (["rollback", "--dir", "{empty}", "--last-good"], "holds no checkpoints yet"),
    ],
)
def test_user_errors_are_one_line_and_status_2(store_dir, tmp_path, capsys, argv, message):
    empty = tmp_path / "empty"
    CheckpointStore(empty).close()
    paths = {"missing": tmp_path / "missing", "empty": empty, "store": store_dir, "tmp": tmp_path}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("continuity: error: ")
    assert __import__("re").search(message, err), err


@pytest.mark.parametrize(
    "argv",
    [
        ["checkpoints", "show", "two", "--dir", "x"],
        ["checkpoints", "pin", "0", "--dir", "x"],
        ["rollback", "--dir", "x"],
        ["rollback", "--dir", "x", "--to", "1", "--last-good"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err


def test_rollback_in_directory_needs_exactly_one_target(store_dir):
    with pytest.raises(UsageError, match="exactly one"):
        rollback_in_directory(store_dir)


def test_format_positions():
    assert (
        format_positions(
            [{"topic": "t", "partition": 0, "offset": 1200}, {"topic": "t", "partition": 1, "offset": 980}]
        )
        == "t/0:1200 t/1:980"
    )
    assert format_positions({"t/0": 5}) == "t/0:5"
    assert format_positions({"t": {"0": 5, "1": 6}}) == "t/0:5 t/1:6"
    assert format_positions(None) == "-"


@pytest.mark.slow  # a subprocess
def test_installed_command_exits_2_with_one_stderr_line(store_dir):
    executable = REPO / ".venv" / "bin" / "continuity"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "continuity.cli"]
    result = subprocess.run(
        command + ["checkpoints", "show", "12", "--dir", str(store_dir)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no checkpoint 12" in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("argv", [["checkpoints", "repair"], ["checkpoints", "pin", "1"], ["rollback", "--last-good"]])
def test_a_change_to_a_directory_that_holds_nothing_of_a_store_is_refused_and_writes_nothing_there(
    tmp_path, capsys, argv
):
    directory = tmp_path / "notes"
    directory.mkdir()
    (directory / "notes.txt").write_text("an operator's")
    assert main([*argv, "--dir", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{directory} is no checkpoint store" in err
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]
