"""The learner: one jitted continual-learning step over one PyTree state.

`train_step(state, batch) -> (state, metrics)` does, in a single dispatch: sample a
replay batch, compute the masked loss (cross-entropy for classification, squared error
for regression) on fresh + replayed examples plus the EWC penalty, apply the Optax
update, and insert the fresh examples into the replay buffer. Shapes are fixed (padding
rows are masked), so nothing recompiles after the first call; the state is donated, so
its buffers are reused in place.

A non-finite loss or gradient costs only the rows behind it: the step finds the fresh
rows whose loss or input is non-finite, masks them out and computes the update again
without them (a `lax.while_loop` of at most two passes: a finite step runs one); they
are counted in `nonfinite_rows` and never enter the replay buffer. Only a step that is still
non-finite (the cause lies in replayed rows, the EWC penalty or the parameters) is
skipped whole and counted in `skipped_updates`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from continuity import replay
from continuity.learner import ewc
from continuity.learner.config import LearnerConfig
from continuity.learner.models import build_model
from continuity.learner.state import Batch, LearnerState

# Rows per evaluation dispatch: whole probes in large chunks (~20% faster than 512 on the
# CPU), the rest, and the few new rows the guard's cached models see, in small ones. Two
# compiled shapes; the last chunk is padded, never recompiled.
EVAL_BATCH, EVAL_BATCH_SMALL = 2048, 512
FISHER_CHUNK = 32


class Evaluation(NamedTuple):
    """Per-example results, host NumPy: paired tests compare two models row by row.

    Regression has no right or wrong answer: there `correct` is None, `loss` is the
    squared error (f(x) - y)^2 and `predicted` the model's output f(x), float32.
    """

    correct: np.ndarray | None  # shape=(N,), bool; None for regression
    loss: np.ndarray  # shape=(N,), float32: cross-entropy, or squared error for regression
    predicted: np.ndarray  # shape=(N,), int32 class; float32 output for regression

    @property
    def accuracy(self) -> float:
        if self.correct is None:
            raise ValueError("accuracy is undefined for regression; use `mean_loss`.")
        return float(self.correct.mean()) if self.correct.size else float("nan")

    @property
    def mean_loss(self) -> float:
        return float(self.loss.mean()) if self.loss.size else float("nan")


class _Gradients(NamedTuple):
    """One pass of the train step over a set of fresh rows, before the optimizer applies it."""

    loss: jax.Array  # shape=(), the total: fresh + replay + EWC penalty
    fresh_loss: jax.Array  # shape=()
    replay_loss: jax.Array  # shape=()
    penalty: jax.Array  # shape=()
    score: jax.Array  # shape=(), correct fresh rows (classification) or their squared error (regression)
    fresh_losses: jax.Array  # shape=(B,), per fresh row: finds the rows that make a step non-finite
    grads: dict  # like params
    grad_norm: jax.Array  # shape=(), the global norm of grads
    rows: jax.Array  # shape=(B,), bool: the fresh rows this pass trained on


def _zero_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x with every row not in `rows` set to 0 (whatever it held: NaN, Inf, garbage)."""
    return jnp.where(rows.reshape(-1, *([1] * (x.ndim - 1))), x, jnp.zeros((), x.dtype))


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def _make_optimizer(config: LearnerConfig) -> optax.GradientTransformation:
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate)
    return optax.sgd(config.learning_rate)


