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
    source = tmp_path / "source"  # a copy: setuptools builds inside the source tree (build/, *.egg-info)
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("continuity", "stream", "learner", "replay", "checkpoints", "benchmarks"):
        shutil.copytree(ROOT / package, source / package, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(tmp_path)], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    (wheel,) = tmp_path.glob("continuity-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"continuity"}
    # The libraries are inside it as real modules (the symlinks followed), benchmarks included.
    for module in ("stream/codecs", "learner/learner", "replay/state", "checkpoints/store", "benchmarks/run"):
        assert f"continuity/{module}.py" in names
