"""Runs in a subprocess with faked CPU devices (XLA_FLAGS set by the parent before JAX starts):
trains the same stacks on one device and on a mesh of all of them, and prints JSON.

`python tests/scale_worker.py DISPATCHES` prints {"devices", "max_param_diff",
"max_param", "compiles_after_first", "examples", and the one-device params evaluated on one
device and on the mesh: "evaluated", "same_outcomes", "max_loss_diff", "accuracy"}.

`python tests/scale_worker.py PORT PROCESS_ID PROCESSES DISPATCHES:LAYOUT ...`: one of several
processes (jax.distributed over gloo, coordinator 127.0.0.1:PORT) training one model over all their
devices, each feeding its share of every micro-batch's rows, once per DISPATCHES:LAYOUT (the replay
layout, replicated or sharded; one join serves them all); prints a list with one report per run:
{"process", "devices", "digest", "max_param_diff" (against one device on the whole batches),
"compiles_after_first", "examples" (one device's, the processes'), "shards_held" (with a replay
buffer sharded over the devices: for each shard on this process's devices, the devices whose rows
it holds)}.

`python tests/scale_worker.py sharded DISPATCHES DIR`: the replay buffer split over the devices
(sharded_replay), checkpoints in DIR.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import numpy as np

from continuity.learner import (
    Batch,
    Classification,
    EWCConfig,
    Learner,
    LearnerConfig,
    ModelConfig,
    ReplayConfig,
    compilation_count,
)

BATCH, K, SHAPE, CLASSES = 32, 4, (8, 8, 1), 10


def learner(devices: int | list[jax.Device], replay: str = "replicated") -> Learner:
    from continuity.factory import build_learner

    config = LearnerConfig(
        model=ModelConfig(kind="mlp", hidden=(64,)),
        batch_size=BATCH,
        replay=ReplayConfig(capacity=256, batch_size=16),
        ewc=EWCConfig(enabled=True, strength=100.0),
        steps_per_dispatch=K,
    )
    inputs = jax.ShapeDtypeStruct(SHAPE, np.float32)
    return build_learner(config, inputs=inputs, task=Classification(CLASSES), devices=devices, replay=replay)


def stacks(dispatches: int) -> list[Batch]:
    """Host stacks of a learnable problem (the label is the argmax of a fixed projection), some rows
    padding, the last stack short: what the loop sends."""
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(int(np.prod(SHAPE)), CLASSES)).astype(np.float32)
    one = learner(1)
    out = []
    for i in range(dispatches):
        batches = []
        for _ in range(K if i < dispatches - 1 else K // 2):
            x = rng.random((BATCH, *SHAPE), dtype=np.float32)
            y = (x.reshape(BATCH, -1) @ projection).argmax(axis=1).astype(np.int32)
            batches.append(Batch(x, y, rng.random(BATCH) < 0.9))
        out.append(one.stack(batches))
    return out


def train(devices: int, host: list[Batch]) -> tuple[dict, int, int]:
    return _train(learner(devices), host)


def _train(model: Learner, host: list[Batch]) -> tuple[dict, int, int]:
    """Params after every stack (a consolidation halfway), compilations by the dispatches after
    the first, examples trained."""
    state = model.init(0)
    recompiles = 0
    for i, stack in enumerate(host):
        before = compilation_count()
        state, _ = model.train_steps(state, model.put_stack(stack))
        jax.block_until_ready(state)
        if i > 0:
            recompiles += compilation_count() - before
        if i == len(host) // 2:
            state = model.consolidate(state)
    totals, state = model.take_totals(state)
    return jax.tree.map(np.asarray, state.params), recompiles, int(totals.fresh_rows)


def share(stack: Batch, process: int, processes: int) -> Batch:
    """This process's rows of every micro-batch of a stack: the `process`-th of `processes` slices."""
    rows = BATCH // processes
    part = slice(process * rows, (process + 1) * rows)
    return Batch(stack.x[:, part], stack.y[:, part], stack.mask[:, part])


