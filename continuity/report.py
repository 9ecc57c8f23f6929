"""A run's report from its ledger: report.png (the kept model's probe accuracy per segment over the
stream, rejected candidates faded, rollbacks and quarantines marked, EWC lambda in a panel below)
and report.md (what happened, in numbers).

What a reader wants from the plot is the model the service kept: a rejected candidate's
figures (perm-0 falling to 0.36 under a broken labeler) say what the guard refused, not
what is served, so they are drawn faded beside the kept model's line. At a regressed
window the kept model is the last good one, and the verdict holds its figures on the
same probe (`good_<metric>` per segment), so no figure is invented.

Beside the probe's lines, the prequential (test-then-train) figure of each judged window:
its trained records, each predicted before the update that trained on it (the ledger's
`prequential.judged_window`; continuity/prequential.py), a rejected window's included.

The probe's figure is the task's (Task.outcome.figure): accuracy, or the mean loss for a
task judged on losses (regression, multi-label); the report plots and tabulates whichever
the ledger holds.

Everything comes from the ledger, so a report can be made for any checkpoint directory;
what only the producer of the stream knows (which quarantined records were poisoned) is
passed in as `QuarantineTally`s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def _offset(positions_json) -> int:
    return sum(int(p["offset"]) for p in positions_json or [])


@dataclass(frozen=True)
class QuarantineTally:
    """One quarantine's records, and how many of them the stream's producer knows were poisoned."""

    start: int  # records consumed where the quarantined window starts (the ledger's `from`)
    end: int  # ... and where it ends (`to`)
    records: int
    poisoned: int

    @property
    def clean(self) -> int:
        """Records that were fine but went with the window: what a quarantine costs."""
        return self.records - self.poisoned


@dataclass
class Timeline:
    """The probe decisions of a ledger as series over the judged windows.

    x = records consumed at the end of each judged window. `metric` is "accuracy", or
    "loss" for a task judged on losses (Task.outcome.figure); the per-segment series hold that figure (None where a
    segment has no figure at that window).
    """

    metric: str = "accuracy"
    x: list[int] = field(default_factory=list)
    regressed: list[bool] = field(default_factory=list)
    candidate: dict[str, list[float | None]] = field(default_factory=dict)  # every candidate judged
    kept: dict[str, list[float | None]] = field(default_factory=dict)  # the model kept after each judgement
    kept_overall: list[float | None] = field(default_factory=list)
    # EWC lambda as steps: (records consumed, lambda from there on); boosts are the rollbacks' values.
    ewc_lambda: list[tuple[int, float]] = field(default_factory=list)
    boosts: list[tuple[int, float]] = field(default_factory=list)
    quarantines: list[tuple[int, int, int]] = field(default_factory=list)  # (from, to, records)
    # Each judged window's prequential figure (its records predicted before training on them); None: not in the ledger.
    prequential: list[float | None] = field(default_factory=list)

    @property
    def segments(self) -> list[str]:
        """Every segment any judged probe had, in order of first appearance."""
        return list(self.candidate)


def ledger_timeline(events: list[dict]) -> Timeline:
    """The series report.png and report.md show, from a ledger's events (oldest first)."""
    windows = [e for e in events if e["event"] == "probe"]
    t = Timeline(metric="loss" if any("loss" in e["probe"] for e in windows) else "accuracy")
    for e in windows:
        for name in e["probe"]["segments"]:
            t.candidate.setdefault(name, [])
            t.kept.setdefault(name, [])
    window_end: dict[int, int] = {}
    kept_segments: set[str] = set()  # segments the kept model's own probe has
    kept_overall: float | None = None
    for e in windows:
        verdict = e.get("verdict") or {}
        regressed = bool(verdict.get("regressed"))
        t.x.append(_offset(e["to"]))
        t.regressed.append(regressed)
        window_end[e["window"]] = _offset(e["to"])
        t.ewc_lambda.append((_offset(e["from"]), float(e["ewc_strength"])))  # in effect while the window trained
        if regressed:  # the last good model stays: its figures on this probe are in the verdict
            good = {
                name: figures.get(f"good_{t.metric}")
                for name, figures in (verdict.get("segments") or {}).items()
                if name in kept_segments  # not the rejected window's own new segments
            }
        else:
            good = dict(e["probe"]["segments"])
            kept_segments = set(good)
            kept_overall = e["probe"].get(t.metric)
        for name in t.candidate:
            t.candidate[name].append(e["probe"]["segments"].get(name))
            t.kept[name].append(good.get(name))
        t.kept_overall.append(kept_overall)
        t.prequential.append((e.get("prequential") or {}).get("judged_window"))
    for e in events:
        if e["event"] == "rollback" and e.get("ewc_strength") is not None and e.get("window") in window_end:
            boost = (window_end[e["window"]], float(e["ewc_strength"]))
            t.boosts.append(boost)
            t.ewc_lambda.append(boost)
        elif e["event"] == "quarantine":
            t.quarantines.append((_offset(e["from"]), _offset(e["to"]), int(e["records"])))
    t.ewc_lambda.sort(key=lambda point: point[0])  # stable: a boost stays after the window it ends
    if t.ewc_lambda and t.x:
        t.ewc_lambda.append((t.x[-1], t.ewc_lambda[-1][1]))  # draw the last value to the end
    return t


