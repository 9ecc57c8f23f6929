"""What the code says holds: docstrings and comments cite files that exist, and the log calls
quarantined records what they are, not dead letters."""

from __future__ import annotations

import ast
import io
import logging
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

from continuity.config import load_config
from continuity.service import build_stream
from continuity.stream import DeadLetter, Position, Record

REPO = Path(__file__).resolve().parents[1]
# Paths under these folders are the repository's; others in docs are examples (runs/..., out/...).
REPOSITORY_FOLDERS = ("continuity", "stream", "learner", "replay", "checkpoints", "benchmarks", "tests", "deploy")
# `folder/name.ext`, a project document (`BENCHMARKS.md`), or a module's file name (`loop.py`);
# lowercase `report.md` and the like are files the programs write, not citations.
CITATION = re.compile(
    r"(?<![\w./-])(?P<path>(?:[\w-]+/)+[\w.-]+\.(?:py|md|toml|txt|yml|yaml|json))\b"
    r"|(?<![\w./-])(?P<document>[A-Z][A-Z0-9_]*\.md)\b"
    r"|(?<![\w./-])(?P<module>\w+\.py)\b"
)


def _python_files() -> list[Path]:
    skipped = {"build", "dist", "node_modules"}
    files = {
        path.resolve()
        for path in REPO.rglob("*.py")
        if not any(part.startswith(".") or part in skipped for part in path.relative_to(REPO).parts)
    }
    return sorted(files)


def _comments_and_docstrings(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                yield node.body[0].lineno, docstring


def broken_citations(path: Path, repo: Path, names: set[str]) -> list[str]:
    """Citations in `path`'s comments and docstrings of files the repository at `repo` (its file
    names: `names`) does not have."""
    broken = []
    for line, text in _comments_and_docstrings(path):
        for match in CITATION.finditer(text):
            cited = match.group(0)
            if match["path"] and cited.split("/", 1)[0] in REPOSITORY_FOLDERS:
                found = (repo / cited).exists()
            elif match["document"]:
                found = (repo / cited).exists()
            elif match["module"]:
                found = cited in names
            else:
                continue
            if not found:
                broken.append(f"{path.relative_to(repo)}:{line} cites {cited}")
    return broken


def test_docstrings_and_comments_cite_only_files_in_the_repository():
    files = _python_files()
    assert len(files) > 50, "the scan found too few files to be looking at the repository"
    names = {path.name for path in files}
    broken = [citation for path in files for citation in broken_citations(path, REPO, names)]
    assert broken == []


def test_the_citation_check_finds_a_missing_document_path_and_module(tmp_path):
    (tmp_path / "continuity").mkdir()
    (tmp_path / "continuity" / "loop.py").write_text("")
    (tmp_path / "README.md").write_text("")
    cited = tmp_path / "continuity" / "cited.py"
    cited.write_text(
        '"""Explained in DESIGN.md and continuity/nowhere.py; runs/out/report.md is an output."""\n'
        "# see continuity/loop.py, README.md, loop.py and missing_module.py\n"
    )
    broken = broken_citations(cited, tmp_path, {"loop.py", "cited.py"})
    assert sorted(b.split(" cites ")[1] for b in broken) == ["DESIGN.md", "continuity/nowhere.py", "missing_module.py"]


def test_the_quarantine_file_logs_quarantined_records_and_the_dead_letter_sink_dead_letters(tmp_path, caplog):
    config = load_config(None, [f'checkpoints.dir="{tmp_path}"'])
    stream = build_stream(config, recording=tmp_path / "stream.parquet")
    record = Record(b"value", b"key", 0, Position("digits", 0, 5))
    caplog.set_level(logging.WARNING, logger="continuity.stream.deadletters")
    try:
        stream.quarantine.put(DeadLetter(record, "quarantined: regression on perm-1"))
        stream.dead_letters.put(DeadLetter(record, "bad shape: expected 64 values, got 3"))
    finally:
        stream.quarantine.close()
        stream.dead_letters.close()
    quarantined, dead = (r.getMessage() for r in caplog.records)
    assert quarantined.startswith("quarantined record digits/0@5 ") and "dead letter" not in quarantined
    assert dead.startswith("dead letter digits/0@5 (bad shape #1)")
