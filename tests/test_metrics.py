"""The service's Prometheus collector: read at scrape time from the loop's latest snapshot.

Driven with synthetic `Progress` snapshots (and a real `ProbeStore` for the probe's segment
names); what a running service exports is tests/test_deploy.py's.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from continuity.checkpoints import CheckpointNotFoundError
from continuity.loop import Progress
from continuity.metrics import METRICS, OVERALL, STEP_SECONDS_BUCKETS, ServiceMetrics, ServiceState
from continuity.probe import ProbeStore
from continuity.service import CheckpointClock
from continuity.stream import Positions

README = Path(__file__).resolve().parents[1] / "README.md"


def _progress(**overrides) -> Progress:
    values = dict(
        examples_trained=640,
        examples_per_second=1234.5,
        lineage_examples=600,
        rollbacks=1,
        dead_letters=3,
        quarantined_records=0,
        probe_accuracy=0.91,
        probe_segments={"s0": 0.95, "s1": 0.87, "empty": None},
        ewc_strength=12.5,
        checkpoint=4,
        positions=Positions(),
        step_seconds=[0.0004, 0.002, 0.03],
    )
    values.update(overrides)
    return Progress(**values)


def _samples(metrics: ServiceMetrics) -> dict:
    families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def _labels(samples: dict, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample, labels in samples if sample == name}


def test_counters_stay_monotonic_across_a_loop_restart_and_gauges_follow_the_latest_snapshot():
    metrics = ServiceMetrics()
    metrics.observe(_progress())
    metrics.observe(_progress(examples_trained=1000, rollbacks=1, dead_letters=5, nonfinite_rows=2, step_seconds=[]))
    samples = _samples(metrics)
    assert samples[("continuity_examples_trained_total", ())] == 1000
    assert samples[("continuity_dead_letters_total", ())] == 5
    assert samples[("continuity_rollbacks_total", ())] == 1
    assert samples[("continuity_nonfinite_rows_total", ())] == 2
    assert samples[("continuity_regressions_in_a_row", ())] == 0
    assert samples[("continuity_checkpoint_failures_total", ())] == 0
    metrics.observe(_progress(examples_trained=1000, dead_letters=5, step_seconds=[], checkpoint_failures=2))
    assert _samples(metrics)[("continuity_checkpoint_failures_total", ())] == 2

    # A new run in the same process reports totals from zero again: its work adds on, nothing goes down.
    metrics.observe(
        _progress(
            examples_trained=64,
            rollbacks=0,
            dead_letters=0,
            probe_accuracy=0.5,
            probe_segments={"s0": 0.4},
            checkpoint=7,
            step_seconds=[],
            regressions_in_a_row=2,
        )
    )
    samples = _samples(metrics)
    assert samples[("continuity_examples_trained_total", ())] == 1064
    assert samples[("continuity_rollbacks_total", ())] == 1
    assert samples[("continuity_dead_letters_total", ())] == 5
    assert samples[("continuity_checkpoint_failures_total", ())] == 2  # the new run has failed none yet
    metrics.observe(_progress(examples_trained=100, rollbacks=2, dead_letters=1, step_seconds=[]))
    samples = _samples(metrics)
    assert samples[("continuity_examples_trained_total", ())] == 1100
    assert samples[("continuity_rollbacks_total", ())] == 3
    assert samples[("continuity_dead_letters_total", ())] == 6


def test_probe_series_exist_only_for_the_segments_of_the_latest_snapshot():
    metrics = ServiceMetrics()
    metrics.observe(_progress())
    samples = _samples(metrics)
    assert _labels(samples, "continuity_probe_accuracy", "segment") == {OVERALL, "s0", "s1"}  # "empty" has no figure
    assert samples[("continuity_probe_accuracy", (("segment", "s1"),))] == 0.87

    metrics.observe(_progress(probe_accuracy=0.5, probe_segments={"s0": 0.4, "s2": 0.6}, checkpoint=7))
    samples = _samples(metrics)
    assert _labels(samples, "continuity_probe_accuracy", "segment") == {OVERALL, "s0", "s2"}  # s1 was evicted
    assert samples[("continuity_probe_accuracy", (("segment", OVERALL),))] == 0.5
    assert samples[("continuity_checkpoint", ())] == 7
    assert not _labels(samples, "continuity_probe_loss", "segment")  # a classification task has no losses


def test_a_regression_task_exports_probe_losses_and_no_accuracies():
    metrics = ServiceMetrics()
    metrics.observe(_progress(probe_accuracy=None, probe_loss=0.2, probe_segments={"region-0": 0.25}))
    sample = metrics.registry.get_sample_value
    assert sample("continuity_probe_loss", {"segment": "region-0"}) == 0.25
    assert sample("continuity_probe_loss", {"segment": OVERALL}) == 0.2
    assert sample("continuity_probe_accuracy", {"segment": "region-0"}) is None


def test_the_series_count_stays_bounded_over_a_million_example_unsegmented_stream():
    # The probe of an unsegmented stream opens a window segment every `window_examples`
    # held-out examples and drops the oldest beyond `max_segments`; the loop reports the
    # kept model's figures on the probe as it is at each judged window.
    max_segments, holdout, window_examples, every_examples = 16, 0.1, 500, 5_000
    probe = ProbeStore(
        jax.ShapeDtypeStruct((1,), np.float32),
        jax.ShapeDtypeStruct((), np.int32),
        per_segment=4,
        max_segments=max_segments,
        window_examples=window_examples,
    )
    metrics = ServiceMetrics(lambda: ServiceState(ready=True, stream_reading=True, checkpoint_saved_at=1.0))
    trained, rng = 0, np.random.default_rng(0)
    opened: set[str] = set()
    counts = []
    while trained < 1_000_000:
        held_out = int(every_examples * holdout)
        probe.add_unsegmented(np.zeros((held_out, 1), np.float32), np.zeros(held_out, np.int32))
        trained += every_examples
        opened.update(probe.segments)
        figures = {name: float(rng.random()) for name in probe.segments}
        metrics.observe(
            _progress(examples_trained=trained, probe_segments=figures, step_seconds=[0.01] * 40),
            {"digits/0": int(rng.integers(0, 5000)), "digits/1": int(rng.integers(0, 5000))},
        )
        samples = _samples(metrics)
        assert _labels(samples, "continuity_probe_accuracy", "segment") == {OVERALL, *probe.segments}
        counts.append(len(samples))
    assert len(opened) == 1_000_000 * holdout / window_examples == 200  # segments the stream opened in all
    assert len(probe.segments) == max_segments
    # Series: the fixed ones, one per partition's lag, and the probe's segments (+ overall) only.
    assert max(counts) == counts[-1] == _fixed_series() + 2 + max_segments + 1
    assert _samples(metrics)[("continuity_examples_trained_total", ())] == 1_000_000


def _fixed_series() -> int:
    """Samples whose count does not depend on the stream: every unlabelled one, and the histogram's."""
    metrics = ServiceMetrics(lambda: ServiceState(ready=True, stream_reading=True, checkpoint_saved_at=1.0))
    metrics.observe(_progress(probe_accuracy=None, probe_segments={}))
    return len(_samples(metrics))


