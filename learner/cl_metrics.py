"""Continual-learning summary metrics from an accuracy matrix (pure NumPy).

R[i, j] is the test accuracy on segment j after training through segment i. From it:

- average accuracy (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual
  Learning"): mean of the last row, how good the final model is on everything;
- backward transfer, BWT (same paper): mean over j < T-1 of R[T-1, j] - R[j, j], how
  learning later segments changed accuracy on earlier ones (negative = forgetting);
- forgetting (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning"): mean
  over j < T-1 of max_{l < T-1} R[l, j] - R[T-1, j], the drop from the best accuracy
  ever reached on a segment to the final one.

BWT compares against the accuracy just after training on j; forgetting against the
best at any point, so a segment that improved and then fell back shows as forgotten
even when BWT is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# eq=False: `accuracy_matrix` is an array, for which a generated __eq__ / __hash__ would raise.
@dataclass(frozen=True, eq=False)
class ContinualMetrics:
    """Summary of a continual run; see the module docstring for the definitions."""

    accuracy_matrix: np.ndarray  # float64, shape=(T, T), read-only: R[i, j] as validated
    avg_accuracy: float  # mean of R[T-1, :]
    forgetting: float | None  # Chaudhry et al. 2018; None when T == 1 (nothing earlier to forget)
    bwt: float | None  # Lopez-Paz & Ranzato 2017; None when T == 1


def continual_metrics(accuracy_matrix) -> ContinualMetrics:
    """Average accuracy, forgetting and backward transfer of an accuracy matrix R (T x T).

    Raises ValueError when R is not a non-empty square 2-D matrix of finite values in [0, 1].
    """
    try:
        matrix = np.array(accuracy_matrix, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"accuracy_matrix must be a square 2-D array of numbers. Got {accuracy_matrix!r}.") from error
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"accuracy_matrix must be a non-empty square 2-D array (T, T). Got shape {matrix.shape}.")
    if not np.all(np.isfinite(matrix)):
        raise ValueError("accuracy_matrix must hold finite values in [0, 1]. Got NaN or infinity.")
    if matrix.min() < 0.0 or matrix.max() > 1.0:
        raise ValueError(
            f"accuracy_matrix must hold accuracies in [0, 1]. Got values from {matrix.min()} to {matrix.max()}."
        )
    matrix.flags.writeable = False
    segments = matrix.shape[0]
    final = matrix[-1]
    if segments == 1:
        forgetting = bwt = None
    else:
        earlier = np.arange(segments - 1)
        forgetting = float(np.mean(matrix[:-1, :-1].max(axis=0) - final[:-1]))
        bwt = float(np.mean(final[:-1] - matrix[earlier, earlier]))
    return ContinualMetrics(accuracy_matrix=matrix, avg_accuracy=float(final.mean()), forgetting=forgetting, bwt=bwt)