def several_processes(port: int, process: int, processes: int, runs: list[tuple[int, str]]) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=processes, process_id=process)
    reports = [_one_model(dispatches, process, processes, replay) for dispatches, replay in runs]
    print(json.dumps(reports), flush=True)
    jax.distributed.shutdown()


def _one_model(dispatches: int, process: int, processes: int, replay: str) -> dict:
    host = stacks(dispatches)
    one, _, examples_one = train(1, host)
    model = learner(jax.devices(), replay)  # every process's devices: one mesh over them all
    state = model.init(0)
    recompiles = 0
    for i, stack in enumerate(host):
        before = compilation_count()
        state, _ = model.train_steps(state, model.put_stack(share(stack, process, processes)))
        jax.block_until_ready(state)
        if i > 0:
            recompiles += compilation_count() - before
        if i == len(host) // 2:
            state = model.consolidate(state)
    totals, state = model.take_totals(state)
    many = jax.tree.map(np.asarray, state.params)
    from continuity.loop import params_digest

    # A sharded buffer: which devices' rows each shard this process holds came from.
    held: dict[int, list[int]] = {}
    if replay == "sharded":
        devices = len(jax.devices())
        device_of = {
            row.tobytes(): r // (BATCH // devices) for stack in host for batch in stack.x for r, row in enumerate(batch)
        }
        size = {s.index[0].start: int(np.asarray(s.data)[0]) for s in state.replay.size.addressable_shards}
        for shard in state.replay.x.addressable_shards:
            first = shard.index[0].start
            held[first] = sorted({device_of[row.tobytes()] for row in np.asarray(shard.data)[0][: size[first]]})

    return {
        "process": process,
        "devices": len(jax.devices()),
        "digest": params_digest(state),
        "max_param_diff": max(
            float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many))
        ),
        "compiles_after_first": recompiles,
        "examples": [examples_one, int(totals.fresh_rows)],
        "shards_held": {str(k): v for k, v in sorted(held.items())} if replay == "sharded" else None,
    }


def _collectives(model: Learner, stack: Batch) -> dict:
    """The collectives of `model`'s compiled train_steps: {op: [result shape, ...]}."""
    text = model.train_steps.lower(model.init(0), model.put_stack(stack)).compile().as_text()
    found: dict = {}
    for shape, op in re.findall(r"= (\S+) (all-gather|all-reduce|collective-permute|all-to-all)(?:-start)?\(", text):
        found.setdefault(op, []).append(shape.split("{")[0])
    return found


def _held(replay_state) -> list[bytes]:
    """Each held example's features as bytes, per shard (one list per shard; one buffer: one list)."""
    x, size = np.asarray(replay_state.x), np.asarray(replay_state.size)
    if size.ndim == 0:
        x, size = x[None], size[None]
    return [sorted(row.tobytes() for row in x[s, : int(size[s])]) for s in range(len(size))]


