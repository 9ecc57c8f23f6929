"""The learner: one jitted continual-learning step over one PyTree state.

`train_step(state, batch) -> (state, metrics)` does, in a single dispatch: sample a
replay batch, compute the task's masked loss on fresh + replayed examples plus the EWC
penalty, apply the Optax update, insert the fresh examples into the replay buffer, and
add the step's figures to the running totals the host reads at progress time. Shapes are
fixed (padding rows are masked), so nothing recompiles after the first call; the state is
donated, so its buffers are reused in place.

`train_steps(state, stack)` does `steps_per_dispatch` such updates in one dispatch (a
`lax.scan` over a stack of micro-batches, `Learner.stack`): the Python, launch and copy
cost of a dispatch is then paid once per K updates. Each update is exactly one
`train_step`; a micro-batch without a row to train (a short stack's padding) changes nothing.

With `devices` > 1 the same step runs data-parallel over a mesh of local devices: each
batch's rows split over them, the state replicated (learner/devices.py), or, given a replay
policy split into one shard per device (`replay.sharded`), all but the replay buffer: each
device then joins its own fresh rows with its own replayed ones, so no row moves between devices.

A non-finite loss or gradient costs only the rows behind it: the step finds the fresh
rows whose loss or input is non-finite, masks them out and computes the update again
without them (a second pass, under a `lax.cond`: a finite step runs one); they
are counted in `nonfinite_rows` and never enter the replay buffer. Only a step that is still
non-finite (the cause lies in replayed rows, the EWC penalty or the parameters) is
skipped whole and counted in `skipped_updates`.

The parts are injected: any Flax NNX model (or a factory that builds one per seed), any
`optax.GradientTransformation`, a `Task` (learner/tasks.py) and an optional replay policy
(replay/). An example's features are one array or a dict of named arrays, of any dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from continuity.learner import ewc as ewc_lib
from continuity.learner.config import EWCConfig
from continuity.learner.devices import placement
from continuity.learner.fisher import model_fisher
from continuity.learner.state import Batch, LearnerState, StepTotals
from continuity.learner.tasks import Classification, Task
from continuity.learner.threefry import unroll_on_cpu
from continuity.replay import ReplayPolicy, ReplayState, reshard
from continuity.replay.state import rows_where

# Rows per evaluation dispatch: whole probes in large chunks (~20% faster than 512 on the
# CPU), the rest, and the few new rows the guard's cached models see, in small ones. Two
# compiled shapes; the last chunk is padded, never recompiled.
EVAL_BATCH, EVAL_BATCH_SMALL = 2048, 512
unroll_on_cpu()  # the same random bits in fewer kernels (learner/threefry.py)
FISHER_CHUNK = 32

log = logging.getLogger(__name__)

ModelFactory = Callable[..., nnx.Module]  # factory(rngs=, inputs=, outputs=) -> nnx.Module


class Evaluation(NamedTuple):
    """Per-example results, host NumPy: paired tests compare two models row by row.

    `outcome` is what the task's guard pairs (Task.outcome): right or wrong (bool), or a
    loss (float32, then the same figures as `loss`).
    """

    outcome: np.ndarray  # shape=(N,), bool (right/wrong) or float32 (a loss)
    loss: np.ndarray  # shape=(N,), float32: the task's per-example loss
    predicted: np.ndarray  # shape=(N, ...): Task.predict (a class, a number, a multi-hot vector)

    @property
    def correct(self) -> np.ndarray | None:
        """Right or wrong per example; None for a task whose outcome is a loss."""
        return self.outcome if self.outcome.dtype == np.bool_ else None

    @property
    def accuracy(self) -> float:
        correct = self.correct
        if correct is None:
            raise ValueError("accuracy is undefined for a task whose outcome is a loss; use `mean_loss`.")
        return float(correct.mean()) if correct.size else float("nan")

    @property
    def mean_loss(self) -> float:
        return float(self.loss.mean()) if self.loss.size else float("nan")


class _Gradients(NamedTuple):
    """One pass of the train step over a set of fresh rows, before the optimizer applies it."""

    loss: jax.Array  # shape=(), the total: fresh + replay + EWC penalty
    fresh_loss: jax.Array  # shape=()
    replay_loss: jax.Array  # shape=()
    penalty: jax.Array  # shape=()
    score: jax.Array  # shape=(), the task's outcomes summed over the fresh rows (right answers, or losses)
    outcomes: jax.Array  # shape=(B,), float32: each fresh row's outcome (1/0 right/wrong, or a loss); 0 off `rows`
    fresh_losses: jax.Array  # shape=(B,), per fresh row: finds the rows that make a step non-finite
    grads: dict  # like params
    grad_norm: jax.Array  # shape=(), the global norm of grads
    rows: jax.Array  # shape=(B,), bool: the fresh rows this pass trained on


def _zero_rows(x, rows: jax.Array):
    """Features `x` (an array or a dict of arrays) with every row not in `rows` set to 0,
    whatever it held: NaN, Inf, garbage. Each leaf keeps its dtype."""
    return jax.tree.map(lambda leaf: rows_where(rows, jnp.asarray(leaf), 0), x)


def _finite_rows(tree, rows: int) -> jax.Array:
    """shape=(rows,), bool: the rows whose floating-point entries, in every leaf, are finite."""
    finite = jnp.ones((rows,), bool)
    for leaf in jax.tree.leaves(tree):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            finite = finite & jnp.isfinite(leaf).reshape(rows, -1).all(axis=1)
    return finite


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def _feature_specs(inputs) -> Any:
    """`inputs` as a PyTree of jax.ShapeDtypeStruct, or ValueError saying what is accepted."""
    leaves, treedef = jax.tree.flatten(inputs, is_leaf=lambda v: hasattr(v, "shape") and hasattr(v, "dtype"))
    if not leaves or not all(hasattr(v, "shape") and hasattr(v, "dtype") for v in leaves):
        raise ValueError(
            "`inputs` must describe one example's features: a jax.ShapeDtypeStruct, or a dict of them "
            f"(e.g. {{'tokens': jax.ShapeDtypeStruct((16,), jnp.int32)}}). Got {inputs!r}."
        )
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for v in leaves])


class Learner:
    """Binds a model, an optimizer, a task and (optionally) replay and EWC into compiled functions.

    `model`: an `nnx.Module`, or a factory called as `model(rngs=nnx.Rngs(seed),
    inputs=inputs, outputs=task.outputs)` that returns one; with a factory `init(seed)`
    builds fresh parameters per seed, with a module every seed starts from its parameters.
    The learner trains the module's `nnx.Param` variables; any other variable (an RNG
    stream, a batch statistic) stays as built.
    `inputs`: one example's features, a `jax.ShapeDtypeStruct` or a dict of them; batches
    must match (integer features stay integers all the way into the model).
    `replay`: a policy from `continuity.replay`, or None; `replay_batch_size` rows of it
    join every step's loss; a policy of several shards (`replay.sharded`) needs one per device,
    and `replay_batch_size` must divide by them; `asymmetric` applies ER-ACE where the task has classes.
    `ewc`: an `EWCConfig` (online EWC, Schwarz et al. 2018), or None for no penalty.

    `steps_per_dispatch`: micro-batches per `train_steps` dispatch (K); `stack` pads a
    shorter run of micro-batches to K.
    `devices`: a count of local devices, or a list of devices, to train over data-parallel
    (learner/devices.py); `batch_size` must divide by their number. 1: one device, no mesh.
    Devices of several processes (`jax.devices()` after `jax.distributed.initialize`): each
    process stacks its `process_rows` = batch_size / processes rows of every micro-batch.

    It owns the compiled functions; the state it creates and updates is a plain PyTree.
    Call `train_step` and `train_steps` from one thread at a time: they donate (consume) the
    state passed in.
    """

    def __init__(
        self,
        model: nnx.Module | ModelFactory,
        optimizer: optax.GradientTransformation,
        task: Task,
        *,
        inputs,
        batch_size: int,
        replay: ReplayPolicy | None = None,
        replay_batch_size: int = 16,
        asymmetric: bool = True,
        ewc: EWCConfig | None = None,
        steps_per_dispatch: int = 1,
        devices: int | Sequence[jax.Device] = 1,
    ):
        if not isinstance(task, Task):
            raise ValueError(f"`task` must be a continuity.learner.Task (e.g. Classification(10)). Got {task!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an integer >= 1. Got {batch_size!r}.")
        if not isinstance(replay_batch_size, int) or replay_batch_size < 1:
            raise ValueError(f"`replay_batch_size` must be an integer >= 1. Got {replay_batch_size!r}.")
        if not isinstance(steps_per_dispatch, int) or steps_per_dispatch < 1:
            raise ValueError(f"`steps_per_dispatch` must be an integer >= 1. Got {steps_per_dispatch!r}.")
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise ValueError(f"`optimizer` must be an optax.GradientTransformation. Got {optimizer!r}.")
        self.placement = placement(devices, replay_shards=replay.shards if replay is not None else 1)
        if replay is not None and replay_batch_size % replay.shards:
            raise ValueError(
                f"`replay_batch_size` must divide by the replay buffer's {replay.shards} shards: each device "
                f"replays its share from its own. Got {replay_batch_size}."
            )
        if batch_size % self.placement.count:
            raise ValueError(
                f"`batch_size` must divide by the number of devices ({self.placement.count}): each gets "
                f"batch_size / devices rows. Got batch_size={batch_size}."
            )
        self.process_rows = batch_size // self.placement.processes  # the rows this process stacks
        # How the step joins fresh and replayed rows into one forward pass: in one block per device
        # (device d's fresh rows, then its share of the replayed ones) wherever the draw divides
        # by the devices, so the joined batch splits over the mesh as its parts already lie and no
        # row moves between devices (a sharded buffer's rows are on their device; a replicated
        # buffer's are on every one). Else, and on one device, fresh rows then replayed ones.
        count = self.placement.count
        self._row_groups = count if replay is not None and count > 1 and replay_batch_size % count == 0 else 1
        self.task = task
        self.inputs = _feature_specs(inputs)
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.replay = replay
        self.replay_batch_size = replay_batch_size
        self.asymmetric = asymmetric
        if replay is not None and asymmetric and isinstance(task, Classification):
            _warn_of_one_class_batches(task.num_classes, batch_size)
        self.ewc = ewc
        self.steps_per_dispatch = steps_per_dispatch
        self._factory = None if isinstance(model, nnx.Module) else model
        module = self._build(0) if self._factory is not None else model
        self._graphdef, params, *rest = nnx.split(module, nnx.Param, ...)
        self._rest = tuple(r for r in rest if len(r))  # variables that are not trained (none for the presets)
        self._module_params = None if self._factory is not None else nnx.to_pure_dict(params)
        self._model_name = type(module).__name__
        self._param_shapes = jax.eval_shape(lambda: nnx.to_pure_dict(params))
        if replay is not None:  # its checks, now rather than at the first init()
            jax.eval_shape(lambda: replay.init(self.inputs, task.labels, task.replay_buckets))
        place = self.placement
        self._update_or_keep = _update_or_keep_by_branch if place.platform == "cpu" else _update_or_keep_by_select
        self._total = _total_by_matvec if place.platform == "cpu" else jnp.sum
        self.train_step = place.jit_step(self._train_step, stacked=False)
        self.train_steps = place.jit_step(self._train_steps, stacked=True)
        self._fresh = place.jit_fresh(self._fresh_state)  # built once: a new jit per init() would recompile
        self._evaluate_chunk = jax.jit(self._evaluate_rows)
        self._consolidate = place.jit_update(self._consolidate_state)
        self._consolidate_from_replay = place.jit_update(self._consolidate_from_replay_state)
        self._take_totals = place.jit_update(lambda s: (s.totals, s.replace(totals=StepTotals.zeros())), outputs=2)

    def _build(self, seed: int) -> nnx.Module:
        factory = self._factory
        if factory is None:
            raise RuntimeError("the learner was given a module, not a factory")
        module = factory(rngs=nnx.Rngs(seed), inputs=self.inputs, outputs=self.task.outputs)
        if not isinstance(module, nnx.Module):
            raise ValueError(f"the model factory {factory!r} must return an nnx.Module. Got {type(module).__name__}.")
        return module

    @property
    def label_dtype(self) -> np.dtype:
        return self.task.label_dtype

    def describe(self) -> dict:
        """What decides this learner's program, as JSON-able data (the optimizer excepted: an
        optax transformation does not say what it is). A training loop digests it when it is
        not told the config the learner was built from. `steps_per_dispatch` and `devices`
        are left out: K updates per dispatch, or a batch split over devices, train the same
        model as one (up to the order of float sums). So is a replay buffer's split into
        shards (the policy and its total capacity stay): a checkpoint restores onto any
        layout, its examples re-dealt (`relayout`)."""

        def shapes(tree) -> list[str]:
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
            return [f"{jax.tree_util.keystr(path)}: {leaf.dtype}{list(leaf.shape)}" for path, leaf in leaves]

        replay = self.replay
        return {
            "model": [self._model_name, *shapes(self._param_shapes)],
            "inputs": shapes(self.inputs),
            "task": repr(self.task),
            "batch_size": self.batch_size,
            "replay": None if replay is None else [replay.add.__qualname__, replay.capacity, self.replay_batch_size],
            "asymmetric": self.asymmetric,
            "ewc": None if self.ewc is None else dataclasses.asdict(self.ewc),
        }

    # ---- state -------------------------------------------------------------------------

    def init(self, seed: int) -> LearnerState:
        """A fresh state: parameters from `seed`, empty replay, no consolidation yet."""
        if self._factory is not None:
            params = nnx.to_pure_dict(nnx.state(self._build(seed), nnx.Param))
        else:
            params = jax.tree.map(jnp.copy, self._module_params)
        # Built under jit so every leaf is its own buffer: eager constructors may share one
        # array between leaves (a zero counter, say), and donation refuses a buffer twice.
        state = self._fresh(params, jax.random.PRNGKey(seed))
        # Waited for here, once: a state the memory cannot hold raises its allocation error now,
        # where the caller can say so; a later read of one of its scalars would wait forever
        # instead (JAX 0.10, an output of a computation whose input failed to allocate).
        jax.block_until_ready(state)
        # Committed to the learner's device(s), as restored checkpoints are: jit keys its cache
        # on that, so a fresh and a restored state share one compiled step.
        return self.placement.put_state(state)

    def state_shapes(self) -> LearnerState:
        """A fresh state's shapes and dtypes (`jax.ShapeDtypeStruct` leaves), nothing allocated:
        what each part of it (the model's, the replay buffer's) takes in memory."""
        return jax.eval_shape(self._fresh_state, self._param_shapes, jax.ShapeDtypeStruct((2,), jnp.uint32))

    def relayout(self, state: LearnerState) -> LearnerState:
        """A host copy of a state saved with its replay buffer in another layout (over another
        number of devices, or the other of replicated and sharded), the held examples re-dealt
        to this learner's (`replay.reshard`): what a checkpoint store's `reshape` restores with."""
        if self.replay is None or state.replay is None:
            return state
        return state.replace(replay=reshard(cast(ReplayState, state.replay), self.replay.shards))

    def _fresh_state(self, params, rng) -> LearnerState:
        task = self.task
        return LearnerState(
            step=jnp.zeros((), jnp.int32),
            rng=rng,
            params=params,
            opt_state=self.optimizer.init(params),
            replay=self.replay.init(self.inputs, task.labels, task.replay_buckets) if self.replay else None,
            ewc=ewc_lib.init(params, self.ewc.strength if self.ewc is not None else 0.0),
            skipped_updates=jnp.zeros((), jnp.int32),
            nonfinite_rows=jnp.zeros((), jnp.int32),
            totals=StepTotals.zeros(),
        )

    def _module(self, params) -> nnx.Module:
        return cast(nnx.Module, nnx.merge(self._graphdef, params, *self._rest))

    def logits(self, params, x) -> jax.Array:
        """The model's outputs for a batch `x` (an array or a dict of arrays, leading batch axis)."""
        return self._module(params)(x)

    def take_totals(self, state: LearnerState) -> tuple[StepTotals, LearnerState]:
        """The step totals gathered since the last take (device arrays), and the state with them
        zeroed. Consumes `state`; one small dispatch, no copy of the rest."""
        return self._take_totals(state)

    # ---- the step ----------------------------------------------------------------------

    def stack(self, batches: list[Batch]) -> Batch:
        """Up to `steps_per_dispatch` micro-batches as one host stack for `train_steps`: arrays
        with a leading axis of exactly `steps_per_dispatch`, the missing micro-batches all
        padding (mask False), so a short stack has the shape of a full one and compiles nothing."""
        k = self.steps_per_dispatch
        if not 1 <= len(batches) <= k:
            raise ValueError(f"a stack holds 1 to steps_per_dispatch={k} micro-batches. Got {len(batches)}.")
        rows = [np.shape(b.mask) for b in batches]
        if any(r != (self.process_rows,) for r in rows):
            processes = self.placement.processes
            wanted = f"batch_size={self.batch_size}"
            if processes > 1:
                wanted = f"batch_size / processes = {self.batch_size} / {processes} = {self.process_rows}"
            raise ValueError(f"each micro-batch must hold {wanted} rows. Got masks of shapes {rows}.")

        def stacked(*leaves):
            parts = [np.asarray(leaf) for leaf in leaves]
            padding = np.zeros((k - len(parts), *parts[0].shape), parts[0].dtype)
            return np.concatenate([np.stack(parts), padding])

        x = jax.tree.map(stacked, *(b.x for b in batches))
        y = stacked(*(b.y for b in batches))
        return Batch(x, y, stacked(*(np.asarray(b.mask, bool) for b in batches)))

    def put_stack(self, stack: Batch) -> Batch:
        """A host stack (`stack`) put where `train_steps` reads it: on the device, or split by
        rows over the devices. Asynchronous: the copy overlaps the dispatch still running."""
        return self.placement.put_stack(stack)

    def _train_steps(self, state: LearnerState, batches: Batch) -> tuple[LearnerState, dict]:
        """`steps_per_dispatch` updates in one dispatch: `lax.scan` of the one-update step over
        the stack's leading axis. Each update is exactly `train_step`'s, so a micro-batch with
        no row to train (a short stack's padding) changes nothing. Metrics come back stacked,
        one entry per micro-batch (zeros, `finite` True, for the empty ones)."""
        return jax.lax.scan(self._train_step, state, batches)

    def _train_step(self, state: LearnerState, batch: Batch) -> tuple[LearnerState, dict]:
        """One update. Metrics (device scalars): loss, fresh_loss, replay_loss, ewc_penalty,
        grad_norm, examples (fresh rows trained), nonfinite_rows (fresh rows masked out for a
        non-finite loss or input), finite, and `outcomes`: the task's per-example outcomes
        summed over the fresh rows before the update (right answers, or losses). Per row
        (shape [B]): `row_outcomes`, each row's outcome before the update as float32 (1/0, or
        a loss; 0 where not trained), and `row_trained`, the rows the update trained on: the
        prequential (test-then-train) figures (continuity/prequential.py).

        A batch with no row to train changes nothing at all: no parameter, optimizer or replay
        change, no step (so no randomness) consumed, no totals; its metrics are zeros, `finite`
        True. It is still computed, then selected away (`jnp.where`), not branched around: the
        step is one straight line of kernels, as the change that made it ~2 x faster on an
        H200 left it (BENCHMARKS.md, issue 13). The optimizer's update alone is branched around on the
        CPU, where selecting it costs copies of its moments (`_update_or_keep_by_branch`)."""
        task = self.task
        key = jax.random.fold_in(state.rng, state.step)
        sample_key, insert_key = jax.random.split(key)
        mask = jnp.asarray(batch.mask, bool)
        has_rows = jnp.any(mask)
        batch_rows = mask.shape[0]
        # Padding rows may hold anything; zero them so a NaN there cannot reach a gradient.
        # Each feature keeps its dtype: integer ids are never cast to float.
        x = _zero_rows(jax.tree.map(lambda leaf, spec: jnp.asarray(leaf, spec.dtype), batch.x, self.inputs), mask)
        y = rows_where(mask, jnp.asarray(batch.y).astype(task.label_dtype), 0)
        replayed = (
            self.replay.sample(state.replay, sample_key, self.replay_batch_size) if self.replay is not None else None
        )

        def finite(step: _Gradients) -> jax.Array:
            # One reduction serves both: any NaN/Inf gradient makes the global norm non-finite
            # (so does a norm that overflows float32, an update worth skipping too).
            return jnp.isfinite(step.loss) & jnp.isfinite(step.grad_norm)

        def without_nonfinite_rows(first: _Gradients) -> _Gradients:
            # The second pass leaves out the rows whose loss or input was non-finite. Their inputs
            # are zeroed, not just masked: a NaN that enters the forward pass reaches the gradient
            # through jnp.where's untaken branch (0 * NaN = NaN in the backward pass).
            rows = first.rows & jnp.isfinite(first.fresh_losses) & _finite_rows(x, batch_rows)
            return self._gradients(state, _zero_rows(x, rows), rows_where(rows, y, 0), rows, replayed)

        # The first pass trains on every row; only a non-finite one pays for a second pass.
        first = self._gradients(state, x, y, mask, replayed)
        step = jax.lax.cond(finite(first), lambda first: first, without_nonfinite_rows, first)
        ok = finite(step)
        update = ok & has_rows
        # A step still non-finite without its bad rows, or one without rows, changes nothing but
        # the counters.
        params, opt_state = self._update_or_keep(update, self._apply, step.grads, state.params, state.opt_state)
        masked = jnp.sum(mask & ~step.rows, dtype=jnp.int32)
        replay_state = (
            # masked rows are never inserted; adding no row leaves the buffer as it was
            self.replay.add(state.replay, x, y, step.rows & ok, insert_key, task.replay_bucket(y))
            if self.replay is not None
            else None
        )
        trained = jnp.sum(step.rows, dtype=jnp.int32)
        shown = lambda value: jnp.where(has_rows, value, jnp.zeros_like(value))  # noqa: E731
        metrics = {
            "loss": shown(step.loss),
            "fresh_loss": shown(step.fresh_loss),
            "replay_loss": shown(step.replay_loss),
            "ewc_penalty": shown(step.penalty),
            "grad_norm": shown(step.grad_norm),
            "examples": trained,
            "nonfinite_rows": masked,
            "outcomes": step.score,
            # Prequential (test-then-train) figures per row: each trained row's outcome under the
            # params before this update, and which rows were trained (a skipped step trains none).
            "row_outcomes": jnp.where(step.rows & ok, step.outcomes, 0.0),
            "row_trained": step.rows & ok,
            "finite": ok | ~has_rows,
        }
        skipped = (~ok & has_rows).astype(jnp.int32)
        steps = has_rows.astype(jnp.int32)
        totals = state.totals
        replayed_rows = (
            jnp.sum(replayed[2] & has_rows, dtype=jnp.int32) if replayed is not None else jnp.zeros((), jnp.int32)
        )
        new_state = state.replace(
            step=state.step + steps,
            params=params,
            opt_state=opt_state,
            replay=replay_state,
            skipped_updates=state.skipped_updates + skipped,
            nonfinite_rows=state.nonfinite_rows + masked,
            totals=StepTotals(
                steps=totals.steps + steps,
                skipped=totals.skipped + skipped,
                loss=totals.loss + jnp.where(update, step.loss, 0.0),
                grad_norm=totals.grad_norm + jnp.where(update, step.grad_norm, 0.0),
                fresh_rows=totals.fresh_rows + trained,
                replayed_rows=totals.replayed_rows + replayed_rows,
            ),
        )
        return new_state, metrics

    def _apply(self, grads, params, opt_state):
        """The optimizer's update of `params` by `grads`: (new params, new optimizer state)."""
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def _gradients(self, state: LearnerState, x, y, rows, replayed) -> _Gradients:
        """Loss and gradients over the fresh `rows` of (x, y) (others zeroed), the replayed rows and EWC."""
        task = self.task
        groups = self._row_groups
        if replayed is not None:
            replay_x, replay_y, replay_valid = replayed
            x_all = jax.tree.map(lambda fresh, old: _join_rows(fresh, old.astype(fresh.dtype), groups), x, replay_x)
        else:
            x_all = x

        present = task.classes_present(y, rows) if replayed is not None and self.asymmetric else None

        def loss_fn(params):
            outputs = self.logits(params, x_all)
            scored, replay_outputs = _split_rows(outputs, rows.shape[0], groups)
            fresh_outputs = task.only_present(scored, present) if present is not None else scored
            fresh_losses = task.example_losses(fresh_outputs, y)
            fresh_loss = _masked_mean(fresh_losses, rows)
            replay_loss = (
                _masked_mean(task.example_losses(replay_outputs, replay_y), replay_valid)
                if replayed is not None
                else jnp.zeros(())
            )
            # Scored with the params before this step's update: the test of test-then-train.
            outcomes = jnp.where(rows, task.outcomes(scored, y, fresh_losses).astype(jnp.float32), 0.0)
            score = jnp.sum(outcomes)
            return fresh_loss + replay_loss, (fresh_loss, replay_loss, score, outcomes, fresh_losses)

        (data_loss, (fresh_loss, replay_loss, score, outcomes, fresh_losses)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state.params)
        if self.ewc is not None:
            # The penalty's gradient is analytic (ewc.penalty_and_pulled), added rather than
            # differentiated: the same figures, fewer kernels.
            penalty, grads = ewc_lib.penalty_and_pulled(state.params, state.ewc, grads, self._total)
        else:
            penalty = jnp.zeros(())
        return _Gradients(
            data_loss + penalty,
            fresh_loss,
            replay_loss,
            penalty,
            score,
            outcomes,
            fresh_losses,
            grads,
            jnp.sqrt(sum(self._total(jnp.square(g)) for g in jax.tree.leaves(grads))),
            rows,
        )

    # ---- evaluation --------------------------------------------------------------------

    def _evaluate_rows(self, params, x, y):
        task = self.task
        outputs = self.logits(params, x)
        loss = task.example_losses(outputs, y)
        return task.outcomes(outputs, y, loss), loss, task.predict(outputs)

    def evaluate(self, params, x, y: np.ndarray) -> Evaluation:
        """Per-example outcome, loss and prediction of `params` on (x, y), in fixed-size chunks.

        `x`: an array, or a dict of arrays, with one row per example.
        """
        n = len(y)
        y = np.asarray(y, self.label_dtype)
        x = jax.tree.map(lambda leaf, spec: np.asarray(leaf, spec.dtype), x, self.inputs)
        outputs = []
        start = 0
        while start < n:
            rows = EVAL_BATCH if n - start >= EVAL_BATCH else EVAL_BATCH_SMALL
            part = slice(start, start + rows)
            xc = jax.tree.map(functools.partial(_pad_rows, rows=rows), feature_rows(x, part))
            place = self.placement.put_rows
            outputs.append(self._evaluate_chunk(params, place(xc), place(_pad_rows(y[part], rows))))
            start += rows
        if not outputs:
            shapes = jax.eval_shape(self._evaluate_rows, params, *self._example_rows(1))
            return Evaluation(*(np.zeros((0, *s.shape[1:]), s.dtype) for s in shapes))
        outcome, loss, predicted = (np.concatenate([np.asarray(o[i]) for o in outputs])[:n] for i in range(3))
        return Evaluation(outcome, loss, predicted)

    def _example_rows(self, rows: int):
        """Zero features and labels for `rows` examples (for shapes)."""
        x = jax.tree.map(lambda spec: jnp.zeros((rows, *spec.shape), spec.dtype), self.inputs)
        return x, jnp.zeros((rows, *self.task.labels.shape), self.task.labels.dtype)

    # ---- consolidation (online EWC) -----------------------------------------------------

    def fisher(self, params, x, y, mask):
        """The empirical Fisher diagonal at `params` over the rows of (x, y) where `mask` is set.

        The model's dense layers get it in one backward pass, other layers from per-example
        gradients (learner/fisher.py). Same figures up to float rounding.
        """
        return model_fisher(self._module, self.task.nll, params, x, y, mask, chunk=FISHER_CHUNK)

    def _ewc_config(self) -> EWCConfig:
        if self.ewc is None:
            raise ValueError("consolidate needs EWC: this learner was built with ewc=None.")
        return self.ewc

    def _consolidate_state(self, state: LearnerState, x, y, mask) -> LearnerState:
        # A row the model cannot score finitely (an input, output or target that is NaN or Inf)
        # would make the Fisher, then the EWC penalty and every later step, non-finite: it is
        # left out, as the train step leaves it out. One more forward pass per consolidation.
        rows = mask.shape[0]
        x = _zero_rows(x, mask)
        y = jnp.asarray(y)
        outputs = self.logits(state.params, x)
        usable = mask & _finite_rows(x, rows) & _finite_rows(outputs, rows) & _finite_rows(y, rows)
        fisher = self.fisher(state.params, _zero_rows(x, usable), rows_where(usable, y, 0), usable)
        return state.replace(ewc=ewc_lib.consolidate(state.ewc, state.params, fisher, self._ewc_config().gamma))

    def _consolidate_from_replay_state(self, state: LearnerState) -> LearnerState:
        n = _round_up(self._ewc_config().fisher_samples, FISHER_CHUNK)
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x46495348)  # "FISH"
        if self.replay is None:  # consolidate() checks this before tracing here
            raise ValueError("consolidate needs examples (x, y) when replay is off.")
        x, y, valid = self.replay.sample(state.replay, key, n)
        return self._consolidate_state(state, x, y, valid)

    def consolidate(self, state: LearnerState, x=None, y: np.ndarray | None = None) -> LearnerState:
        """Anchor EWC at the current params and fold a fresh Fisher into the running one.

        The Fisher comes from (x, y) when given (up to `ewc.fisher_samples` rows), else from
        that many replay samples. Consumes `state`.
        """
        config = self._ewc_config()
        if x is None or y is None:
            if self.replay is None:
                raise ValueError("consolidate needs examples (x, y) when replay is off.")
            return self._consolidate_from_replay(state)
        n = _round_up(config.fisher_samples, FISHER_CHUNK)
        y = np.asarray(y, self.label_dtype)[:n]
        x = jax.tree.map(lambda leaf, spec: _pad_rows(np.asarray(leaf, spec.dtype)[:n], n), x, self.inputs)
        mask = np.arange(n) < len(y)
        return self._consolidate(state, x, _pad_rows(y, n), mask)


