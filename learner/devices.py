"""Where the learner's state and batches live: one device, or a mesh of local devices that
trains one model data-parallel.

`OneDevice` is the learner as it always was: the state committed to one device, each stack
put there, the step a plain `jax.jit`. `DataParallel` lays the devices out as a 1-D
`jax.sharding.Mesh` with a `data` axis: each micro-batch's rows are split over the devices
(`PartitionSpec("data")`), and everything in the state (parameters, optimizer moments,
EWC anchors and Fisher, the replay buffer, the totals) is replicated. The step is the same
function jitted with those shardings in and out; XLA's SPMD partitioner splits its
per-row work over the devices and inserts the all-reduce that sums the gradient (GSPMD,
Xu et al. 2021), so every device applies the same update and the replicated state stays
identical everywhere. One dispatch still trains K updates, shapes are still fixed, the
state is still donated, and nothing recompiles after the first dispatch.

Evaluation (the probe, the guard's checks) splits its fixed-size chunks of rows over the
devices the same way, each device scoring its share with the replicated parameters.

The replay buffer is replicated by default: every device holds all of it and samples the
same rows, so training is the one-device arithmetic on the same global batch (up to the
order of the gradient's float sums) and `replay.capacity` means what it means on one device.
Each step then gathers the fresh rows of every device into every copy (an all-gather).
`ReplayPerDevice` holds a buffer split per device instead (`replay.sharded`, one shard per
device, its leading shard axis on `data`): each device inserts its own rows into its shard
and samples its share of the replayed rows from it, with no collective; `replay.capacity` is
then the total, capacity / devices per device, and the rows replayed are not one device's.

Given the devices of several processes (`jax.devices()` after `jax.distributed.initialize`),
the mesh spans them: each process stacks only its share of each micro-batch's rows
(`batch_size / processes`) and `put_stack` assembles the global batch from the shares
(`jax.make_array_from_process_local_data`); every process must make the same calls in the
same order. The service runs as N such processes (`[scale] num_processes`): each joins, builds
this mesh over the first `[scale] devices` of every process (`process_devices`), reads its share
of the partitions, and moves in lockstep rounds so the dispatches are the same everywhere
(continuity/lockstep.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from continuity.learner.state import LearnerState

DATA_AXIS = "data"


def local_devices(devices: int | Sequence[jax.Device]) -> list[jax.Device]:
    """The devices a count or a list names: a count takes the first `devices` local devices."""
    if isinstance(devices, bool):
        raise ValueError(f"`devices` must be a device count or a list of jax devices. Got {devices!r}.")
    if isinstance(devices, int):
        available = jax.local_devices()
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"`devices` must be between 1 and the {len(available)} local device(s) "
                f"({available[0].platform}). Got {devices}."
            )
        return available[:devices]
    chosen = list(devices)
    if not chosen or not all(isinstance(d, jax.Device) for d in chosen):
        raise ValueError(f"`devices` must be a device count or a list of jax devices. Got {devices!r}.")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"`devices` names a device twice. Got {chosen!r}.")
    return chosen


def process_devices(count: int) -> list[jax.Device]:
    """The first `count` local devices of every process (after `jax.distributed.initialize`), in
    process order: the devices of one mesh over all processes, each feeding `count` of them."""
    by_process: dict[int, list[jax.Device]] = {}
    for device in jax.devices():
        by_process.setdefault(device.process_index, []).append(device)
    short = {p: len(d) for p, d in by_process.items() if len(d) < count}
    if short:
        raise ValueError(f"`devices` = {count} per process, but some processes have fewer: {short}.")
    return [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:count]]


class OneDevice:
    """The state and every stack on one device; the step a plain jit (no mesh, no overhead)."""

    def __init__(self, device: jax.Device):
        self.device = device
        self.platform = device.platform  # "cpu", "gpu", "tpu": what the step is compiled for
        self.count = 1
        self.processes = 1

    def jit_fresh(self, fresh: Callable) -> Callable:
        """`fresh(params, rng) -> state`, jitted (its leaves each their own buffer)."""
        return jax.jit(fresh)

    def put_state(self, state):
        # Committed, as restored checkpoints are: jit keys its cache on that, so a fresh and a
        # restored state share one compiled step.
        return jax.device_put(state, self.device)

    def put_stack(self, stack):
        return jax.device_put(stack, self.device)

    def put_rows(self, rows):
        """Host rows to evaluate, as they are: jit puts them beside the params."""
        return rows

    def jit_step(self, step: Callable, *, stacked: bool) -> Callable:
        """`step(state, batch) -> (state, metrics)`, jitted with the state donated."""
        return jax.jit(step, donate_argnums=(0,))

    def jit_update(self, update: Callable, *, outputs: int = 1) -> Callable:
        """`update(state, ...) -> state` (or a tuple of `outputs` trees), the state donated."""
        return jax.jit(update, donate_argnums=(0,))


class DataParallel:
    """A 1-D mesh of `devices` on the `data` axis: batches split by rows, the state replicated."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.mesh = Mesh(np.array(list(devices)), (DATA_AXIS,))
        self.platform = devices[0].platform
        self.count = len(devices)
        # Devices of several processes (after jax.distributed.initialize): each process then
        # feeds its own rows of every micro-batch, and every process runs the same dispatches.
        self.processes = len({d.process_index for d in devices})
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self._rows = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))  # a micro-batch: (B, ...)
        self._stacked_rows = NamedSharding(self.mesh, PartitionSpec(None, DATA_AXIS))  # a stack: (K, B, ...)
        # Where the learner state's leaves live (a prefix of the state's tree): all replicated.
        self.state: Any = self.replicated

    def put_state(self, state):
        return jax.device_put(state, self.state if isinstance(state, LearnerState) else self.replicated)

    def jit_fresh(self, fresh: Callable) -> Callable:
        # Built on the devices of the mesh, from host values every process holds alike (a process
        # cannot put an array onto another process's devices).
        jitted = jax.jit(fresh, out_shardings=self.state)
        return lambda params, rng: jitted(jax.tree.map(np.asarray, params), np.asarray(rng))

    def put_rows(self, rows):
        """Host rows to evaluate (leading axis: examples), split over the devices when they divide
        evenly, so each device scores its share; else left for jit to replicate. Several
        processes each hold all the rows: left as they are."""
        leaves = jax.tree.leaves(rows)
        if self.processes > 1 or not leaves or len(leaves[0]) % self.count:
            return rows
        return jax.device_put(rows, self._rows)

    def put_stack(self, stack):
        if self.processes == 1:
            return jax.device_put(stack, self._stacked_rows)
        # This process's rows of each micro-batch; the processes' shares, in process order,
        # make the global batch.
        return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(self._stacked_rows, leaf), stack)

    def jit_step(self, step: Callable, *, stacked: bool) -> Callable:
        rows = self._stacked_rows if stacked else self._rows
        # Outputs pinned where the state lives: left to the partitioner, a leaf could come back
        # sharded otherwise, and the next call, given another sharding, would compile again.
        return jax.jit(
            step,
            in_shardings=(self.state, rows),
            out_shardings=(self.state, self.replicated),
            donate_argnums=(0,),
        )

    def jit_update(self, update: Callable, *, outputs: int = 1) -> Callable:
        """The state is the last of `outputs`; any before it are replicated."""
        out: Any = self.state if outputs == 1 else (*(self.replicated,) * (outputs - 1), self.state)
        return jax.jit(update, out_shardings=out, donate_argnums=(0,))


