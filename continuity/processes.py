"""One of several processes training one model: joining them (`jax.distributed`) from [scale].

Every process runs `continuity serve` with the same config and its own `process_id`; each
calls `join` before anything asks JAX for its devices, and JAX's coordinator (process 0,
at `coordinator`) then forms one set of devices of every process, which the learner's mesh
spans (learner/devices.py). On CPU the processes' collectives go over gloo (XLA's CPU
client has no other cross-process transport); GPUs use NCCL, which JAX picks itself.

A dead peer: the others must not wait for it forever. A process killed outright closes its
connections, and the next collective of every other one fails at once (gloo: "Connection
closed by peer"); the lockstep loop turns that into `PeerLost` (continuity/lockstep.py), and
`serve` prints one line naming the peer and exits with PEER_LOST_EXIT_STATUS without saving
anything (the last checkpoint stays the resume point). A peer that stops without closing its
connections (its host down, the network cut) stops sending heartbeats to JAX's coordination
service, which after `HEARTBEAT_TIMEOUT_S` aborts every other process (exit 134, JAX's line
"Terminating process because the JAX distributed service detected fatal errors"). If the
coordinator itself (process 0) dies, JAX's client aborts every other process at once the same
way: it cannot go on without the coordinator. A peer alive but stuck, or stopped on its own,
fails nothing: continuity/peerwatch.py bounds the others' wait for it and names it.
"""

from __future__ import annotations

import logging
from typing import NoReturn

from continuity.config import ScaleConfig
from continuity.errors import UsageError

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 300  # how long a process waits for all the others at the coordinator (JAX's own default)
HEARTBEAT_TIMEOUT_S = 30  # a process silent this long is dead: JAX aborts the others (its default is 100)
PEER_LOST_EXIT_STATUS = (
    6  # `serve`: a peer process died (or is stuck, or stopped); nothing saved, restart every process
)


class PeerLost(RuntimeError):
    """Another process of the mesh died: a collective with it failed. Nothing more can be trained or
    saved (every step and checkpoint needs every process); the message names the peer."""


def join(scale: ScaleConfig, *, timeout_s: int = JOIN_TIMEOUT_S) -> bool:
    """Start jax.distributed for [scale]'s processes; False (and nothing done) for one process.

    Must run before JAX's backend starts (any device query): a UsageError says so otherwise,
    and names the coordinator when the others do not come in `timeout_s`.
    """
    if scale.num_processes == 1:
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=scale.coordinator,
            num_processes=scale.num_processes,
            process_id=scale.process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        )
    except (RuntimeError, ValueError) as error:
        detail = " ".join(str(error).split())[:300]
        raise UsageError(
            f"[scale] process {scale.process_id} of {scale.num_processes} could not join the coordinator at "
            f"{scale.coordinator}: {detail}"
        ) from None
    log.info(
        "process %d of %d joined at %s: %d device(s) here, %d in all",
        scale.process_id,
        scale.num_processes,
        scale.coordinator,
        len(jax.local_devices()),
        len(jax.devices()),
    )
    return True


def exit_on_peer_lost(error: PeerLost) -> NoReturn:
    """Print `error` as one line and exit PEER_LOST_EXIT_STATUS at once: not through the interpreter's
    exit, whose jax.distributed shutdown (atexit) would wait at a barrier the dead peer never reaches."""
    import os
    import sys

    print(f"continuity: {error}", file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(PEER_LOST_EXIT_STATUS)
