"""Prometheus metrics of one running service, read at scrape time from the loop's latest snapshot.

`ServiceMetrics` is a prometheus_client collector in its own `CollectorRegistry` (so
several services or tests in one process never collide in the global one); `/metrics`
renders that registry (see `continuity.http`). Nothing is pushed into metric objects:
the loop hands its `Progress` snapshots to `observe`, and each scrape reads one
consistent view, the latest snapshot with the lag measured for it plus what the service
knows live (readiness, whether the stream reads), and builds every family from it. So a
series exists only while the snapshot has it: a probe segment evicted from the probe
(an unsegmented stream opens one per window) or a revoked partition simply stops being
exported, and the series count stays bounded however long the stream runs.

Two kinds of figures need more than the latest snapshot, and are folded in as each one
arrives (pure functions over small immutable state, so a scrape copies them whole):
- Counters: the loop reports running totals. A total that goes down means the loop behind
  it started over (a new run in this process); what the old run had counted is carried,
  so the counter stays monotonic.
- The step-time histogram: a snapshot carries the step times since the previous one;
  they are added to cumulative bucket counts.

Adding a metric: give `Progress` (continuity/loop.py) the field, then add one entry to
`METRICS`: `Total` for a running total (a counter), `Value` for one gauge value, `PerLabel`
for a gauge per label value, `Timings` for a histogram of per-snapshot durations. Then a
row in the README's metrics table.

Threading: `observe` runs on the loop's thread, `collect` on HTTP threads; the folded
state is swapped under a lock, and families are built outside it.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from continuity.loop import Progress
    from continuity.prequential import PrequentialFigures

# Train-step wall times run from ~0.1 ms (tiny MLP, warm, on a GPU) to ~1 s (a big batch on
# CPU); roughly x2.5 apart so the quantiles stay readable across that whole range.
STEP_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

OVERALL = "overall"  # the `segment` label of the whole-probe accuracy (or loss)


@dataclass(frozen=True)
class ServiceState:
    """What the service knows besides the loop's snapshots, read live at each scrape."""

    ready: bool = False  # what /readyz answers
    stream_reading: bool = False  # the source reads (Kafka: broker reachable, partitions assigned)
    checkpoint_saved_at: float | None = None  # Unix time the newest good checkpoint was saved


@dataclass(frozen=True)
class Reading:
    """One scrape's view: the latest snapshot, the lag measured with it, and the live service state."""

    progress: Progress | None
    lag: Mapping[str, int]
    service: ServiceState


class MetricSpec(Protocol):
    """One exported metric: how snapshots fold into its state, and its family from a Reading."""

    @property
    def name(self) -> str: ...

    def start(self) -> Any: ...

    def fold(self, state: Any, progress: Progress) -> Any: ...

    def family(self, reading: Reading, state: Any) -> Metric: ...


class _Stateless:
    """A metric read from the latest Reading alone."""

    def start(self) -> None:
        return None

    def fold(self, state: None, progress: Progress) -> None:
        return None


@dataclass(frozen=True)
class Carried:
    """A running total of the current run, and what earlier runs in this process had counted."""

    carried: int = 0
    last: int = 0

    @property
    def value(self) -> int:
        return self.carried + self.last


@dataclass(frozen=True)
class Total:
    """A counter from one of `Progress`'s running totals, monotonic across loop restarts."""

    name: str  # prometheus_client appends `_total` to the sample
    help: str
    field: str  # the Progress attribute

    def start(self) -> Carried:
        return Carried()

    def fold(self, state: Carried, progress: Progress) -> Carried:
        total = int(getattr(progress, self.field) or 0)
        if total < state.last:  # went down: a new run started, and counts from zero
            return Carried(carried=state.value, last=total)
        return Carried(carried=state.carried, last=total)

    def family(self, reading: Reading, state: Carried) -> Metric:
        return CounterMetricFamily(self.name, self.help, value=state.value)


@dataclass(frozen=True)
class Value(_Stateless):
    """A gauge with one value; no sample while the value is unknown (None, not finite)."""

    name: str
    help: str
    read: Callable[[Reading], float | None]

    def family(self, reading: Reading, state: None) -> Metric:
        family = GaugeMetricFamily(self.name, self.help)
        value = self.read(reading)
        if _finite(value):
            family.add_metric([], float(value))  # type: ignore[arg-type]
        return family


@dataclass(frozen=True)
class Kept:
    """A gauge of a Progress figure that a snapshot may not have (None: no step since the
    previous one): it keeps the last figure known, so a quiet stream does not blank a graph."""

    name: str
    help: str
    field: str  # the Progress attribute

    def start(self) -> float | None:
        return None

    def fold(self, state: float | None, progress: Progress) -> float | None:
        value = getattr(progress, self.field)
        return float(value) if _finite(value) else state

    def family(self, reading: Reading, state: float | None) -> Metric:
        family = GaugeMetricFamily(self.name, self.help)
        if state is not None:
            family.add_metric([], state)
        return family


