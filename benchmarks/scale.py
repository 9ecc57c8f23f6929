"""`bench scale`: one model's train step over 1, 2, 4... local devices at a fixed per-device batch.

Each device count runs in its own process (`python -m continuity.benchmarks.scale --case N`),
so each starts JAX clean; where the machine has fewer devices of its platform than a case
needs, that process fakes N CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`).
A case builds the learner `bench step` times (MLP 256-256, reservoir replay 1000 rows with 16
replayed per step, online EWC active) with `devices = N` and `batch_size = N x per-device
batch`, and:

- trains it and a one-device learner of the same global batch on the same `check_dispatches`
  stacks from the same seed: `max_param_diff_vs_1_device` is the largest parameter
  difference after them (float rounding of the gradient's all-reduce, amplified by
  training). Its yardstick: `max_param_diff_1_device_nudged_1e-7`, how far that one-device
  run ends from itself started at parameters scaled by (1 + 1e-7);
- times `steps` updates (K per dispatch, each stack put on the devices right before its
  dispatch, as the loop does), `repeats` times; the median gives `step_seconds` (one update)
  and `examples_per_second`; compilations after warm-up are counted (0 expected).

With `processes` P > 1 a case of N devices runs as P processes (subprocesses joined by
jax.distributed over gloo on 127.0.0.1), each with N / P (faked where too few) local devices
and feeding N / P x per-device batch rows of every step: one model over all processes' devices,
as `serve` trains with [scale] num_processes. Its one-device reference trains the whole
global batch in each process; `step_seconds` is process 0's.

`--replay replicated,sharded` runs each device count (above one) with each replay layout
([scale] replay_layout): "sharded" splits the buffer per device (1000 / N rows each), so its
`max_param_diff_vs_1_device` is not rounding but training on other replayed rows. The cases
of several processes keep the replicated layout.

Faked CPU devices share the machine's cores, so no speed-up is possible on them: there the
figure of merit is the overhead, the per-example cost of an N-device step against the
one-device step's (`per_example_cost_vs_1_device`; target <= 1.3 at N = 4). On a host with N
accelerators the same command measures the speed-up (examples/s should grow with N while the
per-device batch is fixed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

SHAPE, CLASSES = (8, 8, 1), 10


def _learner(devices: int, batch_size: int, k: int, *, processes: int = 1, replay: str = "replicated"):
    from continuity.factory import learner_for
    from continuity.learner import EWCConfig, LearnerConfig, ModelConfig, ReplayConfig

    config = LearnerConfig(
        model=ModelConfig(kind="mlp", hidden=(256, 256)),
        batch_size=batch_size,
        replay=ReplayConfig(kind="reservoir", capacity=1000, batch_size=16),
        ewc=EWCConfig(enabled=True, strength=100.0),
        steps_per_dispatch=k,
    )
    one = learner_for(config, SHAPE, CLASSES)
    if devices == 1:
        return one
    from continuity.factory import build_learner

    if processes > 1:  # the first N / P local devices of every process, one mesh
        from continuity.learner.devices import process_devices

        return build_learner(
            config, inputs=one.inputs, task=one.task, devices=process_devices(devices // processes), replay=replay
        )
    return build_learner(config, inputs=one.inputs, task=one.task, devices=devices, replay=replay)


def run_case(
    devices: int,
    *,
    per_device_batch: int,
    k: int,
    steps: int,
    repeats: int,
    check_dispatches: int,
    processes: int = 1,
    process_id: int = 0,
    replay: str = "replicated",
) -> dict:
    """One device count and replay layout, in this process (whose JAX must see `devices` devices,
    or `devices / processes` of them once joined with the other processes)."""
    import jax

    from continuity.benchmarks.step import random_batches
    from continuity.learner import Batch, compilation_count

    batch_size = devices * per_device_batch
    learner = _learner(devices, batch_size, k, processes=processes, replay=replay)
    rng = np.random.default_rng(0)
    pool = random_batches(rng, batch_size, SHAPE, CLASSES)  # the global batches, the same in every process
    rows = slice(process_id * learner.process_rows, (process_id + 1) * learner.process_rows)
    mine = [Batch(b.x[rows], b.y[rows], b.mask[rows]) for b in pool]  # this process's rows of each
    stacks = [learner.stack([mine[(i + j) % len(mine)] for j in range(k)]) for i in range(16)]
    whole = [[pool[(i + j) % len(pool)] for j in range(k)] for i in range(16)]

    def params_after(model, nudge: float = 0.0) -> list[np.ndarray]:
        state = model.init(0)
        state = state.replace(params=jax.tree.map(lambda p: p * (1 + nudge), state.params))
        own = model is learner and processes > 1  # the mesh of several processes: this process's rows
        for i in range(check_dispatches):
            stack = stacks[i % len(stacks)] if own else model.stack(whole[i % len(whole)])
            state, _ = model.train_steps(state, model.put_stack(stack))
        return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]

    def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))

    # The same records on one device and on the mesh: how far apart the two models end. Beside
    # it, how far the one-device run ends from itself started at parameters scaled by
    # (1 + 1e-7), a float rounding's worth: training amplifies any such difference (Adam most),
    # and this is the scale the mesh's difference (the gradient's all-reduce sums in another
    # order) is to be read against.
    one_device = _learner(1, batch_size, k) if devices > 1 else learner
    reference = params_after(one_device)
    diff = largest_difference(reference, params_after(learner)) if devices > 1 else 0.0
    nudged = largest_difference(reference, params_after(one_device, 1e-7))

    state = learner.init(0)
    for stack in stacks:  # warm-up: compile, fill the buffer a little, make the EWC penalty live
        state, _ = learner.train_steps(state, learner.put_stack(stack))
    state = learner.consolidate(state)
    state, _ = learner.train_steps(state, learner.put_stack(stacks[0]))
    jax.block_until_ready(state)
    compiles_before = compilation_count()
    dispatches = -(-steps // k)
    seconds, cpu_seconds = [], []  # wall; this process's CPU time, all threads
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        for i in range(dispatches):
            state, _ = learner.train_steps(state, learner.put_stack(stacks[i % len(stacks)]))
        jax.block_until_ready(state)
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    step_seconds = statistics.median(seconds) / (dispatches * k)
    device = jax.local_devices()[0]
    return {
        "devices": devices,
        "processes": processes,
        "replay": replay,
        "batch_size": batch_size,
        "per_device_batch": per_device_batch,
        "examples_per_second": batch_size / step_seconds,
        "step_seconds": step_seconds,
        "step_cpu_seconds": statistics.median(cpu_seconds) / (dispatches * k),
        "max_param_diff_vs_1_device": diff,
        "compilations_after_warmup": compilation_count() - compiles_before,
        "max_param_diff_1_device_nudged_1e-7": nudged,
        "platform": device.platform,
        "device": str(device.device_kind),
    }


def _local_devices() -> int:
    """How many devices JAX sees here, asked in a process of its own: JAX started in this one
    would hold an accelerator's memory while the cases run."""
    code = "import jax; print(len(jax.local_devices()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def _case_environment(devices: int, present: int) -> tuple[dict[str, str], bool]:
    """The environment a case's process runs in, and whether its devices are faked CPU ones."""
    env = dict(os.environ)
    if present >= devices:
        return env, False
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    return env, True


