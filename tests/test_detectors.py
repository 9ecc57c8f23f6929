"""The window checks (continuity.detectors): the sample, each indicator, the test and its false-alarm rate."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from continuity.detectors import (
    BLOCKS,
    INDICATORS,
    MIN_HISTORY,
    WindowCheckConfig,
    WindowHistory,
    WindowSample,
    check_window,
    resembling_rows,
    upper_tail,
)
from continuity.guard import GuardConfig

CONFIG = WindowCheckConfig(tolerance=0.3, confidence=0.9, alpha=0.005, min_rows=20, horizon=256)  # windows of 512


def _offer(sample: WindowSample, x: np.ndarray, y: np.ndarray, batch: int = 32) -> None:
    for start in range(0, len(y), batch):
        rows = np.ones(min(batch, len(y) - start), bool)
        sample.add(x[start : start + batch], y[start : start + batch], rows)


def test_the_window_sample_is_bounded_in_arrival_order_and_the_same_for_the_same_seed():
    x = np.arange(5000, dtype=np.float32)[:, None]
    y = np.arange(5000) % 10
    sample = WindowSample(256)
    sample.start((3, 7))
    _offer(sample, x, y)
    first_x, first_y = sample.rows()
    assert len(first_y) == 256 and sample.seen == 5000
    assert np.all(np.diff(first_x[:, 0]) > 0)  # arrival order, no row twice
    np.testing.assert_array_equal(first_y, first_x[:, 0].astype(int) % 10)  # rows stay whole
    sample.start((3, 7))
    _offer(sample, x, y, batch=17)  # other batch boundaries, same rows offered in the same order
    np.testing.assert_array_equal(sample.rows()[0], first_x)
    sample.start((3, 8))
    _offer(sample, x, y)
    assert not np.array_equal(sample.rows()[0], first_x)


def test_the_window_sample_is_uniform_over_the_window():
    # Each of 2,000 rows should be kept with probability 100 / 2,000; over 400 windows the
    # count of windows keeping a row in each tenth of the stream is Binomial-like around 2,000.
    x = np.arange(2000, dtype=np.float32)[:, None]
    kept = np.zeros(10)
    sample = WindowSample(100)
    for seed in range(400):
        sample.start((seed,))
        _offer(sample, x, np.zeros(2000, np.int32))
        kept += np.bincount((sample.rows()[0][:, 0] // 200).astype(int), minlength=10)
    assert kept.sum() == 400 * 100
    assert np.all(np.abs(kept - 4000) < 5 * np.sqrt(4000))


def test_rows_the_mask_leaves_out_are_never_sampled():
    sample = WindowSample(64)
    x = np.arange(1000, dtype=np.float32)[:, None]
    for start in range(0, 1000, 50):
        rows = (np.arange(start, start + 50) % 2).astype(bool)  # odd rows only
        sample.add(x[start : start + 50], np.zeros(50, np.int32), rows)
    assert sample.seen == 500 and np.all(sample.rows()[0][:, 0] % 2 == 1)


def _clean_window(rng, n=512, classes=10):
    """(x, y, predicted, confidence, learned) of a window like any other."""
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, classes, n).astype(np.int32)
    predicted = np.where(rng.random(n) < 0.9, y, (y + 1) % classes)  # a 90%-right model ...
    confidence = rng.uniform(0.3, 1.0, n)  # ... confident on some rows
    learned = rng.random(n) < 0.85  # the candidate fits most of what it trained on
    return x, y, predicted, confidence, learned


def _history_of(rng, windows=5):
    history = WindowHistory()
    for _ in range(windows):
        verdict = check_window(*_clean_window(rng), history, CONFIG)
        history.add(verdict.figures)
    return history


def test_nothing_is_tested_before_a_few_windows_have_been_accepted():
    rng = np.random.default_rng(0)
    history = _history_of(rng, windows=MIN_HISTORY - 1)
    x, y, predicted, confidence, learned = _clean_window(rng)
    verdict = check_window(x * 255, y * 0, predicted, confidence, learned, history, CONFIG)
    assert not verdict.checked and not verdict.damaged and verdict.findings == []
    history.add(verdict.figures)  # one more accepted window, and the same damage is caught
    assert check_window(x * 255, y * 0, predicted, confidence, learned, history, CONFIG).damaged


def test_clean_windows_like_the_accepted_ones_pass():
    rng = np.random.default_rng(1)
    history = _history_of(rng)
    for _ in range(20):
        verdict = check_window(*_clean_window(rng), history, CONFIG)
        assert verdict.checked and not verdict.damaged
        assert [f.check for f in verdict.findings] == list(INDICATORS)  # whole-window figures for each
        # ... `unlearned` on the rows that had half a window of training after them: the first half.
        assert verdict.learnable == 256 and next(f for f in verdict.findings if f.check == "unlearned").rows == 256


@pytest.mark.parametrize(
    "damage, fires",
    [
        ("scale", "outlier"),
        ("zero", "outlier"),
        ("freeze", "repeated"),
        ("constant", "same_label"),
        ("contradict", "contradicted"),
        ("shuffle", "unlearned"),
    ],
)
def test_each_kind_of_damage_fires_its_indicator_with_the_figures_that_explain_it(damage, fires):
    rng = np.random.default_rng(2)
    history = _history_of(rng)
    x, y, predicted, confidence, learned = _clean_window(rng)
    if damage == "scale":
        x = x * 255
    elif damage == "zero":
        x = np.zeros_like(x)
    elif damage == "freeze":
        x = np.broadcast_to(x[:1], x.shape).copy()
    elif damage == "constant":
        y = np.full_like(y, 3)
    elif damage == "contradict":  # the model is sure, and the labels say otherwise
        confidence, y = np.full(len(y), 0.99), (predicted + 1) % 10
    else:  # labels no model can fit: the candidate stays near chance on them
        learned = rng.random(len(y)) < 0.1
    verdict = check_window(x, y, predicted, confidence, learned, history, CONFIG)
    assert verdict.damaged
    fired = {f.check for f in verdict.fired}
    assert fires in fired
    whole = next(f for f in verdict.findings if f.check == fires and f.block == "1/1")
    assert whole.fired and whole.rate > whole.null_rate and whole.p_value < whole.level
    assert whole.level == pytest.approx(CONFIG.alpha / (len(INDICATORS) * BLOCKS))
    assert verdict.scopes() == sorted(f"window.{c}" for c in fired)
    assert all(test["test"] == "binomial" and test["check"].startswith("window.") for test in verdict.fired_json())


def test_a_short_window_is_not_judged_on_what_it_had_no_time_to_learn():
    # A live stream closes windows on time: a window a fifth as long as the accepted ones.
    rng = np.random.default_rng(9)
    history = _history_of(rng)
    x, y, predicted, confidence, learned = _clean_window(rng, n=100)
    learned[:] = False  # nothing learned yet
    verdict = check_window(x, y, predicted, confidence, learned, history, CONFIG)
    assert verdict.learnable == 0 and not verdict.damaged


def test_unlearned_judges_the_rows_trained_long_enough_wherever_in_a_block_they_end():
    # The production case: 512 rows sampled from a window of 1,000; those followed by 500 rows of
    # training are ~256 of them, rarely exactly a half. Shuffled labels there are caught all the same.
    rng = np.random.default_rng(4)
    history = _history_of(rng)
    x, y, predicted, confidence, learned = _clean_window(rng)
    arrival = np.sort(rng.choice(1000, size=len(y), replace=False))
    learned = rng.random(len(y)) < 0.1
    verdict = check_window(
        x, y, predicted, confidence, learned, history, replace(CONFIG, horizon=500), arrival=arrival, trained=1000
    )
    assert verdict.learnable == np.count_nonzero(arrival <= 499) != 256
    whole = next(f for f in verdict.findings if f.check == "unlearned" and f.block == "1/1")
    assert whole.rows == verdict.learnable and whole.fired


def test_a_burst_in_the_last_quarter_fires_that_quarter():
    rng = np.random.default_rng(3)
    history = _history_of(rng)
    x, y, predicted, confidence, learned = _clean_window(rng)
    y[-128:] = 7  # a constant label over the last quarter of the window
    verdict = check_window(x, y, predicted, confidence, learned, history, CONFIG)
    assert verdict.damaged
    assert any(f.check == "same_label" and f.block == "4/4" for f in verdict.fired)


def test_a_class_never_taught_cannot_contradict_the_model():
    # Class-incremental streams: the model is confidently wrong on classes it was never taught.
    rng = np.random.default_rng(4)
    history = _history_of(rng, windows=3)
    history.classes = {0, 1, 2, 3}
    x, y, predicted, confidence, learned = _clean_window(rng, classes=4)
    y = y + 4  # classes 4..7: new
    confidence = np.full(len(y), 0.99)
    verdict = check_window(x, y, predicted, confidence, learned, history, CONFIG)
    assert verdict.figures.rates["contradicted"] == 0.0 and not verdict.damaged


@pytest.mark.slow  # a Monte-Carlo estimate over 4,000 windows
def test_the_false_alarm_rate_at_the_edge_of_the_null_is_at_most_alpha():
    # Windows whose label-collision rate is exactly reference + tolerance: the worst case the
    # null hypothesis allows. The Bonferroni-corrected tests may fire in at most alpha of them.
    rng = np.random.default_rng(5)
    history = WindowHistory()
    x, y, predicted, confidence, learned = _clean_window(rng)
    for _ in range(MIN_HISTORY):
        history.add(check_window(x, y, predicted, confidence, learned, history, CONFIG).figures)
    edge = history.reference("same_label") + CONFIG.tolerance
    alarms, windows = 0, 4000
    for _ in range(windows):
        same = rng.random(512) < edge
        labels = np.cumsum(~same) % 10  # collides with the previous row exactly where `same` is set
        verdict = check_window(x, labels.astype(np.int32), labels, np.zeros(512), learned, history, CONFIG)
        alarms += verdict.damaged
    assert alarms / windows <= CONFIG.alpha + 3 * np.sqrt(CONFIG.alpha / windows)


def test_the_history_survives_a_json_round_trip():
    rng = np.random.default_rng(6)
    history = _history_of(rng, windows=4)
    restored = WindowHistory()
    restored.restore(history.to_json())
    assert restored.to_json() == history.to_json()
    assert restored.scale_range() == history.scale_range() and restored.classes == history.classes


def test_the_binomial_tail_matches_its_definition():
    from scipy.stats import binom

    assert upper_tail(0, 10, 0.3) == 1.0 and upper_tail(5, 10, 1.0) == 1.0
    assert upper_tail(7, 20, 0.3) == pytest.approx(binom.sf(6, 20, 0.3))


def test_the_blocks_that_fired_locate_the_damaged_rows_of_the_window():
    rng = np.random.default_rng(7)
    history = _history_of(rng)
    sample = WindowSample(512)
    sample.start((1,))
    x = rng.random((2000, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 2000).astype(np.int32)
    y[1000:1500] = 4  # a constant label over rows 1,000-1,499 of 2,000
    _offer(sample, x, y)
    sx, sy = sample.rows()
    verdict = check_window(sx, sy, sy, np.zeros(len(sy)), np.ones(len(sy), bool), history, CONFIG)
    first, end = sample.damaged_rows(verdict)
    # The finest blocks that fired: the span covers the burst and at most an eighth of clean rows beside it.
    assert first <= 1000 and end >= 1500 and (1000 - first) + (end - 1500) <= 2000 / 8 + 20
    assert sample.span_of(np.zeros(len(sy), bool)) is None


def test_rows_like_a_segments_own_lie_within_its_reach_and_others_do_not():
    rng = np.random.default_rng(8)
    centre = rng.random(64)
    segment = centre + 0.05 * rng.normal(size=(200, 64))
    alike = centre + 0.05 * rng.normal(size=(100, 64))
    apart = rng.random((100, 64))  # another input distribution
    resembling = resembling_rows(np.concatenate([alike, apart]), [segment])
    assert resembling[:100].mean() > 0.8 and resembling[100:].mean() < 0.05
    assert resembling_rows(alike, []) is None


def test_the_guard_judges_unlearned_after_half_of_its_window():
    assert GuardConfig(every_examples=1_000).window_checks.horizon == 500
    assert GuardConfig().window_checks.horizon == 25_000
    assert GuardConfig(every_examples=200).window_checks.horizon == 500  # never under 500 rows