@dataclass(frozen=True)
class PerLabel(_Stateless):
    """A gauge per label value, for exactly the label values the Reading has."""

    name: str
    help: str
    label: str
    read: Callable[[Reading], Mapping[str, float | None]]

    def family(self, reading: Reading, state: None) -> Metric:
        family = GaugeMetricFamily(self.name, self.help, labels=[self.label])
        for value_of_label, value in self.read(reading).items():
            if _finite(value):
                family.add_metric([str(value_of_label)], float(value))  # type: ignore[arg-type]
        return family


@dataclass(frozen=True)
class Buckets:
    """Cumulative histogram state: observations per bucket (the last one is +Inf), their sum."""

    counts: tuple[int, ...]
    total: float = 0.0


@dataclass(frozen=True)
class Timings:
    """A histogram of durations that each snapshot lists (those since the previous snapshot)."""

    name: str
    help: str
    field: str  # the Progress attribute: a list of seconds
    buckets: tuple[float, ...]

    def start(self) -> Buckets:
        return Buckets(counts=(0,) * (len(self.buckets) + 1))

    def fold(self, state: Buckets, progress: Progress) -> Buckets:
        counts, total = list(state.counts), state.total
        for seconds in getattr(progress, self.field) or ():
            counts[bisect.bisect_left(self.buckets, seconds)] += 1  # `le` buckets: upper bound inclusive
            total += seconds
        return Buckets(tuple(counts), total)

    def family(self, reading: Reading, state: Buckets) -> Metric:
        bounds = [repr(float(b)) for b in self.buckets] + ["+Inf"]
        cumulative, running = [], 0
        for bound, count in zip(bounds, state.counts):
            running += count
            cumulative.append((bound, running))
        return HistogramMetricFamily(self.name, self.help, buckets=cumulative, sum_value=state.total)


def _progress(attribute: str) -> Callable[[Reading], Any]:
    """A reader of one Progress attribute (None before the first snapshot)."""
    return lambda reading: None if reading.progress is None else getattr(reading.progress, attribute)


def _probe_figures(kind: str) -> Callable[[Reading], Mapping[str, float | None]]:
    """Per segment and overall: accuracies ("accuracy"), or mean losses ("loss": tasks judged on losses).

    Such a task's snapshot has `probe_loss`, and its per-segment figures are losses.
    """

    def read(reading: Reading) -> Mapping[str, float | None]:
        progress = reading.progress
        if progress is None or (progress.probe_loss is not None) != (kind == "loss"):
            return {}
        overall = progress.probe_loss if kind == "loss" else progress.probe_accuracy
        return {OVERALL: overall, **(progress.probe_segments or {})}

    return read


def _prequential(
    figure: str, by: Callable[[PrequentialFigures], Mapping[str, float | None]]
) -> Callable[[Reading], Mapping[str, float | None]]:
    """Test-then-train figures named `figure` ("accuracy", or "loss" for tasks judged on losses),
    labelled as `by` reads them from the snapshot's PrequentialFigures; none for the other figure."""

    def read(reading: Reading) -> Mapping[str, float | None]:
        figures = None if reading.progress is None else reading.progress.prequential
        return {} if figures is None or figures.figure != figure else by(figures)

    return read


def _spans(figures: PrequentialFigures) -> Mapping[str, float | None]:
    """Since the stream's start ("total"), and over the last probe.prequential_window trained examples."""
    return {"total": figures.total, "window": figures.window}


def _segments(figures: PrequentialFigures) -> Mapping[str, float | None]:
    return dict(figures.segments)


