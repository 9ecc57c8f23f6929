"""What checking checkpoints costs: digest verification as a share of restore time, and the digests' price.

- verification share: `CheckpointStore.restore` reads the state (and probe) back and
  checks every array against its CRC-32C; the share is the time of that check alone
  (`integrity.array_digests` over the restored trees, timed on the same restores) over
  the whole restore's. Median of `repeats` restores in one run, for the service's
  default config (`continuity config example`): the learner state after a few steps,
  with an empty probe and with a full one (max_segments x per_segment examples: what a
  long-running service holds).
- per array vs per checkpoint: one CRC-32C per array against one chained over all of
  them, on the same bytes (the per-array digest names the array that changed).
- the params SHA-256 and the digests at save time, in the writer thread (off the training thread).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import crc32c
import jax
import numpy as np

from continuity.checkpoints import CheckpointStore, integrity


def _default_state():
    """The learner state of the service's default config after a few steps (filled replay, moments, EWC)."""
    from continuity.config import load_config
    from continuity.learner import Batch
    from continuity.service import build_learner

    config = load_config(None)
    learner = build_learner(config)
    state = learner.init(0)
    rng = np.random.default_rng(0)
    rows = learner.batch_size
    for _ in range(40):  # 1,280 examples: the 1,000-row replay buffer is full
        x = rng.random((rows, *config.stream.feature_shape), dtype=np.float32)
        batch = Batch(x, rng.integers(0, 10, rows).astype(np.int32), np.ones(rows, bool))
        state, _ = learner.train_step(state, batch)
    return config, learner, jax.block_until_ready(state)


def _full_probe(config) -> dict:
    rows = config.probe.max_segments * config.probe.per_segment
    rng = np.random.default_rng(1)
    return {
        "x": rng.random((rows, *config.stream.feature_shape), dtype=np.float32),
        "y": rng.integers(0, 10, rows).astype(np.int32),
    }


def _median_ms(work: Callable[[], object], repeats: int) -> float:
    work()  # warm
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds)


def measure_restore(state, probe: dict, like, *, repeats: int) -> dict:
    """Median restore time and median time of its digest check, over the same restores."""
    with tempfile.TemporaryDirectory() as scratch, CheckpointStore(scratch) as store:
        number = store.save(state, probe, {"status": "good"})
        store.wait()
        restore_s, check_s = [], []
        for attempt in range(repeats + 1):
            started = time.perf_counter()
            restored = store.restore(number, state_like=like, probe_like=probe or None)
            jax.block_until_ready(restored.state)
            restored_at = time.perf_counter()
            integrity.array_digests(restored.state)
            integrity.array_digests(restored.probe)
            checked_at = time.perf_counter()
            if attempt:  # the first one warms Orbax's and TensorStore's caches of code paths
                restore_s.append(restored_at - started)
                check_s.append(checked_at - restored_at)
            if not restored.verified:
                raise RuntimeError("the restore was not verified: the benchmark measures nothing")
    restore_ms, check_ms = 1000 * statistics.median(restore_s), 1000 * statistics.median(check_s)
    return {
        "arrays": len(integrity.leaves_by_path(state)) + len(integrity.leaves_by_path(probe)),
        "bytes": int(sum(np.asarray(a).nbytes for a in jax.tree.leaves((state, probe)))),
        "restore_ms_median": restore_ms,
        "verify_ms_median": check_ms,
        "verify_share_of_restore": check_ms / restore_ms,
        "repeats": repeats,
    }


def run_reliability_benchmark(*, repeats: int = 9) -> dict:
    config, learner, state = _default_state()
    like = jax.eval_shape(lambda: learner.init(0))
    host = jax.tree.map(np.asarray, state)
    leaves = [np.ascontiguousarray(a) for a in jax.tree.leaves(host)]

    def per_checkpoint():
        value = 0
        for leaf in leaves:
            value = crc32c.crc32c(leaf.data, value)
        return value

    return {
        "parameters": int(sum(np.size(a) for a in jax.tree.leaves(state.params))),
        "restore": {
            "empty probe": measure_restore(state, {}, like, repeats=repeats),
            "full probe": measure_restore(state, _full_probe(config), like, repeats=repeats),
        },
        "crc32c_per_array_ms": _median_ms(lambda: integrity.array_digests(host), 50),
        "crc32c_per_checkpoint_ms": _median_ms(per_checkpoint, 50),
        "params_sha256_ms": _median_ms(lambda: integrity.params_sha256(host), 50),
        "hardware_crc32c": bool(getattr(crc32c, "hardware_based", False)),
    }


def format_result(result: dict) -> str:
    lines = []
    for probe, figures in result["restore"].items():
        lines.append(
            f"restore, default state + {probe} ({figures['arrays']} arrays, {figures['bytes'] / 1e6:.2f} MB): "
            f"median {figures['restore_ms_median']:.1f} ms, of which the digest check "
            f"{figures['verify_ms_median']:.2f} ms = {100 * figures['verify_share_of_restore']:.1f}% "
            f"(target < 10%; median of {figures['repeats']})"
        )
    lines.append(
        f"CRC-32C of the learner state (hardware: {result['hardware_crc32c']}): per array "
        f"{result['crc32c_per_array_ms']:.3f} ms, one per checkpoint {result['crc32c_per_checkpoint_ms']:.3f} ms; "
        f"params SHA-256 {result['params_sha256_ms']:.3f} ms ({result['parameters']:,} parameters)"
    )
    return "\n".join(lines)