class Learner:
    """Binds a `LearnerConfig` to a model definition, an optimizer and a replay policy.

    `num_classes`: the number of classes for `config.task` "classification" (>= 2); None
    for "regression" (one output; labels are float32 targets, see `label_dtype`).

    It owns the compiled functions; the state it creates and updates is a plain PyTree.
    Call `train_step` from one thread at a time: it donates (consumes) the state passed in.
    """

    def __init__(self, config: LearnerConfig, example_shape: tuple[int, ...], num_classes: int | None = None):
        if config.regression and num_classes is not None:
            raise ValueError(
                f"`num_classes` must be None for learner.task 'regression' (targets are numbers, "
                f"not classes). Got {num_classes!r}."
            )
        if not config.regression and (not isinstance(num_classes, (int, np.integer)) or num_classes < 2):
            raise ValueError(
                f"`num_classes` must be an integer >= 2 for learner.task 'classification'. Got {num_classes!r}."
            )
        self.config = config
        self.regression = config.regression
        self.example_shape = tuple(example_shape)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.label_dtype = np.dtype(np.float32 if self.regression else np.int32)  # of Batch.y and evaluate's y
        # One output for regression; checked above: num_classes is None exactly then.
        self.outputs = 1 if self.num_classes is None else self.num_classes
        self._likelihood = "gaussian" if self.regression else "categorical"  # for the EWC Fisher
        graphdef, _ = nnx.split(build_model(config.model, self.example_shape, self.outputs, seed=0))
        self._graphdef = graphdef
        self.optimizer = _make_optimizer(config)
        self.replay = replay.make(config.replay.kind, config.replay.capacity) if config.replay.enabled else None
        self.train_step = jax.jit(self._train_step, donate_argnums=(0,))
        self._fresh = jax.jit(self._fresh_state)  # built once: a new jit per init() would recompile
        self._evaluate_chunk = jax.jit(self._evaluate_rows)
        self._consolidate = jax.jit(self._consolidate_state, donate_argnums=(0,))
        self._consolidate_from_replay = jax.jit(self._consolidate_from_replay_state, donate_argnums=(0,))

    # ---- state -------------------------------------------------------------------------

    def init(self, seed: int) -> LearnerState:
        """A fresh state: parameters from `seed`, empty replay, no consolidation yet."""
        model = build_model(self.config.model, self.example_shape, self.outputs, seed=seed)
        params = nnx.to_pure_dict(nnx.state(model))
        # Built under jit so every leaf is its own buffer: eager constructors may share one
        # array between leaves (a zero counter, say), and donation refuses a buffer twice.
        state = self._fresh(params, jax.random.PRNGKey(seed))
        # Committed to the device, as restored checkpoints are: jit keys its cache on that, so
        # a fresh and a restored state share one compiled step.
        return jax.device_put(state, jax.devices()[0])

    def _fresh_state(self, params, rng) -> LearnerState:
        return LearnerState(
            step=jnp.zeros((), jnp.int32),
            rng=rng,
            params=params,
            opt_state=self.optimizer.init(params),
            replay=self.replay.init(self.example_shape, self.num_classes) if self.replay else None,  # None: targets
            ewc=ewc.init(params, self.config.ewc.strength if self.config.ewc.enabled else 0.0),
            skipped_updates=jnp.zeros((), jnp.int32),
            nonfinite_rows=jnp.zeros((), jnp.int32),
        )

    def logits(self, params, x: jax.Array) -> jax.Array:
        return nnx.merge(self._graphdef, params)(x)

    # ---- the step ----------------------------------------------------------------------

    def _train_step(self, state: LearnerState, batch: Batch) -> tuple[LearnerState, dict]:
        """One update. Metrics (device scalars): loss, fresh_loss, replay_loss, ewc_penalty,
        grad_norm, examples (fresh rows trained), nonfinite_rows (fresh rows masked out for a
        non-finite loss or input), finite, and for classification `correct` (fresh rows
        predicted right, before the update) or for regression `squared_error` (the sum of
        (f(x) - y)^2 over the fresh rows, before the update)."""
        key = jax.random.fold_in(state.rng, state.step)
        sample_key, insert_key = jax.random.split(key)
        mask = jnp.asarray(batch.mask, bool)
        # Padding rows may hold anything; zero them so a NaN there cannot reach a gradient.
        x = _zero_rows(jnp.asarray(batch.x), mask)
        y = jnp.where(mask, batch.y.astype(self.label_dtype), 0)
        replayed = (
            self.replay.sample(state.replay, sample_key, self.config.replay.batch_size)
            if self.replay is not None
            else None
        )
        rows_finite = jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)

        def finite(step: _Gradients) -> jax.Array:
            # One reduction serves both: any NaN/Inf gradient makes the global norm non-finite
            # (so does a norm that overflows float32, an update worth skipping too).
            return jnp.isfinite(step.loss) & jnp.isfinite(step.grad_norm)

        def attempt(carry: tuple[jax.Array, _Gradients]) -> tuple[jax.Array, _Gradients]:
            tries, last = carry
            # A second attempt leaves out the rows whose loss or input was non-finite. Their inputs
            # are zeroed, not just masked: a NaN that enters the forward pass reaches the gradient
            # through jnp.where's untaken branch (0 * NaN = NaN in the backward pass).
            rows = jnp.where(tries == 0, mask, last.rows & jnp.isfinite(last.fresh_losses) & rows_finite)
            return tries + 1, self._gradients(state, _zero_rows(x, rows), jnp.where(rows, y, 0), rows, replayed)

        def again(carry: tuple[jax.Array, _Gradients]) -> jax.Array:
            tries, last = carry
            return (tries == 0) | ((tries == 1) & ~finite(last))

        # A loop of one or two attempts, not a cond with a second copy of the pass: the finite
        # path then pays for no untaken branch (measured on the CPU: BENCHMARKS.md, Reliability).
        blank = jax.tree.map(
            lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(self._gradients, state, x, y, mask, replayed)
        )
        _, step = jax.lax.while_loop(again, attempt, (jnp.zeros((), jnp.int32), blank))
        ok = finite(step)
        updates, opt_state = self.optimizer.update(step.grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A step still non-finite without its bad rows changes nothing but the counters.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        params = keep(params, state.params)
        opt_state = keep(opt_state, state.opt_state)
        masked = jnp.sum(mask & ~step.rows, dtype=jnp.int32)
        replay_state = (
            self.replay.add(state.replay, x, y, step.rows & ok, insert_key)  # masked rows are never inserted
            if self.replay is not None
            else None
        )
        metrics = {
            "loss": step.loss,
            "fresh_loss": step.fresh_loss,
            "replay_loss": step.replay_loss,
            "ewc_penalty": step.penalty,
            "grad_norm": step.grad_norm,
            "examples": jnp.sum(step.rows),
            "nonfinite_rows": masked,
            ("squared_error" if self.regression else "correct"): step.score,
            "finite": ok,
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            replay=replay_state,
            skipped_updates=state.skipped_updates + (~ok).astype(jnp.int32),
            nonfinite_rows=state.nonfinite_rows + masked,
        )
        return new_state, metrics

    def _gradients(self, state: LearnerState, x, y, rows, replayed) -> _Gradients:
        """Loss and gradients over the fresh `rows` of (x, y) (others zeroed), the replayed rows and EWC."""
        config = self.config
        fresh_rows = x.shape[0]
        if replayed is not None:
            replay_x, replay_y, replay_valid = replayed
            x_all = jnp.concatenate([x, replay_x.astype(x.dtype)])
            y_all = jnp.concatenate([y, replay_y])
        else:
            x_all, y_all = x, y

        if replayed is not None and config.replay.asymmetric and not self.regression:
            present = jnp.zeros(self.num_classes, bool).at[y].max(rows)  # classes in the fresh rows
        else:
            present = None

        def loss_fn(params):
            outputs = self.logits(params, x_all)
            fresh_outputs = outputs[:fresh_rows]
            if present is not None:
                fresh_outputs = jnp.where(present, fresh_outputs, jnp.finfo(fresh_outputs.dtype).min)
            fresh_losses = self._example_losses(fresh_outputs, y)
            fresh_loss = _masked_mean(fresh_losses, rows)
            replay_loss = (
                _masked_mean(self._example_losses(outputs[fresh_rows:], y_all[fresh_rows:]), replay_valid)
                if replayed is not None
                else jnp.zeros(())
            )
            penalty = ewc.penalty(params, state.ewc) if config.ewc.enabled else jnp.zeros(())
            if self.regression:
                score = jnp.sum(jnp.where(rows, fresh_losses, 0.0))  # squared error
            else:
                score = jnp.sum(jnp.where(rows, jnp.argmax(outputs[:fresh_rows], -1) == y, False))  # all classes
            return fresh_loss + replay_loss + penalty, (fresh_loss, replay_loss, penalty, score, fresh_losses)

        (loss, (fresh_loss, replay_loss, penalty, score, fresh_losses)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state.params)
        return _Gradients(
            loss, fresh_loss, replay_loss, penalty, score, fresh_losses, grads, optax.tree.norm(grads), rows
        )

    def _example_losses(self, outputs: jax.Array, y: jax.Array) -> jax.Array:
        """The task's loss per example: squared error of the one output, or softmax cross-entropy."""
        if self.regression:
            return jnp.square(outputs[:, 0] - y)
        return optax.softmax_cross_entropy_with_integer_labels(outputs, y)

    # ---- evaluation --------------------------------------------------------------------

    def _evaluate_rows(self, params, x, y):
        outputs = self.logits(params, x)
        loss = self._example_losses(outputs, y)
        if self.regression:
            return None, loss, outputs[:, 0]
        predicted = jnp.argmax(outputs, -1).astype(jnp.int32)
        return predicted == y, loss, predicted

    def evaluate(self, params, x: np.ndarray, y: np.ndarray) -> Evaluation:
        """Per-example correctness, loss and prediction of `params` on (x, y), in fixed-size chunks.

        For regression `correct` is None and the loss is the squared error (see `Evaluation`).
        """
        n = len(x)
        y = np.asarray(y, self.label_dtype)
        outputs = []
        start = 0
        while start < n:
            rows = EVAL_BATCH if n - start >= EVAL_BATCH else EVAL_BATCH_SMALL
            xc, yc = _pad_rows(x[start : start + rows], rows), _pad_rows(y[start : start + rows], rows)
            outputs.append(self._evaluate_chunk(params, xc, yc))
            start += rows
        if not outputs:
            return Evaluation(
                None if self.regression else np.zeros(0, bool), np.zeros(0, np.float32), np.zeros(0, self.label_dtype)
            )
        loss, predicted = (np.concatenate([np.asarray(o[i]) for o in outputs])[:n] for i in (1, 2))
        correct = None if self.regression else np.concatenate([np.asarray(o[0]) for o in outputs])[:n]
        return Evaluation(correct, loss, predicted)

    # ---- consolidation (online EWC) -----------------------------------------------------

    def fisher(self, params, x, y, mask):
        """The empirical Fisher diagonal at `params` over the rows of (x, y) where `mask` is set.

        An MLP (dense layers only) gets it in one backward pass (`ewc.fisher_diagonal_dense`);
        other models from per-example gradients. Same figures up to float rounding.
        """
        if self.config.model.kind == "mlp":
            return ewc.fisher_diagonal_dense(self._squared_grad_logits, params, x, y, mask, likelihood=self._likelihood)
        return ewc.fisher_diagonal(self.logits, params, x, y, mask, chunk=FISHER_CHUNK, likelihood=self._likelihood)

    def _squared_grad_logits(self, params, x: jax.Array) -> jax.Array:
        return nnx.merge(self._graphdef, params)(x, linear=ewc.squared_grad_linear)

    def _consolidate_state(self, state: LearnerState, x, y, mask) -> LearnerState:
        # A row the model cannot score finitely (an input, output or target that is NaN or Inf)
        # would make the Fisher, then the EWC penalty and every later step, non-finite: it is
        # left out, as the train step leaves it out. One more forward pass per consolidation.
        x = _zero_rows(jnp.asarray(x), mask)
        outputs = self.logits(state.params, x)
        usable = (
            mask
            & jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
            & jnp.isfinite(outputs).all(axis=-1)
            & jnp.isfinite(jnp.asarray(y))  # a regression target; always true of class ids
        )
        fisher = self.fisher(state.params, _zero_rows(x, usable), jnp.where(usable, y, 0), usable)
        return state.replace(ewc=ewc.consolidate(state.ewc, state.params, fisher, self.config.ewc.gamma))

    def _consolidate_from_replay_state(self, state: LearnerState) -> LearnerState:
        n = _round_up(self.config.ewc.fisher_samples, FISHER_CHUNK)
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x46495348)  # "FISH"
        if self.replay is None:  # consolidate() checks this before tracing here
            raise ValueError("consolidate needs examples (x, y) when replay is off.")
        x, y, valid = self.replay.sample(state.replay, key, n)
        return self._consolidate_state(state, x, y, valid)

    def consolidate(
        self, state: LearnerState, x: np.ndarray | None = None, y: np.ndarray | None = None
    ) -> LearnerState:
        """Anchor EWC at the current params and fold a fresh Fisher into the running one.

        The Fisher comes from (x, y) when given (up to `ewc.fisher_samples` rows), else from
        that many replay samples. Consumes `state`.
        """
        if x is None:
            if self.replay is None:
                raise ValueError("consolidate needs examples (x, y) when replay is off.")
            return self._consolidate_from_replay(state)
        n = _round_up(self.config.ewc.fisher_samples, FISHER_CHUNK)
        x, y = np.asarray(x)[:n], np.asarray(y, self.label_dtype)[:n]
        mask = np.arange(n) < len(x)
        return self._consolidate(state, _pad_rows(x, n), _pad_rows(y, n), mask)


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    a = np.asarray(a)
    if len(a) == rows:
        return a
    return np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])