METRICS: tuple[MetricSpec, ...] = (
    Total("continuity_examples_trained", "Examples trained, including windows later rolled back.", "examples_trained"),
    Total("continuity_dead_letters", "Records that could not be decoded or validated.", "dead_letters"),
    Total("continuity_rollbacks", "Returns to the last good checkpoint after a regression.", "rollbacks"),
    Total("continuity_quarantined_records", "Records of quarantined windows.", "quarantined_records"),
    Total(
        "continuity_lost_positions",
        "Partitions whose saved position the broker no longer had (topic recreated, log lost or "
        "truncated); acted on by stream.on_lost_positions.",
        "lost_positions",
    ),
    Total(
        "continuity_checkpoint_failures",
        "Checkpoint saves that failed (a full disk, say); each is retried with backoff.",
        "checkpoint_failures",
    ),
    Total(
        "continuity_nonfinite_rows",
        "Examples masked out of a train step because their loss or input was non-finite.",
        "nonfinite_rows",
    ),
    Total(
        "continuity_skipped_updates",
        "Train steps skipped because their loss or gradient was non-finite even without their "
        "non-finite rows (no update), including windows later rolled back.",
        "skipped_updates",
    ),
    # The train steps' own figures, summed on the device and averaged over each progress interval.
    Kept(
        "continuity_train_loss",
        "Mean training loss (fresh + replayed rows + EWC penalty) of the steps since the previous report.",
        "train_loss",
    ),
    Kept("continuity_grad_norm", "Mean global gradient norm of the steps since the previous report.", "grad_norm"),
    Kept(
        "continuity_replay_share",
        "Replayed rows over all rows in the training losses since the previous report.",
        "replay_share",
    ),
    PerLabel(
        "continuity_probe_accuracy",
        "Continuity-probe accuracy of the last good model, per segment of the probe now "
        f'(segment="{OVERALL}" for the whole probe).',
        "segment",
        _probe_figures("accuracy"),
    ),
    PerLabel(
        "continuity_probe_loss",
        "Continuity-probe mean loss of the last good model, per segment of the probe now, for "
        f'tasks judged on losses: regression, multi-label (segment="{OVERALL}" for the whole probe).',
        "segment",
        _probe_figures("loss"),
    ),
    PerLabel(
        "continuity_prequential_accuracy",
        "Prequential (test-then-train) accuracy: each trained example predicted before its update, "
        'since the stream\'s start (span="total") and over the last probe.prequential_window (span="window").',
        "span",
        _prequential("accuracy", _spans),
    ),
    PerLabel(
        "continuity_prequential_segment_accuracy",
        "Prequential (test-then-train) accuracy per segment of the stream, since the start.",
        "segment",
        _prequential("accuracy", _segments),
    ),
    PerLabel(
        "continuity_prequential_loss",
        "Prequential (test-then-train) mean loss, for tasks judged on losses: regression, multi-label "
        '(span="total" since the start, span="window" over the last probe.prequential_window).',
        "span",
        _prequential("loss", _spans),
    ),
    PerLabel(
        "continuity_prequential_segment_loss",
        "Prequential (test-then-train) mean loss per segment, for tasks judged on losses.",
        "segment",
        _prequential("loss", _segments),
    ),
    Value("continuity_ewc_lambda", "Current EWC regularization strength.", _progress("ewc_strength")),
    PerLabel(
        "continuity_consumer_lag",
        "Records between the newest good checkpoint and each partition's end (topic/partition).",
        "partition",
        lambda reading: reading.lag,
    ),
    Value("continuity_checkpoint", "Number of the newest good checkpoint.", _progress("checkpoint")),
    Value(
        "continuity_checkpoint_timestamp_seconds",
        "Unix time the newest good checkpoint was saved (its age: time() minus this).",
        lambda reading: reading.service.checkpoint_saved_at,
    ),
    Value(
        "continuity_regressions_in_a_row",
        "Windows judged regressed since the last accepted one: nothing learned meanwhile "
        "(alert on a few: drift the tolerance will not follow, or a broken upstream).",
        _progress("regressions_in_a_row"),
    ),
    Value(
        "continuity_examples_per_second",
        "Training rate since the previous progress report.",
        _progress("examples_per_second"),
    ),
    Value(
        "continuity_ready",
        "1 while /readyz answers 200 (restored, reading, not stopping), else 0.",
        lambda reading: float(reading.service.ready),
    ),
    Value(
        "continuity_stream_up",
        "1 while the source reads (Kafka: broker reachable, partitions assigned), else 0; /status says why not.",
        lambda reading: float(reading.service.stream_reading),
    ),
    Timings(
        "continuity_step_seconds",
        "Wall time of one train-step dispatch, host view.",
        "step_seconds",
        STEP_SECONDS_BUCKETS,
    ),
)


@dataclass(frozen=True)
class _Folded:
    """Everything scrapes read, replaced (never mutated) as snapshots arrive."""

    progress: Progress | None = None
    lag: Mapping[str, int] = field(default_factory=dict)
    states: Mapping[str, Any] = field(default_factory=dict)


class ServiceMetrics:
    """The service's metrics: a collector, registered in its own CollectorRegistry, fed by `observe`.

    `service_state` is called at each scrape for what the service knows live (readiness,
    whether the stream reads, when the newest checkpoint was saved); without it those
    read as not ready, not reading, unknown. `labels` go on every sample: one of several
    processes training one model exports `process="<i>"`, so Prometheus tells them apart.
    """

    def __init__(
        self,
        service_state: Callable[[], ServiceState] | None = None,
        metrics: tuple[MetricSpec, ...] = METRICS,
        *,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self._specs = metrics
        self._labels = dict(labels or {})
        self._service_state = service_state or ServiceState
        self._lock = threading.Lock()
        self._folded = _Folded(states={spec.name: spec.start() for spec in self._specs})
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def observe(self, progress: Progress, lag: Mapping[str, int] | None = None) -> None:
        """Take one `continuity.loop.Progress` snapshot, with the lag per partition ("topic/partition") measured for it.

        Partitions not in `lag` (revoked, or no Kafka) have no lag series.
        """
        with self._lock:
            states = self._folded.states
            self._folded = _Folded(
                progress=progress,
                lag=dict(lag or {}),
                states={spec.name: spec.fold(states[spec.name], progress) for spec in self._specs},
            )

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            folded = self._folded  # replaced whole by observe: the snapshot and its folded states belong together
        reading = Reading(folded.progress, folded.lag, self._service_state())
        for spec in self._specs:
            family = spec.family(reading, folded.states[spec.name])
            if self._labels:
                family.samples = [s._replace(labels={**self._labels, **s.labels}) for s in family.samples]
            yield family

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what the registry checks names against."""
        empty = Reading(None, {}, ServiceState())
        for spec in self._specs:
            yield spec.family(empty, spec.start())


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
