"""One of several processes training one model: joining them (`jax.distributed`) from [scale].

Every process runs `continuity serve` with the same config and its own `process_id`; each
calls `join` before anything asks JAX for its devices, and JAX's coordinator (process 0,
at `coordinator`) then forms one set of devices of every process, which the learner's mesh
spans (learner/devices.py). On CPU the processes' collectives go over gloo (XLA's CPU
client has no other cross-process transport); GPUs use NCCL, which JAX picks itself.
"""

from __future__ import annotations

import logging

from continuity.config import ScaleConfig
from continuity.errors import UsageError

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 300  # how long a process waits for all the others at the coordinator (JAX's own default)


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