def write_png(events: list[dict], path: Path, title: str, *, tallies: Sequence[QuarantineTally] = ()) -> Path:
    import matplotlib.pyplot as plt

    fig = draw(events, title, tallies=tallies)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw(events: list[dict], title: str, *, tallies: Sequence[QuarantineTally] = ()):
    """report.png's figure: the kept model's probe figures above, EWC lambda (log axis) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    t = ledger_timeline(events)
    fig, (ax, lam) = plt.subplots(
        2, 1, figsize=(12, 7.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3.2, 1], "hspace": 0.08}
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles: list[Artist] = []
    labels: list[str] = []
    for i, name in enumerate(t.segments):
        color = colors[i % len(colors)]
        kept = [(x, v) for x, v in zip(t.x, t.kept[name]) if v is not None]
        if kept:
            ax.plot(*zip(*kept), color=color, marker="o", markersize=3.5, linewidth=1.8)
        rejected_seen = False
        for j, (x, regressed, value) in enumerate(zip(t.x, t.regressed, t.candidate[name])):
            if not regressed or value is None:
                continue
            rejected_seen = True
            ax.plot([x], [value], color=color, marker="x", markersize=7, alpha=0.45, linestyle="none")
            before = next((t.kept[name][k] for k in range(j - 1, -1, -1) if t.kept[name][k] is not None), None)
            if before is not None:  # how far the refused candidate fell from what was kept
                ax.plot([t.x[j - 1], x], [before, value], color=color, linestyle=":", linewidth=1, alpha=0.45)
        handles.append(Line2D([], [], color=color, marker="o" if kept else "x", alpha=1.0 if kept else 0.45))
        labels.append(name if kept or not rejected_seen else f"{name} (rejected)")
    prequential = [(x, v) for x, v in zip(t.x, t.prequential) if v is not None]
    if prequential:
        ax.plot(*zip(*prequential), color="black", linestyle="--", linewidth=1.4, marker=".", markersize=4)
        handles.append(Line2D([], [], color="black", linestyle="--", marker="."))
        labels.append(f"prequential {t.metric} (each window's records, before training on them)")
    for panel in (ax, lam):
        for start, end, _records in t.quarantines:
            panel.axvspan(start, end, color="red", alpha=0.1, linewidth=0)
        for x, regressed in zip(t.x, t.regressed):
            if regressed:
                panel.axvline(x, color="red", linestyle="--", linewidth=0.9, alpha=0.7)
        panel.grid(alpha=0.3)
    for number, (start, end, _records) in enumerate(t.quarantines, 1):
        ax.annotate(
            f"Q{number}",
            xy=((start + end) / 2, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, -3),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=8,
            color="darkred",
        )
    if tallies:  # what each quarantine took: the poisoned records, and the clean ones with them
        lines = ["quarantined records"] + [
            f"Q{number}: {tally.records:,} = {tally.poisoned:,} poisoned + {tally.clean:,} clean"
            for number, tally in enumerate(tallies, 1)
        ]
        fig.text(0.805, 0.10, "\n".join(lines), fontsize=8, color="darkred", va="bottom", linespacing=1.5)
    ax.set_ylabel(f"probe {t.metric} of the kept model")
    if t.metric == "accuracy":
        ax.set_ylim(0, 1.1)
    ax.set_title(title)
    handles += [
        Line2D([], [], color="gray", marker="x", linestyle=":", alpha=0.45),
        Line2D([], [], color="red", linestyle="--", alpha=0.7),
        Patch(color="red", alpha=0.1),
    ]
    labels += ["rejected candidate (faded)", "regression -> rollback", "quarantined window"]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.015, 1.0), fontsize=8, frameon=False)

    if t.ewc_lambda:
        xs, values = zip(*t.ewc_lambda)
        lam.step(xs, values, where="post", color="black", linewidth=1.3)
        if t.boosts:
            lam.plot(*zip(*t.boosts), color="darkred", marker="o", markersize=4, linestyle="none")
        lam.set_yscale("log")
        low, high = min(values), max(values)
        lam.set_ylim(low / 1.8, high * 2.5)  # room above the highest boost for its label
        for x, value in t.boosts:
            lam.annotate(
                f"boost -> {value:.3g}",
                xy=(x, value),
                xytext=(-4, 3),
                textcoords="offset points",
                ha="right",
                va="bottom",
                fontsize=7.5,
                color="darkred",
            )
    lam.set_ylabel("EWC lambda (log)")
    lam.set_xlabel("records consumed")
    fig.subplots_adjust(left=0.07, right=0.79, top=0.94, bottom=0.08)
    return fig


def write_markdown(
    events: list[dict],
    path: Path,
    *,
    title: str,
    summary: dict,
    intro: str = "",
    final_accuracy: dict | None = None,
    checkpoint_table: str = "",
    tallies: Sequence[QuarantineTally] = (),
) -> Path:
    t = ledger_timeline(events)
    lines = [f"# {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += [
        "## In numbers",
        "",
        f"- examples trained: {summary['examples_trained']:,} in {summary['windows']} judged windows "
        f"({summary['accepted']} accepted)",
        f"- rollbacks: {summary['rollbacks']} (retried {summary['retries']})",
        f"- quarantined records: {summary['quarantined_records']:,}",
        f"- dead letters: {summary['dead_letters']:,}",
        f"- last good checkpoint: {summary['last_checkpoint']}",
        _prequential_line(summary),
        f"- EWC lambda at the end: {summary['ewc_strength']:.3g}" if summary.get("ewc_strength") is not None else "",
        f"- wall time: {summary['wall_seconds']:.1f} s",
        "",
    ]
    regressions = [e for e in events if e["event"] == "rollback"]
    if regressions:
        lines += [
            "## Regressions caught",
            "",
            "| window | records consumed | regressed on | EWC lambda | action |",
            "|---|---|---|---|---|",
        ]
        probes = {e["window"]: e for e in events if e["event"] == "probe"}
        for event, action in _reactions(events):
            probe = probes.get(event["window"], {})
            shown_checks: dict[str, dict] = {}  # the first test that fired for each window check (and golden)
            for test in event.get("fired", ()):
                if test.get("check") != "probe":
                    shown_checks.setdefault(test["check"], test)
            drops = [_fired(test) for test in shown_checks.values()]
            metric = probe.get("verdict", {}).get("metric", "accuracy")
            for scope in (s for s in event["scopes"] if not s.startswith("window.") and s != "golden"):
                figures = probe.get("verdict", {}).get("segments", {}).get(scope) or probe.get("verdict", {}).get(
                    "overall"
                )
                if figures:
                    good, candidate = figures[f"good_{metric}"], figures[f"candidate_{metric}"]
                    shown = (
                        f"{good:.2f} -> {candidate:.2f}"
                        if metric == "accuracy"
                        else f"loss {good:.3g} -> {candidate:.3g}"
                    )
                    drops.append(f"{scope} {shown} (p={figures['p_value']:.1e})")
            what = action["event"] + (f" ({action['records']} records)" if action["event"] == "quarantine" else "")
            if action["event"] == "retrain":
                what = "retrain " + ("the first half" if action.get("excise") is None else "without the span found")
            boost = (
                f"{probe['ewc_strength']:.3g} -> {event['ewc_strength']:.3g}"
                if probe.get("ewc_strength") is not None and event.get("ewc_strength") is not None
                else "-"
            )
            lines.append(
                f"| {event['window']} | {_offset(probe.get('to')):,} | {'; '.join(drops)} | {boost} | {what} |"
            )
        lines.append("")
    if tallies:
        lines += ["## What the quarantines took", ""]
        lines += [
            f"- records consumed {tally.start:,} to {tally.end:,}: {tally.records:,} records quarantined, "
            f"of which {tally.poisoned:,} poisoned and {tally.clean:,} clean"
            for tally in tallies
        ]
        lines.append("")
    if t.segments:
        metric = t.metric
        rejected_last = bool(t.regressed and t.regressed[-1])
        header = f"| segment | kept model's {metric} |" + (" rejected candidate's |" if rejected_last else "")
        lines += [
            f"## Probe {metric} at the last judged window",
            "",
            header,
            "|---|---|" + ("---|" if rejected_last else ""),
        ]
        for name in t.segments:
            kept = t.kept[name][-1] if t.kept[name] else None
            row = f"| {name} | {_figure(kept)} |"
            if rejected_last:
                row += f" {_figure(t.candidate[name][-1])} |"
            lines.append(row)
        lines.append("")
    if final_accuracy:
        lines += ["## Final model on each segment's held-out test split", "", "| segment | accuracy |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in final_accuracy.items()]
        lines.append("")
    if checkpoint_table:
        lines += ["## Checkpoints", "", "```", checkpoint_table, "```", ""]
    lines += [f"![probe {t.metric} over the stream](report.png)", ""]
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")
    return path


def _prequential_line(summary: dict) -> str:
    """The since-start test-then-train figure of the surviving lineage, if the run reported one."""
    accuracy, loss = summary.get("prequential_accuracy"), summary.get("prequential_loss")
    if accuracy is None and loss is None:
        return ""
    figure = f"accuracy {accuracy:.3f}" if accuracy is not None else f"loss {loss:.4g}"
    return (
        f"- prequential {figure} since the start, over {summary.get('prequential_examples', 0):,} trained "
        "examples (each predicted before the update that trained on it; rolled-back windows not counted)"
    )


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _reactions(events: list[dict]) -> list[tuple[dict, dict]]:
    """Each rollback with the reaction that followed it (retry, retrain, quarantine or halt)."""
    pairs, pending = [], None
    for event in events:
        if event["event"] == "rollback":
            pending = event
        elif event["event"] in ("retry", "retrain", "quarantine", "halt") and pending is not None:
            pairs.append((pending, event))
            pending = None
    return pairs


def _fired(test: dict) -> str:
    """A window check or the golden constraint that fired, in a few words."""
    if test.get("check") == "golden":
        return f"golden {test['candidate_accuracy']:.2f} < best {test['best_accuracy']:.2f} - {test['tolerance']}"
    return (
        f"{test['check']} {test['rate']:.2f} > {test['null_rate']:.2f} on block {test['block']} "
        f"(p={test['p_value']:.1e})"
    )