def test_step_times_accumulate_into_the_histogram_across_snapshots():
    metrics = ServiceMetrics()
    metrics.observe(_progress(step_seconds=[0.0004, 0.0005, 0.002]))
    metrics.observe(_progress(step_seconds=[]))
    metrics.observe(_progress(step_seconds=[0.03, 10.0]))
    sample = metrics.registry.get_sample_value
    assert sample("continuity_step_seconds_count") == 5
    assert sample("continuity_step_seconds_sum") == sum([0.0004, 0.0005, 0.002, 0.03, 10.0])
    assert sample("continuity_step_seconds_bucket", {"le": "0.00025"}) == 0
    assert sample("continuity_step_seconds_bucket", {"le": "0.0005"}) == 2  # an upper bound is inclusive
    assert sample("continuity_step_seconds_bucket", {"le": "0.0025"}) == 3
    assert sample("continuity_step_seconds_bucket", {"le": str(STEP_SECONDS_BUCKETS[-1])}) == 4
    assert sample("continuity_step_seconds_bucket", {"le": "+Inf"}) == 5


def test_lag_series_follow_the_partitions_of_the_latest_snapshot():
    metrics = ServiceMetrics()
    metrics.observe(_progress(), {"digits/0": 10, "digits/1": 0})
    metrics.observe(_progress(), {"digits/1": 4})  # partition 0 was revoked: its series goes
    samples = _samples(metrics)
    assert _labels(samples, "continuity_consumer_lag", "partition") == {"digits/1"}
    assert samples[("continuity_consumer_lag", (("partition", "digits/1"),))] == 4
    metrics.observe(_progress())  # a file source: no lag at all
    assert not _labels(_samples(metrics), "continuity_consumer_lag", "partition")


def test_readiness_and_the_stream_state_are_read_from_the_service_at_each_scrape():
    state = ServiceState()
    metrics = ServiceMetrics(lambda: state)
    sample = metrics.registry.get_sample_value
    # Before any snapshot: counters at zero, gauges without a value have no sample.
    assert sample("continuity_examples_trained_total") == 0
    assert sample("continuity_ewc_lambda") is None and sample("continuity_checkpoint_timestamp_seconds") is None
    assert (sample("continuity_ready"), sample("continuity_stream_up")) == (0, 0)
    state = ServiceState(ready=True, stream_reading=True, checkpoint_saved_at=1_700_000_000.5)
    assert (sample("continuity_ready"), sample("continuity_stream_up")) == (1, 1)
    assert sample("continuity_checkpoint_timestamp_seconds") == 1_700_000_000.5
    state = ServiceState(ready=False, stream_reading=False, checkpoint_saved_at=1_700_000_000.5)
    assert (sample("continuity_ready"), sample("continuity_stream_up")) == (0, 0)


