"""Device-resident replay buffers as pure JAX functions.

A policy is `init` / `add` / `sample` over a fixed-shape `ReplayState` (see
replay/state.py for the contract every policy keeps). This package imports nothing
else from the project.
"""

from continuity.replay.class_balanced import class_balanced
from continuity.replay.fifo import fifo
from continuity.replay.policies import REPLAY_KINDS, make
from continuity.replay.reservoir import reservoir
from continuity.replay.sharded import reshard, shard_count, sharded
from continuity.replay.state import ReplayPolicy, ReplayState, buffer_bytes

__all__ = [
    "REPLAY_KINDS",
    "ReplayPolicy",
    "ReplayState",
    "buffer_bytes",
    "class_balanced",
    "fifo",
    "make",
    "reservoir",
    "reshard",
    "shard_count",
    "sharded",
]