class ReplayPerDevice(DataParallel):
    """A data-parallel mesh whose replay buffer is split per device: the buffer's leading shard
    axis (`replay.sharded`, one shard per device) on the `data` axis, the rest replicated. Row r
    of a micro-batch is on device r // (B / devices), the rows shard r // (B / devices) takes, so
    inserting and sampling stay on each device."""

    def __init__(self, devices: Sequence[jax.Device]):
        super().__init__(devices)
        # A tree of shardings, a prefix of the state's: the replay buffer's leaves split on their
        # leading (shard) axis, every other field replicated.
        layout: dict[str, Any] = {field.name: self.replicated for field in dataclasses.fields(LearnerState)}
        layout["replay"] = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self.state = LearnerState(**layout)


Placement = OneDevice | DataParallel


def placement(devices: int | Sequence[jax.Device], *, replay_shards: int = 1) -> Placement:
    """One device when `devices` names one (the plain path), else a data-parallel mesh; with a
    replay buffer of `replay_shards` > 1 shards, one per device, a mesh that holds them so."""
    chosen = local_devices(devices)
    if replay_shards > 1 and replay_shards != len(chosen):
        raise ValueError(
            f"a replay buffer split per device must have one shard per device: {len(chosen)} device(s), "
            f"{replay_shards} shards."
        )
    if len(chosen) == 1:
        return OneDevice(chosen[0])
    return ReplayPerDevice(chosen) if replay_shards > 1 else DataParallel(chosen)
