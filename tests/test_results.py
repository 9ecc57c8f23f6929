"""`--json PATH` results: written whole or not at all, naming the file when they cannot be."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from continuity.commands.results import write_json


def test_a_result_the_disk_refuses_leaves_the_file_as_it_was_and_no_temporary_and_names_it(tmp_path, monkeypatch):
    path = tmp_path / "out" / "result.json"
    write_json(path, {"run": 1})

    def no_space(self, *_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OSError, match=rf"^cannot write '{path}': No space left on device$"):
        write_json(path, {"run": 2})
    assert json.loads(path.read_bytes()) == {"run": 1}
    assert os.listdir(path.parent) == ["result.json"]


def test_a_result_through_a_link_goes_where_it_points_and_the_link_stays(tmp_path):
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, {"run": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"run": 1}


def test_a_result_to_a_pipe_is_written_straight_through_it_not_renamed_over_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    write_json(fifo, {"run": 1})
    reader.join(timeout=10)
    assert json.loads(received[0]) == {"run": 1} and fifo.is_fifo()