def _case_command(devices: int, options: list[str]) -> list[str]:
    return [sys.executable, "-m", "continuity.benchmarks.scale", "--case", str(devices), *options]


def _run_processes(devices: int, processes: int, options: list[str], env: dict[str, str]) -> dict:
    """One case as `processes` subprocesses joined at a free port on 127.0.0.1: process 0's result."""
    from continuity.stream import free_port

    port = free_port()
    workers = [
        subprocess.Popen(
            _case_command(
                devices, [*options, "--processes", str(processes), "--process-id", str(p), "--port", str(port)]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in range(processes)
    ]
    outputs = [worker.communicate() for worker in workers]
    for p, (worker, (_, err)) in enumerate(zip(workers, outputs)):
        if worker.returncode != 0:
            raise RuntimeError(
                f"process {p} of the {processes}-process {devices}-device case failed (exit {worker.returncode}): "
                f"{err.strip()[-2000:]}"
            )
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def run_scale_benchmark(
    devices: Sequence[int] = (1, 2, 4),
    *,
    processes: Sequence[int] = (1,),
    per_device_batch: int = 32,
    steps_per_dispatch: int = 8,
    steps: int = 256,
    repeats: int = 3,
    check_dispatches: int = 32,
    replays: Sequence[str] = ("replicated",),
    progress: Callable[[str], None] = lambda _: None,
) -> dict:
    """Every device count in `devices` as one process, then as each count P > 1 of `processes` that
    divides it (N / P devices in each of P processes)."""
    runs = []
    present = _local_devices()
    options = ["--per-device-batch", str(per_device_batch), "--steps-per-dispatch", str(steps_per_dispatch)]
    options += ["--steps", str(steps), "--repeats", str(repeats), "--check-dispatches", str(check_dispatches)]
    # Each replay layout ([scale] replay_layout) per device count; one device has only one.
    cases = [(count, layout) for count in devices for layout in (replays if count > 1 else replays[:1])]
    for count, layout in cases:
        env, faked = _case_environment(count, present)
        progress(f"{count} device(s){' (faked CPU devices)' if faked else ''}, replay {layout} ...")
        command = _case_command(count, [*options, "--replay", layout])
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"the {count}-device case failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "faked_devices": faked})
    for group in (p for p in processes if p > 1):
        for count in (n for n in devices if n % group == 0):
            env, _ = _case_environment(count // group, 0)  # CPU processes over gloo, N / P faked devices each
            progress(f"{count} device(s) as {group} processes x {count // group} (faked CPU devices) ...")
            runs.append({**_run_processes(count, group, options, env), "faked_devices": True})
    one = next((r for r in runs if r["devices"] == 1), None)
    for run in runs:
        # Seconds per example on N devices against one device's: 1.0 is free scaling on shared
        # cores (faked devices); on N real devices, 1/N is perfect speed-up. The CPU-time figure
        # is the same ratio in this process's CPU seconds (a loaded machine skews wall time).
        for figure, key in (
            ("per_example_cost_vs_1_device", "step_seconds"),
            ("per_example_cpu_cost_vs_1_device", "step_cpu_seconds"),
        ):
            run[figure] = None if one is None else (run[key] / run["batch_size"]) / (one[key] / one["batch_size"])
    return {
        "per_device_batch": per_device_batch,
        "steps_per_dispatch": steps_per_dispatch,
        "updates_per_repeat": -(-steps // steps_per_dispatch) * steps_per_dispatch,
        "repeats": repeats,
        "check_updates": check_dispatches * steps_per_dispatch,
        "model": {"kind": "mlp", "hidden": [256, 256], "replay_capacity": 1000, "replay_batch_size": 16, "ewc": True},
        "runs": runs,
    }


def format_result(result: dict) -> str:
    lines = [
        f"per-device batch {result['per_device_batch']}, K = {result['steps_per_dispatch']}, "
        f"params compared after {result['check_updates']} updates",
        "devices (processes)  replay      examples/s  step ms  cost/example vs 1 (wall, CPU)  "
        "max param diff vs 1 device (1 device vs itself nudged 1e-7)  recompiles",
    ]
    for run in result["runs"]:
        cost, cpu = run["per_example_cost_vs_1_device"], run["per_example_cpu_cost_vs_1_device"]
        costs = "-" if cost is None else f"{cost:.2f}, {cpu:.2f}"
        nudged = run["max_param_diff_1_device_nudged_1e-7"]
        where = f"{run['devices']:>3} ({run['processes']}){' faked' if run['faked_devices'] else ''}"
        lines.append(
            f"{where:<19}  {run.get('replay', 'replicated'):<10} {run['examples_per_second']:>11,.0f} "
            f"{run['step_seconds'] * 1e3:>8.3f}  {costs:>30}  {run['max_param_diff_vs_1_device']:>12.2e} ({nudged:.2e})"
            f"{run['compilations_after_warmup']:>30}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one `bench scale` case, in a process of its own")
    parser.add_argument("--case", type=int, required=True)
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--steps-per-dispatch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--check-dispatches", type=int, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="the coordinator's port on 127.0.0.1 (--processes > 1)")
    parser.add_argument("--replay", choices=("replicated", "sharded"), default="replicated")
    args = parser.parse_args(argv)
    if args.processes > 1:
        from continuity.config import ScaleConfig
        from continuity.processes import join

        join(
            ScaleConfig(coordinator=f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.process_id)
        )
    result = run_case(
        args.case,
        per_device_batch=args.per_device_batch,
        k=args.steps_per_dispatch,
        steps=args.steps,
        repeats=args.repeats,
        check_dispatches=args.check_dispatches,
        processes=args.processes,
        process_id=args.process_id,
        replay=args.replay,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
