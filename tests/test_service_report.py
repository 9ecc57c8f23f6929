"""What the service says about its stream: the progress line, the summary and the exit status (no broker)."""

from __future__ import annotations

import re

from continuity.commands.service import LOST_POSITIONS_EXIT_STATUS, exit_status
from continuity.loop import Progress, RunSummary
from continuity.service import format_progress, format_summary
from continuity.stream import LostPosition, Positions


def _progress(**fields) -> Progress:
    base = dict(
        examples_trained=5632,
        examples_per_second=0.0,
        lineage_examples=5632,
        rollbacks=0,
        dead_letters=0,
        quarantined_records=0,
        probe_accuracy=0.855,
        probe_segments={},
        ewc_strength=12.5,
        checkpoint=5,
        positions=Positions(),
        step_seconds=[],
    )
    return Progress(**{**base, **fields})


def test_the_progress_line_says_the_broker_is_unreachable_where_the_lag_would_stand():
    line = format_progress(_progress(stream_note="broker unreachable for 42 s"), None)
    assert "  broker unreachable for 42 s  probe 0.855" in line and "lag" not in line
    assert "lag 2,996  probe 0.855" in format_progress(_progress(), 2996)


def test_a_run_stopped_on_lost_positions_exits_with_status_4_and_its_summary_names_them(capsys):
    lost = LostPosition("digits", 0, 7953, "beyond the log end", log_start=0, log_end=120)
    summary = RunSummary(lost_positions=[{**lost.to_json(), "action": "halt"}], stopped_on_lost_positions=True)
    assert exit_status(summary) == LOST_POSITIONS_EXIT_STATUS == 4
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("continuity: stopped: saved stream positions the broker no longer has")
    text = format_summary(summary)
    assert "digits/0 at offset 7,953 (log 0..120): beyond the log end [halt]" in text
    assert "halted" in text and "stream.on_lost_positions = 'halt'" in text
    assert exit_status(RunSummary()) == 0 and exit_status(RunSummary(halted=True)) == 3


def test_the_progress_line_and_the_summary_carry_the_prequential_accuracy():
    from continuity.prequential import PrequentialFigures

    figures = PrequentialFigures("accuracy", 0.9132, 0.9411, 5000, 1000, {})
    assert "probe 0.855  prequential 0.913 (last 1,000: 0.941)  train loss" in format_progress(
        _progress(prequential=figures), 0
    )
    assert "prequential n/a" in format_progress(_progress(), 0)
    loss = PrequentialFigures("loss", 0.04123, 0.05, 10, 1000, {})
    assert "prequential loss 0.04123 (last 1,000: 0.05)" in format_progress(_progress(prequential=loss), 0)
    assert re.search(r"^prequential accuracy +0\.913$", format_summary(RunSummary(prequential_accuracy=0.9132)), re.M)
    assert re.search(r"^prequential loss +0\.04123$", format_summary(RunSummary(prequential_loss=0.04123)), re.M)