Apply = Callable[[Any, Any, Any], tuple[Any, Any]]  # (grads, params, opt_state) -> (params, opt_state)


def _update_or_keep_by_branch(update: jax.Array, apply: Apply, grads, params, opt_state) -> tuple[Any, Any]:
    """`apply(grads, params, opt_state)` where `update` is set, else (params, opt_state) as they
    are: on the CPU, under a `lax.cond`. Computing both and selecting, as on a GPU, makes XLA's
    CPU backend recompute the optimizer's new moments in two kernels (one per selected tree),
    both reading the old moments while one overwrites them in place: it copies every moment,
    every update (`bench step`'s continual step 66-68k -> 70-76k samples/s, BENCHMARKS.md)."""
    return jax.lax.cond(update, apply, lambda _, params, opt_state: (params, opt_state), grads, params, opt_state)


def _update_or_keep_by_select(update: jax.Array, apply: Apply, grads, params, opt_state) -> tuple[Any, Any]:
    """`_update_or_keep_by_branch`'s result, computed and selected (`jnp.where`): on a GPU. There
    XLA's command buffers take a `lax.cond`'s branch on the device, and the branched update
    measured no faster than this select on an H200 (0.58 against 0.59-0.64 x the plain step,
    BENCHMARKS.md, issue 13)."""
    new_params, new_opt_state = apply(grads, params, opt_state)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(update, n, o), new, old)  # noqa: E731
    return keep(new_params, params), keep(new_opt_state, opt_state)