def test_registries_are_independent():
    a, b = ServiceMetrics(), ServiceMetrics()  # same names, no "Duplicated timeseries" error
    a.observe(_progress())
    assert b.registry.get_sample_value("continuity_examples_trained_total") == 0


def test_every_exported_metric_has_a_row_in_the_readme_and_every_row_is_exported():
    text = README.read_text()
    table = text[text.index("| metric | type | meaning |") :].split("\n\n", 1)[0]
    documented = {re.sub(r"_total$", "", name) for name in re.findall(r"^\| `(continuity_\w+)", table, re.M)}
    assert documented == {spec.name for spec in METRICS}


class _Store:
    """What CheckpointClock reads of a CheckpointStore: whether a save is written, and `info(n).saved_at`."""

    def __init__(self, saved_at: dict[int, float]):
        self.saved_at, self.saving, self.reads = saved_at, False, []

    def info(self, number: int):
        self.reads.append(number)
        if number not in self.saved_at:
            raise CheckpointNotFoundError(f"no checkpoint {number}")
        return SimpleNamespace(saved_at=self.saved_at[number])


def test_the_checkpoint_clock_reads_a_restored_or_rolled_back_checkpoints_time_and_times_new_ones_itself(caplog):
    store = _Store({3: 1000.0, 2: 900.0})
    clock = CheckpointClock(store)
    clock.note(None)
    assert clock.saved_at is None and store.reads == []
    clock.note(3)  # restored at start: saved long ago
    assert clock.saved_at == 1000.0
    before = time.time()
    clock.note(4)  # saved since the last report
    assert before <= clock.saved_at <= time.time() and store.reads == [3]
    clock.note(4)
    assert store.reads == [3]  # nothing to read while the number stays
    clock.note(2)  # an operator's rollback to an older checkpoint
    assert clock.saved_at == 900.0
    store.saving = True  # the store's reads would wait for the save: the loop must not
    clock.note(3)
    assert store.reads == [3, 2] and before <= clock.saved_at <= time.time()
    store.saving = False
    clock.note(9)  # bigger than the last, and so saved since; 7 below is not, and unreadable
    clock.note(7)
    assert clock.saved_at is None and "cannot read when checkpoint 7 was saved" in caplog.text


def test_the_train_steps_figures_reach_gauges_that_keep_them_and_the_skipped_updates_counter():
    from continuity.service import format_progress

    metrics = ServiceMetrics()
    metrics.observe(_progress(train_loss=0.75, grad_norm=2.5, replay_share=0.5, skipped_updates=3))
    metrics.observe(_progress(train_loss=None, grad_norm=None, replay_share=None, skipped_updates=4))  # no step since
    samples = _samples(metrics)
    assert samples[("continuity_train_loss", ())] == 0.75  # kept: the last steps' figures
    assert samples[("continuity_grad_norm", ())] == 2.5
    assert samples[("continuity_replay_share", ())] == 0.5
    assert samples[("continuity_skipped_updates_total", ())] == 4
    line = format_progress(_progress(train_loss=0.75, grad_norm=2.5, replay_share=0.5, skipped_updates=3), None)
    assert "train loss 0.75  grad 2.5  replay 50%  skipped 3  " in line


def test_prequential_accuracy_is_exported_since_the_start_over_the_window_and_per_segment():
    from continuity.prequential import PrequentialFigures

    figures = PrequentialFigures("accuracy", 0.913, 0.941, 5000, 1000, {"concept-0": 0.95, "concept-1": 0.88})
    metrics = ServiceMetrics()
    metrics.observe(_progress(prequential=figures))
    sample = metrics.registry.get_sample_value
    assert sample("continuity_prequential_accuracy", {"span": "total"}) == 0.913
    assert sample("continuity_prequential_accuracy", {"span": "window"}) == 0.941
    assert sample("continuity_prequential_segment_accuracy", {"segment": "concept-1"}) == 0.88
    assert sample("continuity_prequential_loss", {"span": "total"}) is None  # a classification task has no losses

    metrics.observe(_progress(prequential=PrequentialFigures("loss", 0.25, None, 10, 1000, {})))
    assert sample("continuity_prequential_loss", {"span": "total"}) == 0.25
    assert sample("continuity_prequential_loss", {"span": "window"}) is None  # no figure, no series
    assert sample("continuity_prequential_accuracy", {"span": "total"}) is None
