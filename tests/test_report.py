"""The demo's report from a ledger: the kept model's figures (rejected candidates apart), lambda on
its own axis with every boost, and what each quarantine took, poisoned and clean."""

from __future__ import annotations

import base64

import numpy as np

from continuity.demo import tally_quarantines
from continuity.report import QuarantineTally, draw, ledger_timeline, write_markdown, write_png
from continuity.stream import FeatureSpec, make_codec


def _at(offset: int) -> list[dict]:
    return [{"topic": "digits", "partition": 0, "offset": offset}] if offset else []


def _probe(window, start, end, figures, ewc, verdict=None) -> dict:
    return {
        "event": "probe",
        "window": window,
        "from": _at(start),
        "to": _at(end),
        "probe": {"accuracy": float(np.mean(list(figures.values()))), "segments": figures},
        "verdict": verdict or {"regressed": False, "regressed_scopes": [], "segments": {}},
        "ewc_strength": ewc,
    }


def _figures(good: float, candidate: float, p: float = 0.5) -> dict:
    return {"good_accuracy": good, "candidate_accuracy": candidate, "p_value": p, "regressed": p < 0.01}


# Window 3 trains on a broken labeler: the candidate falls on "a" and is refused; its records
# are quarantined, lambda is boosted 4x; window 4 is accepted again.
LEDGER = [
    {"event": "start", "fresh": True},
    _probe(1, 0, 1000, {"a": 0.9}, 100.0),
    _probe(2, 1000, 2000, {"a": 0.88, "b": 0.8}, 50.0),
    _probe(
        3,
        2000,
        3000,
        {"a": 0.3, "b": 0.82, "b-poisoned": 0.1},
        25.0,
        {
            "regressed": True,
            "regressed_scopes": ["a"],
            "segments": {"a": _figures(0.88, 0.3, 1e-9), "b": _figures(0.79, 0.82), "b-poisoned": _figures(0.05, 0.1)},
        },
    ),
    {"event": "rollback", "window": 3, "scopes": ["a"], "ewc_strength": 100.0, "positions": _at(2000)},
    {"event": "quarantine", "records": 1000, "from": _at(2000), "to": _at(3000)},
    _probe(4, 3000, 4000, {"a": 0.87, "b": 0.81}, 100.0),
]
SUMMARY = {
    "examples_trained": 4000,
    "windows": 4,
    "accepted": 3,
    "rollbacks": 1,
    "retries": 0,
    "quarantined_records": 1000,
    "dead_letters": 0,
    "last_checkpoint": 3,
    "ewc_strength": 50.0,
    "wall_seconds": 1.0,
}


def test_the_kept_models_figures_stay_with_the_last_good_model_where_a_candidate_is_rejected():
    t = ledger_timeline(LEDGER)
    assert t.x == [1000, 2000, 3000, 4000] and t.regressed == [False, False, True, False]
    assert t.kept["a"] == [0.9, 0.88, 0.88, 0.87]  # the good model's figure at the rejected window
    assert t.candidate["a"] == [0.9, 0.88, 0.3, 0.87]
    assert t.kept["b"] == [None, 0.8, 0.79, 0.81]
    # A segment that only the rejected window brought has no kept figure: the kept probe never had it.
    assert t.kept["b-poisoned"] == [None] * 4 and t.candidate["b-poisoned"][2] == 0.1


def test_lambda_steps_show_every_boost_where_its_window_was_judged():
    t = ledger_timeline(LEDGER)
    assert t.boosts == [(3000, 100.0)]
    assert t.ewc_lambda == [(0, 100.0), (1000, 50.0), (2000, 25.0), (3000, 100.0), (3000, 100.0), (4000, 100.0)]