def _total_by_matvec(x: jax.Array) -> jax.Array:
    """The sum of `x`'s elements, its rows first summed by a matrix-vector product with ones: on
    the CPU, where XLA's reduction of a 256 x 256 leaf to one number took 2-3 x the time of that
    product (30 vs 10-15 us with two threads; a single thread ran both at ~10 us), twice an
    update (the EWC penalty, the gradient's norm: BENCHMARKS.md, issue 13). The sum is the same
    up to the order of its additions, which only the reported penalty and norm see."""
    if x.ndim < 2 or x.size == 0:
        return jnp.sum(x)
    rows = x.reshape(-1, x.shape[-1])
    return jnp.sum(rows @ jnp.ones(rows.shape[-1], rows.dtype))


def _warn_of_one_class_batches(classes: int, batch_size: int) -> None:
    """ER-ACE scores a batch's fresh rows over the classes present in it, so a batch of one class
    teaches its fresh rows nothing (their loss over one logit is 0). Warn where that is common:
    few classes, small batches (BENCHMARKS.md, "Prequential accuracy")."""
    share = float(classes) ** (1 - batch_size)  # balanced classes; more batches of one when unbalanced
    if share >= 0.01:
        log.warning(
            "ER-ACE (replay.asymmetric) with %d classes and batches of %d: about 1 batch in %d holds one class "
            "(more if the classes are unbalanced), and its fresh rows then teach nothing; "
            "set replay.asymmetric = false (asymmetric=False in the library) to train on them",
            classes,
            batch_size,
            round(1 / share),
        )


