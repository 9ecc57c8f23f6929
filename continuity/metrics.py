"""Prometheus metrics of one running service, fed from the training loop's progress snapshots.

Every `ServiceMetrics` owns its own `CollectorRegistry`, so several services (or tests)
in one process never collide in prometheus_client's global registry. `/metrics` renders
that registry (see `continuity.http`).

The loop reports running totals (examples trained, rollbacks, ...); Prometheus counters
only go up, so `observe` keeps the last totals it saw and increments each counter by the
difference. A total that goes down means the loop behind it started over (a new run):
the new total is then counted as fresh work, and the counter stays monotonic.

Threading: `observe` and `set_lag` may be called from any thread; prometheus_client's
metric objects are thread-safe, and the last-totals bookkeeping is under a lock.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Train-step wall times run from ~0.1 ms (tiny MLP, warm, on a GPU) to ~1 s (a big batch on
# CPU); roughly x2.5 apart so the quantiles stay readable across that whole range.
STEP_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

OVERALL = "overall"  # the `segment` label of the whole-probe accuracy (or loss)

# (metric attribute, Progress field) of every counter fed from running totals.
_COUNTED = (
    ("examples_trained", "examples_trained"),
    ("dead_letters", "dead_letters"),
    ("rollbacks", "rollbacks"),
    ("quarantined_records", "quarantined_records"),
    ("lost_positions", "lost_positions"),
    ("checkpoint_failures", "checkpoint_failures"),
    ("nonfinite_rows", "nonfinite_rows"),
    ("skipped_updates", "skipped_updates"),
)


class ServiceMetrics:
    """Prometheus metrics of one service, in its own CollectorRegistry (not the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # prometheus_client appends `_total` to counter names itself.
        self.examples_trained = Counter(
            "continuity_examples_trained", "Examples trained, including windows later rolled back.", registry=r
        )
        self.dead_letters = Counter(
            "continuity_dead_letters", "Records that could not be decoded or validated.", registry=r
        )
        self.rollbacks = Counter(
            "continuity_rollbacks", "Returns to the last good checkpoint after a regression.", registry=r
        )
        self.quarantined_records = Counter(
            "continuity_quarantined_records", "Records of quarantined windows.", registry=r
        )
        self.checkpoint_failures = Counter(
            "continuity_checkpoint_failures",
            "Checkpoint saves that failed (a full disk, say); each is retried with backoff.",
            registry=r,
        )
        self.nonfinite_rows = Counter(
            "continuity_nonfinite_rows",
            "Examples masked out of a train step because their loss or input was non-finite.",
            registry=r,
        )
        self.probe_accuracy = Gauge(
            "continuity_probe_accuracy",
            "Continuity-probe accuracy of the last judged model, per segment "
            f'(segment="{OVERALL}" for the whole probe).',
            ["segment"],
            registry=r,
        )
        self.probe_loss = Gauge(
            "continuity_probe_loss",
            "Continuity-probe mean loss of the last judged model, per segment, for tasks judged "
            f'on losses: regression, multi-label (segment="{OVERALL}" for the whole probe).',
            ["segment"],
            registry=r,
        )
        self.lost_positions = Counter(
            "continuity_lost_positions",
            "Partitions whose saved position the broker no longer had (topic recreated, log lost or "
            "truncated); acted on by stream.on_lost_positions.",
            registry=r,
        )
        self.ewc_lambda = Gauge("continuity_ewc_lambda", "Current EWC regularization strength.", registry=r)
        self.consumer_lag = Gauge(
            "continuity_consumer_lag",
            "Records behind the end of each partition (topic/partition).",
            ["partition"],
            registry=r,
        )
        self.checkpoint = Gauge("continuity_checkpoint", "Number of the newest good checkpoint.", registry=r)
        self.regressions_in_a_row = Gauge(
            "continuity_regressions_in_a_row",
            "Windows judged regressed since the last accepted one: nothing "
            "learned meanwhile (alert on a few: drift the tolerance will not follow, or a broken upstream).",
            registry=r,
        )
        self.examples_per_second = Gauge(
            "continuity_examples_per_second", "Training rate since the previous progress report.", registry=r
        )
        self.skipped_updates = Counter(
            "continuity_skipped_updates",
            "Train steps skipped because their loss or gradient was non-finite (no update), including windows "
            "later rolled back.",
            registry=r,
        )
        # The train steps' own figures, summed on the device and averaged over each progress interval.
        self.train_loss = Gauge(
            "continuity_train_loss",
            "Mean training loss (fresh + replayed rows + EWC penalty) of the steps since the previous report.",
            registry=r,
        )
        self.grad_norm = Gauge(
            "continuity_grad_norm", "Mean global gradient norm of the steps since the previous report.", registry=r
        )
        self.replay_share = Gauge(
            "continuity_replay_share",
            "Replayed rows over all rows in the training losses since the previous report.",
            registry=r,
        )
        self.step_seconds = Histogram(
            "continuity_step_seconds",
            "Wall time of one train-step dispatch, host view.",
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self._lock = threading.Lock()
        self._totals = {name: 0 for name, _ in _COUNTED}
        self._lag_partitions: set[str] = set()

    def observe(self, progress) -> None:
        """Take one `continuity.loop.Progress` snapshot into the metrics."""
        with self._lock:
            for name, field in _COUNTED:
                total = int(getattr(progress, field) or 0)
                last = self._totals[name]
                delta = total - last if total >= last else total  # went down: a new run started
                if delta > 0:
                    getattr(self, name).inc(delta)
                self._totals[name] = total
        # A regression task reports the probe's mean loss, and its per-segment figures are losses too.
        loss = progress.probe_loss
        gauge, overall = (self.probe_loss, loss) if loss is not None else (self.probe_accuracy, progress.probe_accuracy)
        if _finite(overall):
            gauge.labels(segment=OVERALL).set(overall)
        for segment, figure in (progress.probe_segments or {}).items():
            if _finite(figure):
                gauge.labels(segment=str(segment)).set(figure)
        if _finite(progress.ewc_strength):
            self.ewc_lambda.set(progress.ewc_strength)
        if progress.checkpoint is not None:
            self.checkpoint.set(progress.checkpoint)
        self.regressions_in_a_row.set(progress.regressions_in_a_row)
        if _finite(progress.examples_per_second):
            self.examples_per_second.set(progress.examples_per_second)
        for gauge, figure in (
            (self.train_loss, progress.train_loss),
            (self.grad_norm, progress.grad_norm),
            (self.replay_share, progress.replay_share),
        ):
            if _finite(figure):
                gauge.set(figure)
        for seconds in progress.step_seconds or ():
            self.step_seconds.observe(seconds)

    def set_lag(self, lag: Mapping[str, int]) -> None:
        """Records behind per partition, keyed "topic/partition"; partitions no longer listed are dropped."""
        with self._lock:
            for partition in self._lag_partitions - set(lag):
                self.consumer_lag.remove(partition)
            for partition, behind in lag.items():
                self.consumer_lag.labels(partition=partition).set(behind)
            self._lag_partitions = set(lag)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