def test_the_plot_draws_lambda_on_a_log_axis_of_its_own_that_holds_every_boost_and_fades_rejected_candidates():
    import matplotlib.pyplot as plt

    fig = draw(LEDGER, "test", tallies=[QuarantineTally(2000, 3000, 1000, 600)])
    try:
        accuracy, lam = fig.axes
        assert lam.get_yscale() == "log" and accuracy.get_yscale() == "linear"
        low, high = lam.get_ylim()
        assert low < 25.0 and 100.0 < high  # the whole range, boosts included, is inside the axis
        rejected = [line for line in accuracy.lines if line.get_marker() == "x"]
        assert {tuple(line.get_xydata()[0]) for line in rejected} == {(3000, 0.3), (3000, 0.82), (3000, 0.1)}
        assert all((line.get_alpha() or 1.0) < 0.5 for line in rejected)
        kept = [line for line in accuracy.lines if line.get_marker() == "o"]
        assert all(line.get_alpha() is None for line in kept)
        texts = [text.get_text() for text in fig.texts]
        assert any("Q1: 1,000 = 600 poisoned + 400 clean" in text for text in texts)
    finally:
        plt.close(fig)


def test_report_md_has_a_line_per_quarantine_with_its_poisoned_and_clean_records(tmp_path):
    tallies = [QuarantineTally(2000, 3000, 1000, 600)]
    text = write_markdown(LEDGER, tmp_path / "report.md", title="t", summary=SUMMARY, tallies=tallies).read_text()
    assert "- records consumed 2,000 to 3,000: 1,000 records quarantined, of which 600 poisoned and 400 clean" in text
    assert "| 3 | 3,000 | a 0.88 -> 0.30 (p=1.0e-09) | 25 -> 100 | quarantine (1000 records) |" in text
    assert "| a | 0.870 |" in text  # the last window was accepted: the kept model's figures only
    png = write_png(LEDGER, tmp_path / "report.png", "t", tallies=tallies).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_quarantined_records_are_told_poisoned_or_clean_by_the_segment_their_payload_names():
    codec = make_codec("binary", FeatureSpec((2,), "float32", 10))

    def entry(offset: int, segment: str) -> dict:
        value = codec.encode(np.zeros(2, np.float32), 1, segment=segment)
        return {
            "topic": "digits",
            "partition": 0,
            "offset": offset,
            "timestamp_ms": 0,
            "key_b64": None,
            "value_b64": base64.b64encode(value).decode(),
            "reason": "quarantined",
        }

    # Two quarantines: the first takes the clean tail of "b" with the start of the poisoned segment.
    quarantined = [entry(o, "b") for o in range(2000, 2400)] + [entry(o, "b-poisoned") for o in range(2400, 3500)]
    events = [
        {"event": "quarantine", "records": 1000, "from": _at(2000), "to": _at(3000)},
        {"event": "quarantine", "records": 500, "from": _at(3000), "to": _at(3500)},
    ]
    assert tally_quarantines(events, quarantined, codec, {"b-poisoned"}) == [
        QuarantineTally(2000, 3000, 1000, 600),
        QuarantineTally(3000, 3500, 500, 500),
    ]


def test_each_judged_windows_prequential_figure_is_drawn_beside_the_probe_and_reported_since_the_start(tmp_path):
    import matplotlib.pyplot as plt

    ledger = [dict(e) for e in LEDGER]
    judged = [e for e in ledger if e["event"] == "probe"]
    for event, figure in zip(judged, (0.6, 0.85, 0.4, 0.86)):
        event["prequential"] = {"total": None, "judged_window": figure}
    judged[0]["prequential"] = {"total": None}  # a window without a figure is left out, not drawn as 0
    assert ledger_timeline(ledger).prequential == [None, 0.85, 0.4, 0.86]
    fig = draw(ledger, "test")
    try:
        dashed = [line for line in fig.axes[0].lines if line.get_linestyle() == "--" and line.get_color() == "black"]
        assert len(dashed) == 1 and dashed[0].get_xydata().tolist() == [[2000, 0.85], [3000, 0.4], [4000, 0.86]]
    finally:
        plt.close(fig)
    summary = {**SUMMARY, "prequential_accuracy": 0.8123, "prequential_examples": 3000}
    text = write_markdown(ledger, tmp_path / "report.md", title="t", summary=summary).read_text()
    assert "- prequential accuracy 0.812 since the start, over 3,000 trained examples" in text
    assert "prequential" not in write_markdown(LEDGER, tmp_path / "plain.md", title="t", summary=SUMMARY).read_text()