def _join_rows(fresh: jax.Array, replayed: jax.Array, groups: int) -> jax.Array:
    """The fresh rows then the replayed ones, as one batch for one forward pass. With `groups`
    > 1 (one per device of a mesh), each device's fresh rows are followed by its share of the
    replayed rows (group g: fresh block g, replayed block g), so the joined batch splits over the
    devices as its parts do and no row moves between them."""
    if groups == 1:
        return jnp.concatenate([fresh, replayed])

    def blocks(a):
        return a.reshape((groups, a.shape[0] // groups, *a.shape[1:]))

    joined = jnp.concatenate([blocks(fresh), blocks(replayed)], axis=1)
    return joined.reshape((fresh.shape[0] + replayed.shape[0], *fresh.shape[1:]))


def _split_rows(joined: jax.Array, fresh: int, groups: int) -> tuple[jax.Array, jax.Array]:
    """`_join_rows` undone: (the fresh rows, the replayed rows) of `joined` (`fresh` of them fresh)."""
    if groups == 1:
        return joined[:fresh], joined[fresh:]
    blocks = joined.reshape((groups, joined.shape[0] // groups, *joined.shape[1:]))
    per = fresh // groups
    merge = lambda a: a.reshape((-1, *a.shape[2:]))  # noqa: E731
    return merge(blocks[:, :per]), merge(blocks[:, per:])


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


def feature_rows(x, index):
    """The rows `index` selects of features `x` (an array, or a dict of arrays): one helper for
    the learner, the loop and the probe store."""
    if not isinstance(x, dict):  # one array: no walk of a tree (the loop takes rows every batch)
        return x[index]
    return jax.tree.map(lambda a: a[index], x)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    a = np.asarray(a)
    if len(a) == rows:
        return a
    return np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])
