"""The built distribution installs one top-level package, `continuity`, and nothing else."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds a wheel (a few seconds)


def test_the_wheel_installs_only_the_continuity_package(tmp_path):
    # The libraries live in top-level folders (stream/, learner/, ...) for the layout, but a
    # wheel that installed them as `stream`, `learner`, `replay`, `checkpoints`, `benchmarks`
    # would take names other projects own on the package index.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PIP_NO_INDEX": "1", "TMPDIR": str(tmp_path)},
    )
    (wheel,) = tmp_path.glob("continuity-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"continuity"}
    # The libraries are inside it, as real modules (the symlinks followed), benchmarks included.
    for module in (
        "stream/codecs.py",
        "learner/learner.py",
        "replay/state.py",
        "checkpoints/store.py",
        "benchmarks/run.py",
    ):
        assert f"continuity/{module}" in names
