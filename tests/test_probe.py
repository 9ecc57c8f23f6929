"""The continuity probe store and the regression rule (exact one-sided McNemar)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import binom, norm

from continuity.probe import ProbeConfig, ProbeStore
from continuity.regression import drop_beyond_one_sided, judge, judge_beyond_tolerance, mcnemar_one_sided

SHAPE = (2,)
INPUTS, LABELS = jax.ShapeDtypeStruct(SHAPE, jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)


def _examples(n, start=0):
    values = np.arange(start, start + n, dtype=np.float32)
    return np.stack([values, values], 1), (np.arange(start, start + n) % 10).astype(np.int32)


def test_probe_reservoirs_are_bounded_per_segment_and_deterministic():
    a, b = ProbeStore(INPUTS, LABELS, per_segment=50, seed=3), ProbeStore(INPUTS, LABELS, per_segment=50, seed=3)
    for store in (a, b):
        for chunk in range(20):
            store.add("old", *_examples(37, chunk * 37))
        store.add("new", *_examples(10))
    xa, ya, ida = a.examples()
    xb, yb, idb = b.examples()
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert a.segments == ["old", "new"] and list(np.bincount(ida)) == [50, 10]
    # Reservoir, not FIFO: examples from the whole history are kept, not just the newest 50.
    kept = xa[ida == 0, 0]
    assert kept.min() < 200 and kept.max() > 500


def test_probe_reservoir_is_roughly_uniform_over_the_stream():
    counts = np.zeros(1000)
    for seed in range(300):
        store = ProbeStore(INPUTS, LABELS, per_segment=100, seed=seed)
        store.add("s", *_examples(1000))
        counts[store.examples()[0][:, 0].astype(int)] += 1
    first, last = counts[:500].sum(), counts[500:].sum()
    assert abs(first - last) / (first + last) < 0.05  # each half holds about half the reservoir


def test_probe_round_trips_through_checkpoint_arrays_and_keeps_window_numbering():
    store = ProbeStore(INPUTS, LABELS, per_segment=20, window_examples=15, seed=1)
    store.add("a", *_examples(30))
    store.add_unsegmented(*_examples(40, 100))
    store.add_golden(*_examples(5, 900), name="golden")
    arrays, meta = store.to_arrays()
    restored = ProbeStore.from_arrays(arrays, meta, INPUTS, LABELS)
    assert restored.segments == ["a", "window-0", "window-1", "window-2", "golden"]
    for got, want in zip(restored.examples(), store.examples()):
        np.testing.assert_array_equal(got, want)
    # The next unsegmented example continues the same window in both.
    store.add_unsegmented(*_examples(1, 500))
    restored.add_unsegmented(*_examples(1, 500))
    assert store.segments == restored.segments
    with pytest.raises(ValueError, match="golden"):
        store.add("golden", *_examples(1))


def test_probe_config_names_bad_values():
    with pytest.raises(ValueError, match="`probe.holdout_fraction` must be in"):
        ProbeConfig(holdout_fraction=1.5)


def test_mcnemar_matches_the_binomial_tail_by_hand():
    good = np.array([1] * 30 + [0] * 5 + [1] * 50, bool)  # 30 right before, wrong now; 5 the other way
    cand = np.array([0] * 30 + [1] * 5 + [1] * 50, bool)
    b, c, p = mcnemar_one_sided(good, cand)
    assert (b, c) == (30, 5)
    assert p == pytest.approx(binom.sf(29, 35, 0.5))  # P(X >= 30), X ~ Bin(35, 1/2)
    assert mcnemar_one_sided(good, good)[2] == 1.0


def test_noise_alone_does_not_trigger_regressions():
    """Two equally good models disagreeing at random: the rule fires far less often than alpha."""
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(8)]
    ids = np.repeat(np.arange(8), 100)
    fired = 0
    for _ in range(500):
        good = rng.random(800) < 0.8
        cand = rng.random(800) < 0.8
        fired += judge(good, cand, ids, names, tolerance=0.0, alpha=0.01).regressed
    assert fired / 500 <= 0.01


def test_a_real_drop_on_one_segment_is_a_regression_and_named():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(3), 150)
    good = rng.random(450) < 0.9
    cand = good.copy()
    hurt = np.flatnonzero((ids == 1) & good)[:40]  # segment 1 loses 40 right answers: 0.27 there, 0.09 overall
    cand[hurt] = False
    verdict = judge(good, cand, ids, ["a", "b", "c"], tolerance=0.1, alpha=0.01)
    assert verdict.regressed and verdict.regressed_scopes == ["b"]
    assert verdict.segments["b"].drop == pytest.approx(40 / 150)
    # The same drop under a looser tolerance is not one.
    assert not judge(good, cand, ids, ["a", "b", "c"], tolerance=0.5, alpha=0.01).regressed


def test_tangos_test_at_margin_zero_is_mcnemars_score_test():
    good = np.array([1] * 30 + [0] * 5 + [1] * 50, bool)
    cand = np.array([0] * 30 + [1] * 5 + [1] * 50, bool)
    b, c, p = drop_beyond_one_sided(good, cand, 0.0)
    assert (b, c) == (30, 5)
    assert p == pytest.approx(norm.sf((b - c) / np.sqrt(b + c)))  # the score (normal) form of McNemar's
    assert drop_beyond_one_sided(good, good, 0.0)[2] == 1.0


def test_a_drop_at_the_tolerance_fires_at_most_alpha_of_the_time():
    # The worst case the null allows: the candidate loses exactly `tolerance` of a segment's accuracy.
    rng = np.random.default_rng(2)
    n, tolerance, alpha, windows = 140, 0.2, 0.01, 4000
    fired = 0
    for _ in range(windows):
        u = rng.random(n)
        good, cand = np.ones(n, bool), np.ones(n, bool)
        cand[u < 0.25] = False  # right before, wrong now: 25% ...
        good[(u >= 0.25) & (u < 0.30)] = False  # ... wrong before, right now: 5% (a drop of 0.2)
        fired += drop_beyond_one_sided(good, cand, tolerance)[2] < alpha
    assert fired / windows <= alpha + 3 * np.sqrt(alpha / windows)


def test_the_guards_rule_lets_a_drop_within_the_tolerance_through_and_catches_one_beyond_it():
    rng = np.random.default_rng(3)
    ids = np.repeat(np.arange(3), 150)
    good = rng.random(450) < 0.9

    def losing(answers: int) -> np.ndarray:
        cand = good.copy()
        cand[np.flatnonzero((ids == 1) & good)[:answers]] = False
        return cand

    # 0.2 of segment b lost: the old rule (beyond the tolerance and McNemar) fires as soon as the
    # drop is a hair over it; the test of the tolerance itself does not.
    within = losing(31)
    assert judge(good, within, ids, ["a", "b", "c"], tolerance=0.2, alpha=0.01).regressed
    assert not judge_beyond_tolerance(good, within, ids, ["a", "b", "c"], tolerance=0.2, alpha=0.01).regressed
    beyond = judge_beyond_tolerance(good, losing(75), ids, ["a", "b", "c"], tolerance=0.2, alpha=0.01)
    assert beyond.regressed and beyond.regressed_scopes == ["b"] and beyond.test == "tango"
    assert beyond.fired()[0]["test"] == "tango" and beyond.fired()[0]["scope"] == "b"


def test_offering_examples_in_chunks_keeps_what_offering_them_one_at_a_time_keeps():
    """The vectorised reservoir (a batch's held-out rows at once, fill and replacement alike) is
    sequential algorithm R: any chunking of the same arrivals leaves the same examples in the same slots."""
    x, y = _examples(700)
    one_at_a_time = ProbeStore(INPUTS, LABELS, per_segment=64, seed=5)
    for i in range(len(y)):
        one_at_a_time.add("s", x[i : i + 1], y[i : i + 1])
    rng = np.random.default_rng(0)
    for _ in range(5):
        chunked = ProbeStore(INPUTS, LABELS, per_segment=64, seed=5)
        start = 0
        while start < len(y):
            size = int(rng.choice([0, 1, 2, 3, 7, 64, 100]))
            chunked.add("s", x[start : start + size], y[start : start + size])
            start += size
        xs, ys, _ = chunked.examples()
        xo, yo, _ = one_at_a_time.examples()
        assert np.array_equal(xs, xo) and np.array_equal(ys, yo)
        assert chunked._seen == one_at_a_time._seen == {"s": 700}


def test_a_windows_held_out_rows_added_at_once_fill_the_probe_as_batch_by_batch_adds_do():
    """The loop adds a window's held-out rows at its close (`add_held_out`): two named segments
    interleaved batch by batch and rows without a segment end in the same reservoirs, counts and
    windows as when each batch's rows were added as it came."""
    from types import SimpleNamespace

    from continuity.loop import add_held_out, held_out_rows, join_held_out
    from continuity.stream import NO_SEGMENT

    rng = np.random.default_rng(0)
    names = ["a", "b"]
    batches = []
    for i in range(60):  # far past each reservoir's 20 slots and the 40-example windows
        x, y = _examples(16, i * 16)
        segment = np.full(16, [0, 1, NO_SEGMENT][i % 3], np.int32)
        segment[:3] = 1 - (i % 2)  # a few rows of the other named segment in every batch
        batches.append(SimpleNamespace(x=x, y=y, segment=segment, held_out=rng.random(16) < 0.4))

    def store():
        return ProbeStore(INPUTS, LABELS, per_segment=20, window_examples=40, seed=5)

    one_by_one, at_once = store(), store()
    for batch in batches:
        add_held_out(one_by_one, names, *join_held_out([held_out_rows(batch)]))
    add_held_out(at_once, names, *join_held_out([held_out_rows(batch) for batch in batches]))

    def by_segment(probe):  # each segment's examples and count, whatever order they were opened in
        arrays, meta = probe.to_arrays()
        kept = {name: (arrays[f"s{i}"], seen) for i, (name, seen) in enumerate(zip(meta["segments"], meta["seen"]))}
        return kept, meta["unsegmented_seen"]

    (expected, expected_unsegmented), (got, got_unsegmented) = by_segment(one_by_one), by_segment(at_once)
    assert sorted(got) == sorted(expected) and len(got) > 3 and got_unsegmented == expected_unsegmented > 0
    for name, (arrays, seen) in expected.items():
        assert got[name][1] == seen
        np.testing.assert_array_equal(got[name][0]["x"], arrays["x"])
        np.testing.assert_array_equal(got[name][0]["y"], arrays["y"])
