"""Continual-learning metrics on small matrices whose values are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from continuity.learner.cl_metrics import ContinualMetrics, continual_metrics


def test_hand_computed_three_segments():
    R = [
        [0.9, 0.1, 0.2],
        [0.7, 0.8, 0.1],
        [0.6, 0.5, 0.9],
    ]
    metrics = continual_metrics(R)
    assert isinstance(metrics, ContinualMetrics)
    assert metrics.avg_accuracy == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    # BWT: ((0.6 - 0.9) + (0.5 - 0.8)) / 2 = -0.3: later segments hurt earlier ones.
    assert metrics.bwt == pytest.approx(-0.3)
    # Forgetting: column 0 best 0.9 -> 0.6 (0.3); column 1 best 0.8 -> 0.5 (0.3).
    assert metrics.forgetting == pytest.approx(0.3)
    np.testing.assert_array_equal(metrics.accuracy_matrix, np.array(R))


def test_forgetting_counts_a_peak_after_training_that_bwt_misses():
    """Segment 0 rises to 0.9 after segment 1, then falls back to its first value."""
    metrics = continual_metrics([[0.5, 0.0, 0.0], [0.9, 0.6, 0.0], [0.5, 0.7, 0.8]])
    assert metrics.bwt == pytest.approx(((0.5 - 0.5) + (0.7 - 0.6)) / 2)  # +0.05: positive transfer
    assert metrics.forgetting == pytest.approx(((0.9 - 0.5) + (0.6 - 0.7)) / 2)  # 0.15
    assert metrics.avg_accuracy == pytest.approx(2.0 / 3)


def test_a_non_decreasing_matrix_forgets_nothing():
    R = np.array([[0.6, 0.2, 0.1], [0.7, 0.8, 0.3], [0.8, 0.8, 0.9]])
    metrics = continual_metrics(R)
    # Every column ends at its best, so forgetting is the (negative or zero) gain.
    assert metrics.forgetting == pytest.approx(((0.7 - 0.8) + (0.8 - 0.8)) / 2)
    assert metrics.forgetting <= 0
    assert metrics.bwt == pytest.approx(((0.8 - 0.6) + (0.8 - 0.8)) / 2)
    flat = continual_metrics([[0.8, 0.1], [0.8, 0.9]])
    assert flat.forgetting == 0.0 and flat.bwt == 0.0


def test_a_single_segment_has_no_forgetting_or_transfer():
    metrics = continual_metrics([[0.75]])
    assert metrics.avg_accuracy == 0.75
    assert metrics.forgetting is None and metrics.bwt is None


def test_results_are_python_floats_and_the_matrix_is_a_read_only_copy():
    source = np.array([[1.0, 0.0], [0.5, 1.0]])
    metrics = continual_metrics(source)
    assert all(type(v) is float for v in (metrics.avg_accuracy, metrics.forgetting, metrics.bwt))
    source[0, 0] = 0.0
    assert metrics.accuracy_matrix[0, 0] == 1.0
    assert not metrics.accuracy_matrix.flags.writeable


@pytest.mark.parametrize(
    ("matrix", "piece"),
    [
        ([0.5, 0.6], "square 2-D"),
        ([[0.5, 0.6, 0.7], [0.1, 0.2, 0.3]], "Got shape (2, 3)"),
        (np.zeros((0, 0)), "non-empty"),
        (np.zeros((2, 2, 2)), "Got shape (2, 2, 2)"),
        ([[0.5, 1.2], [0.1, 0.2]], "[0, 1]"),
        ([[0.5, -0.1], [0.1, 0.2]], "[0, 1]"),
        ([[0.5, np.nan], [0.1, 0.2]], "NaN"),
        ([["a", "b"], ["c", "d"]], "numbers"),
        ([[0.5, 0.6], [0.1]], "numbers"),
    ],
)
def test_invalid_matrices_raise_a_value_error_naming_the_problem(matrix, piece):
    with pytest.raises(ValueError) as error:
        continual_metrics(matrix)
    assert piece in str(error.value)