def sharded_replay(dispatches: int, directory: str) -> None:
    """A replay buffer split over the devices ([scale] replay_layout = "sharded"): trains, checks which
    rows each shard holds, compares the compiled collectives with the replicated buffer's, and saves
    and restores on the mesh, onto one device and onto 2 devices (the buffer re-dealt)."""
    from jax.sharding import PartitionSpec

    from continuity.checkpoints import CheckpointStore

    host = stacks(dispatches)
    devices = len(jax.local_devices())
    model = learner(devices, "sharded")
    # Row r of every micro-batch is on device r // (BATCH / devices): the shard it must land in.
    device_of = {
        row.tobytes(): r // (BATCH // devices) for stack in host for batch in stack.x for r, row in enumerate(batch)
    }
    params, recompiles, examples = _train(model, host)
    state = model.init(0)
    for stack in host[:-1]:
        state, _ = model.train_steps(state, model.put_stack(stack))
    shards = _held(state.replay)
    store = CheckpointStore(directory)
    number = store.save(state, {}, {"status": "good"})
    store.wait()
    saved = jax.tree.map(np.asarray, state)
    restored = store.restore(number, state_like=model.init(0), reshape=model.relayout).state
    same = all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)))
    spec = jax.tree.leaves(restored.replay)[0].sharding.spec
    # The next dispatch from the restored state is the one from the saved state.
    before = compilation_count()
    resumed, _ = model.train_steps(restored, model.put_stack(host[-1]))
    compiles_on_restore = compilation_count() - before
    go_on, _ = model.train_steps(state, model.put_stack(host[-1]))
    resumes_exactly = all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(go_on))
    )
    held = sorted(b for shard in shards for b in shard)
    elsewhere = {}
    for name, other in (("one_device", learner(1)), ("two_devices", learner(2, "sharded"))):
        back = store.restore(number, state_like=other.init(0), reshape=other.relayout).state
        there = _held(back.replay)
        seen = int(np.sum(np.asarray(back.replay.seen)))
        trained, _ = other.train_steps(back, other.put_stack(host[-1]))  # and it trains on
        elsewhere[name] = {
            "same_examples": sorted(b for shard in there for b in shard) == held,
            "shards": len(there),
            "seen": seen,
            "trained": int(trained.totals.fresh_rows) > 0,
        }
    try:
        store.restore(number, state_like=learner(1).init(0))
        refused = ""
    except ValueError as error:
        refused = str(error)
    store.close()
    one, _, _ = train(1, host)
    rows = np.concatenate([stack.x.reshape(-1, *SHAPE) for stack in host])[:2048]
    labels = np.concatenate([stack.y.reshape(-1) for stack in host])[:2048]
    report = {
        "devices": devices,
        "compiles_after_first": recompiles,
        "examples": examples,
        "shard_sizes": [len(s) for s in shards],
        "shards_hold_their_devices_rows": [sorted({device_of[b] for b in shard}) for shard in shards],
        "max_param_diff_vs_1_device": max(
            float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(params))
        ),
        "accuracy": model.evaluate(model.placement.put_state(params), rows, labels).accuracy,
        "collectives": {"sharded": _collectives(model, host[0]), "replicated": _collectives(learner(devices), host[0])},
        "restored_same": same,
        "restored_spec": list(spec) == list(PartitionSpec("data")),
        "compiles_on_restore": compiles_on_restore,
        "resumes_exactly": resumes_exactly,
        "seen": int(np.sum(saved.replay.seen)),
        "elsewhere": elsewhere,
        "refused_without_reshape": refused,
    }
    print(json.dumps(report), flush=True)


def main() -> None:
    if sys.argv[1] == "sharded":
        sharded_replay(int(sys.argv[2]), sys.argv[3])
        return
    if len(sys.argv) > 2:
        runs = [(int(dispatches), layout) for dispatches, layout in (run.split(":") for run in sys.argv[4:])]
        several_processes(*(int(a) for a in sys.argv[1:4]), runs)
        return
    host = stacks(int(sys.argv[1]))
    devices = len(jax.local_devices())
    single, mesh = learner(1), learner(devices)
    one, _, examples_one = _train(single, host)
    many, recompiles, examples = _train(mesh, host)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))
    # The same params scored on one device and split over the mesh: a whole chunk, a small one, padding.
    rows = np.concatenate([stack.x.reshape(-1, *SHAPE) for stack in host])[:2600]
    labels = np.concatenate([stack.y.reshape(-1) for stack in host])[:2600]
    alone = single.evaluate(single.placement.put_state(one), rows, labels)
    split = mesh.evaluate(mesh.placement.put_state(one), rows, labels)
    print(
        json.dumps(
            {
                "devices": devices,
                "max_param_diff": diff,
                "max_param": max(float(np.max(np.abs(a))) for a in jax.tree.leaves(one)),
                "compiles_after_first": recompiles,
                "examples": [examples_one, examples],
                "evaluated": [len(alone.loss), len(split.loss)],
                "same_outcomes": bool(np.array_equal(alone.outcome, split.outcome)),
                "max_loss_diff": float(np.max(np.abs(alone.loss - split.loss))),
                "accuracy": alone.accuracy,
            }
        )
    )


if __name__ == "__main__":
    main()
