"""Choosing a replay policy by name, as configuration files and the CLI do."""

from __future__ import annotations

from continuity.replay.class_balanced import class_balanced
from continuity.replay.fifo import fifo
from continuity.replay.reservoir import reservoir
from continuity.replay.state import ReplayPolicy, check_capacity

REPLAY_KINDS = ("reservoir", "class_balanced", "fifo")

_BUILDERS = {"reservoir": reservoir, "class_balanced": class_balanced, "fifo": fifo}


def make(kind: str, capacity: int) -> ReplayPolicy:
    """The replay policy called `kind` (one of REPLAY_KINDS) with `capacity` slots.

    Raises ValueError naming the allowed values for an unknown kind, and for a
    capacity below 1.
    """
    if kind not in _BUILDERS:
        allowed = ", ".join(repr(k) for k in REPLAY_KINDS)
        raise ValueError(f"Replay `kind` must be one of {allowed}. Got {kind!r}.")
    return _BUILDERS[kind](check_capacity(capacity))
