"""One of several processes (jax.distributed over gloo) training one model in lockstep rounds from
its share of a Kafka topic's partitions; the parent (tests/test_procs.py) starts them.

`python tests/procs_worker.py PORT PROCESS PROCESSES BOOTSTRAP TOPIC [CHECKPOINTS]` reads partitions
p % PROCESSES == PROCESS of TOPIC to its end, trains, and prints JSON: {"process", "devices",
"ids" (the example ids it trained), "fresh_rows" (over all processes), "digest", "positions"
(every process's, all-gathered), "rounds", "held_out" (the ids it held out for the probe),
"probe" (every process's held-out ids, all-gathered), "restored_digest" (with CHECKPOINTS:
process 0 saves the model there with every process's positions, restores it, and every
process puts what it restored on the mesh)}.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from continuity.checkpoints import CheckpointStore
from continuity.config import ScaleConfig
from continuity.learner import Batch, Classification, LearnerConfig, ModelConfig, ReplayConfig
from continuity.learner.devices import process_devices
from continuity.lockstep import Lockstep
from continuity.loop import params_digest
from continuity.processes import join
from continuity.stream import (
    Batcher,
    BinaryCodec,
    FeatureSpec,
    Holdout,
    Ingest,
    KafkaSettings,
    KafkaSource,
    ProcessShare,
)
from continuity.stream.ingest import BatchStream

SPEC = FeatureSpec((2,), "float32", 10)  # x = [id, id]: every example followed


def main() -> None:
    port, process, processes = (int(a) for a in sys.argv[1:4])
    bootstrap, topic = sys.argv[4:6]
    join(ScaleConfig(coordinator=f"127.0.0.1:{port}", num_processes=processes, process_id=process), timeout_s=120)
    from continuity.factory import build_learner

    config = LearnerConfig(
        model=ModelConfig(kind="mlp", hidden=(16,)),
        batch_size=16,
        replay=ReplayConfig(capacity=64, batch_size=8),
        steps_per_dispatch=2,
    )
    learner = build_learner(
        config, inputs=jax.ShapeDtypeStruct((2,), np.float32), task=Classification(10), devices=process_devices(1)
    )
    source = KafkaSource(KafkaSettings(bootstrap, (topic,)), share=ProcessShare(process, processes), until_end=True)
    holdout = Holdout(0.1, salt=0)
    batcher = Batcher(SPEC, learner.process_rows, holdout=holdout, ownership=source.ownership)
    lockstep = Lockstep(learner, round_s=0.3)
    state = learner.init(0)
    ids: list[int] = []
    held_out: list[int] = []  # the probe's rows, by example id
    with Ingest(source, BinaryCodec(SPEC)) as ingest:
        stream = BatchStream(ingest, batcher, flush_idle=True, max_wait_s=0.1)
        ended = False
        while True:
            polled, ended_now = lockstep.poll(stream.next) if not ended else ([], True)
            ended = ended or ended_now
            batches = [Batch(b.x, b.y, b.train_mask) for b in polled]
            held_out.extend(int(v) for b in polled for v in b.x[b.held_out][:, 0])
            for b in batches:
                ids.extend(int(v) for v in b.x[b.mask][:, 0])
            agreement = lockstep.agree(len(batches), sum(int(b.mask.sum()) for b in batches), ended=ended, stop=False)
            if agreement.ended:
                break
            for stack in lockstep.stacks(batches, agreement):
                state, _ = learner.train_steps(state, learner.put_stack(stack))
    totals, state = learner.take_totals(state)
    positions = lockstep.gather_positions(batcher.positions)
    probe = lockstep.gather_rows(np.array(held_out, np.int64))
    restored_digest = None
    if len(sys.argv) > 6:  # process 0 alone checkpoints the replicated model; every process gets it back
        host = jax.tree.map(np.asarray, state)
        if process == 0:
            with CheckpointStore(sys.argv[6]) as store:
                metadata = {"status": "good", "positions": positions.to_json(), "learner_step": int(state.step)}
                store.save(state, {}, metadata)
                store.wait()
                host = store.restore(store.last_good(), state_like=host).state
        restored = learner.placement.put_state(lockstep.from_process_zero(host))
        restored_digest = params_digest(restored)
    report = {
        "process": process,
        "devices": len(jax.devices()),
        "ids": ids,
        "fresh_rows": int(totals.fresh_rows),
        "digest": params_digest(state),
        "positions": positions.to_json(),
        "rounds": lockstep.rounds,
        "held_out": sorted(held_out),
        "probe": probe.tolist(),
        "restored_digest": restored_digest,
    }
    print(json.dumps(report), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
