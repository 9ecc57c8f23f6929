"""A run's report from its ledger: report.png (probe accuracy per segment over the stream, with
rollbacks, quarantines and lambda marked) and report.md (what happened, in numbers).

A regression task's probe reports mean loss instead of accuracy; the report plots and
tabulates that figure instead.

Everything comes from the ledger, so a report can be made for any checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path


def _offset(positions_json) -> int:
    return sum(int(p["offset"]) for p in positions_json or [])


def ledger_timeline(events: list[dict]) -> dict:
    """The probe decisions of a ledger as series: x = records consumed at each judged window.

    `metric` is "accuracy", or "loss" for a regression task; `segments` and `overall`
    hold that figure.
    """
    windows = [e for e in events if e["event"] == "probe"]
    metric = "loss" if any("loss" in e["probe"] for e in windows) else "accuracy"
    segments: list[str] = []
    for e in windows:
        for name in e["probe"]["segments"]:
            if name not in segments:
                segments.append(name)
    return {
        "x": [_offset(e["to"]) for e in windows],
        "metric": metric,
        "segments": {s: [e["probe"]["segments"].get(s) for e in windows] for s in segments},
        "overall": [e["probe"].get(metric) for e in windows],
        "lambda": [e["ewc_strength"] for e in windows],
        "regressed": [e["verdict"]["regressed"] for e in windows],
        "quarantines": [
            (_offset(e["from"]), _offset(e["to"]), e["records"]) for e in events if e["event"] == "quarantine"
        ],
    }


def write_png(events: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = ledger_timeline(events)
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    for name, values in t["segments"].items():
        points = [(x, v) for x, v in zip(t["x"], values) if v is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker=".", linewidth=1.4, label=name)
    for start, end, _records in t["quarantines"]:
        ax.axvspan(start, end, color="red", alpha=0.12)
    rollbacks = [x for x, regressed in zip(t["x"], t["regressed"]) if regressed]
    for x in rollbacks:
        ax.axvline(x, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("records consumed")
    ax.set_ylabel(f"probe {t['metric']} (candidate, per segment)")
    if t["metric"] == "accuracy":
        ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.step(t["x"], t["lambda"], where="post", color="black", alpha=0.5, linewidth=1, label="EWC lambda")
    twin.set_ylabel("EWC lambda")
    twin.set_yscale("log")
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles += [
        Line2D([], [], color="red", linestyle="--"),
        Patch(color="red", alpha=0.12),
        Line2D([], [], color="black", alpha=0.5),
    ]
    labels += ["regression -> rollback", "quarantined records", "EWC lambda (right axis)"]
    ax.legend(handles, labels, loc="lower left", fontsize=8, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_markdown(
    events: list[dict],
    path: Path,
    *,
    title: str,
    summary: dict,
    intro: str = "",
    final_accuracy: dict | None = None,
    checkpoint_table: str = "",
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
        f"- EWC lambda at the end: {summary['ewc_strength']:.3g}" if summary.get("ewc_strength") is not None else "",
        f"- wall time: {summary['wall_seconds']:.1f} s",
        "",
    ]
    regressions = [e for e in events if e["event"] == "rollback"]
    if regressions:
        lines += [
            "## Regressions caught",
            "",
            "| window | records consumed | regressed on | action |",
            "|---|---|---|---|",
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
            lines.append(f"| {event['window']} | {_offset(probe.get('to')):,} | {'; '.join(drops)} | {what} |")
        lines.append("")
    if t["segments"]:
        metric = t["metric"]
        lines += [f"## Probe {metric} at the last judged window", "", f"| segment | {metric} |", "|---|---|"]
        for name, values in t["segments"].items():
            value = next((v for v in reversed(values) if v is not None), None)
            lines.append(f"| {name} | {'n/a' if value is None else f'{value:.3f}'} |")
        lines.append("")
    if final_accuracy:
        lines += ["## Final model on each segment's held-out test split", "", "| segment | accuracy |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in final_accuracy.items()]
        lines.append("")
    if checkpoint_table:
        lines += ["## Checkpoints", "", "```", checkpoint_table, "```", ""]
    lines += [f"![probe {t['metric']} over the stream](report.png)", ""]
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")
    return path


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
