"""Prequential (test-then-train) figures: how well the learner predicts the stream it learns from.

Every trained row is first predicted by the model as it stands before the update that
trains on it (the forward pass the train step already does, Learner._train_step's
`row_outcomes`), so its outcome is an honest test on an example not yet seen (Dawid 1984;
Gama et al. 2013, "On evaluating stream learning algorithms"). This is the figure River and
MOA report for online learners. Held-out probe rows are never trained, so never counted.

`PrequentialTracker` keeps, on the host, the mean outcome (accuracy, or mean loss for a
task judged on losses) since the stream's start, over a sliding window of the last N
trained examples, and per named segment. The counts follow the lineage of accepted models,
as the model does: a snapshot belongs to each good model and is saved in its checkpoint, a
rollback restores the good model's snapshot, and a restart restores the checkpoint's, so a
record that is trained again after a rollback or a restart is counted once.

The step's per-row outcomes stay on the device until they are read (`settle`, at progress
reports and judgements, where the loop already waits for the device): no sync per step.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import numpy as np

from continuity.learner.tasks import Outcome
from continuity.stream import NO_SEGMENT


@dataclass(frozen=True)
class PrequentialFigures:
    """A reading of the tracker. `figure` names the mean outcome as the task does ("accuracy", "loss")."""

    figure: str
    total: float | None  # since the stream's start (the lineage's trained examples); None before any
    window: float | None  # over the last `window_size` trained examples
    examples: int  # trained examples counted in `total`
    window_size: int
    segments: dict[str, float] = field(default_factory=dict)  # per named segment, since start

    def to_json(self) -> dict:
        return asdict(self)


class PrequentialTracker:
    """Since-start, sliding-window and per-segment prequential figures of one training lineage.

    `window`: trained examples in the sliding window. `max_segments`: per-segment totals
    kept (the oldest segment is dropped beyond it, as the probe drops its oldest).
    """

    def __init__(self, outcome: Outcome, *, window: int = 1000, max_segments: int = 64):
        if window < 1:
            raise ValueError(f"the prequential window must hold at least 1 example. Got {window}.")
        self.outcome = outcome
        self.window_size = window
        self.max_segments = max_segments
        self._pending: list[tuple[Any, Any, np.ndarray, list]] = []  # (outcomes, trained) on the device, segments
        self._reset()

    def _reset(self) -> None:
        self._sum = 0.0
        self._count = 0
        self._window: collections.deque[float] = collections.deque(maxlen=self.window_size)
        self._segments: dict[str, list] = {}  # name -> [sum, count], oldest first

    # ---- recording --------------------------------------------------------------------------

    def record(self, outcomes, trained, segments: np.ndarray, segment_names: list) -> None:
        """One dispatch's `row_outcomes` and `row_trained` (device arrays, shape [B] or [K, B]),
        with the host's segment id of each row (same shape; NO_SEGMENT where none) and the
        names they index (append-only, so they are resolved when read)."""
        self._pending.append((outcomes, trained, np.asarray(segments), segment_names))

    def settle(self) -> None:
        """Fold the dispatches recorded so far into the figures (waits for them on the device)."""
        pending, self._pending = self._pending, []
        for (outcomes, trained), segments, names in zip(
            jax.device_get([(o, t) for o, t, _, _ in pending]), (p[2] for p in pending), (p[3] for p in pending)
        ):
            self._fold(
                np.asarray(outcomes).reshape(-1), np.asarray(trained, bool).reshape(-1), segments.reshape(-1), names
            )

    def _fold(self, outcomes: np.ndarray, trained: np.ndarray, segments: np.ndarray, names: list) -> None:
        values = outcomes[trained].astype(np.float64)
        if not values.size:
            return
        self._sum += float(values.sum())
        self._count += int(values.size)
        self._window.extend(values.tolist())
        ids = segments[trained]
        for segment_id in np.unique(ids):
            if segment_id == NO_SEGMENT:
                continue
            name = names[segment_id]
            chosen = values[ids == segment_id]
            totals = self._segments.pop(name, [0.0, 0])  # re-inserted: the newest segment is last
            self._segments[name] = [totals[0] + float(chosen.sum()), totals[1] + int(chosen.size)]
        while len(self._segments) > self.max_segments:
            del self._segments[next(iter(self._segments))]

    # ---- reading ----------------------------------------------------------------------------

    def figures(self) -> PrequentialFigures:
        """The figures of everything recorded so far (settles first)."""
        self.settle()
        window = self._window
        return PrequentialFigures(
            figure=self.outcome.figure,
            total=self._sum / self._count if self._count else None,
            window=sum(window) / len(window) if window else None,
            examples=self._count,
            window_size=self.window_size,
            segments={name: s / n for name, (s, n) in self._segments.items() if n},
        )

    def mean_since(self, snapshot: dict | None) -> float | None:
        """The mean outcome of the examples recorded since `snapshot` (a judged window's own figure)."""
        self.settle()
        before_sum, before_count = (float(snapshot["sum"]), int(snapshot["count"])) if snapshot else (0.0, 0)
        count = self._count - before_count
        return (self._sum - before_sum) / count if count > 0 else None

    # ---- lineage: snapshots saved with each good model ---------------------------------------

    def snapshot(self) -> dict:
        """What a checkpoint saves (JSON): the totals now, the window's outcomes, per-segment totals."""
        self.settle()
        return {
            "sum": self._sum,
            "count": self._count,
            "window": list(self._window),
            "segments": [[name, s, n] for name, (s, n) in self._segments.items()],
        }

    def restore(self, snapshot: dict | None) -> None:
        """Go back to a snapshot (a rollback, a restart); None: the stream's start. Unread dispatches
        belong to what is abandoned and are dropped."""
        self._pending = []
        self._reset()
        if not snapshot:
            return
        self._sum = float(snapshot["sum"])
        self._count = int(snapshot["count"])
        self._window.extend(float(v) for v in snapshot["window"])
        self._segments = {name: [float(s), int(n)] for name, s, n in snapshot["segments"]}
