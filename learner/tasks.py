"""Learning tasks: what a label is, how an output is scored, and what the guard compares.

A `Task` owns everything that differs between kinds of supervision, so the learner, the
replay buffer, EWC and the guard never ask which task they serve:

- the label (dtype and per-example shape) and the model's output width;
- the per-example training loss, and the negative log-likelihood whose squared gradients
  make EWC's empirical Fisher (Kirkpatrick et al. 2017);
- the prediction, and the per-example *outcome* two models are paired on by the guard:
  right or wrong (an exact McNemar test) or a loss (a Wilcoxon signed-rank test), with the
  figure reports show (accuracy, or mean loss);
- how the replay buffer buckets labels (classes, or one bucket), and ER-ACE's "classes
  present" restriction where it applies (Caccia et al. 2022).

Built-ins: `Classification(num_classes)`, `Regression()`, `MultiLabel(num_labels)`. A task
is a frozen dataclass: equal tasks compile equal programs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Outcome(NamedTuple):
    """What a per-example outcome is, how the guard pairs two models' outcomes, and the figure shown.

    `kind` "correct": each example is right or wrong (bool); the guard pairs them with an
    exact McNemar test and an absolute tolerance on the accuracy drop. "loss": each example
    has a loss (float); the guard pairs them with a Wilcoxon signed-rank test and a relative
    tolerance on the mean loss (continuity/regression.py).
    """

    kind: str
    figure: str  # the mean outcome as reports name it
    higher_is_better: bool


CORRECT = Outcome("correct", "accuracy", True)
LOSS = Outcome("loss", "loss", False)


class Task(abc.ABC):
    """A kind of supervision. Subclasses set the attributes and implement the losses.

    `outputs` and the loss methods see the model's outputs, shape (..., outputs); labels
    have shape (..., *labels.shape). Everything here is pure and jit-able.
    """

    outputs: int  # the model's output width
    labels: jax.ShapeDtypeStruct  # one example's label
    # Integer labels take values in [0, label_classes); None: labels are finite numbers. What
    # a codec checks a decoded label against.
    label_classes: int | None
    outcome: Outcome
    replay_buckets: int  # counters a replay buffer keeps per label bucket (see `replay_bucket`)

    @property
    def label_dtype(self) -> np.dtype:
        return np.dtype(self.labels.dtype)

    @abc.abstractmethod
    def example_losses(self, outputs: jax.Array, y: jax.Array) -> jax.Array:
        """The training loss of each example, shape (...)."""

    @abc.abstractmethod
    def nll(self, outputs: jax.Array, y: jax.Array) -> jax.Array:
        """Each example's negative log-likelihood of its label (up to a constant): EWC's Fisher
        is the mean of its squared per-example gradients (the empirical Fisher)."""

    @abc.abstractmethod
    def predict(self, outputs: jax.Array) -> jax.Array:
        """The prediction of each example: a class, a number, a multi-hot vector."""

    @abc.abstractmethod
    def outcomes(self, outputs: jax.Array, y: jax.Array, losses: jax.Array) -> jax.Array:
        """Each example's outcome as `outcome.kind` says: bool right/wrong, or float32 loss."""

    def replay_bucket(self, y: jax.Array) -> jax.Array:
        """The replay counter each example counts in, int32 in [0, replay_buckets): one bucket here."""
        return jnp.zeros(y.shape[:1], jnp.int32)

    def classes_present(self, y: jax.Array, mask: jax.Array) -> jax.Array | None:
        """ER-ACE's output mask for fresh rows (the classes they contain), or None where it does not apply."""
        return None

    def only_present(self, outputs: jax.Array, present: jax.Array) -> jax.Array:
        """`outputs` with the outputs not `present` taken out of the loss (see `classes_present`)."""
        return outputs


@dataclass(frozen=True)
class Classification(Task):
    """One class in [0, num_classes) per example: softmax cross-entropy over `num_classes` logits."""

    num_classes: int
    outcome = CORRECT

    def __post_init__(self):
        if not isinstance(self.num_classes, (int, np.integer)) or isinstance(self.num_classes, bool):
            raise ValueError(f"`num_classes` must be an integer >= 2. Got {self.num_classes!r}.")
        if self.num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2. Got {self.num_classes!r}.")
        object.__setattr__(self, "num_classes", int(self.num_classes))

    @property
    def outputs(self) -> int:  # type: ignore[override]
        return self.num_classes

    @property
    def labels(self) -> jax.ShapeDtypeStruct:  # type: ignore[override]
        return jax.ShapeDtypeStruct((), jnp.int32)

    @property
    def label_classes(self) -> int:  # type: ignore[override]
        return self.num_classes

    @property
    def replay_buckets(self) -> int:  # type: ignore[override]
        return self.num_classes

    def example_losses(self, outputs, y):
        return optax.softmax_cross_entropy_with_integer_labels(outputs, y)

    def nll(self, outputs, y):
        return optax.softmax_cross_entropy_with_integer_labels(outputs, y)

    def predict(self, outputs):
        return jnp.argmax(outputs, -1).astype(jnp.int32)

    def outcomes(self, outputs, y, losses):
        return jnp.argmax(outputs, -1) == y  # over all classes, also where ER-ACE restricts the loss

    def replay_bucket(self, y):
        return y  # a bucket per class: what class-balanced replay shares its memory out by

    def classes_present(self, y, mask):
        return jnp.zeros(self.num_classes, bool).at[y].max(mask)

    def only_present(self, outputs, present):
        # ER-ACE (Caccia et al. 2022): a logit of a class absent from the fresh rows leaves their
        # softmax, so learning new classes does not push old classes' logits down.
        return jnp.where(present, outputs, jnp.finfo(outputs.dtype).min)


@dataclass(frozen=True)
class Regression(Task):
    """One float target per example: one output f(x), squared error (f(x) - y)^2.

    The Fisher's likelihood is Gaussian with unit variance: its negative log-likelihood is
    0.5 (f(x) - y)^2 up to a constant, so each example's gradient is (f(x) - y) grad f(x).
    There is no right or wrong: the guard pairs squared errors.
    """

    outputs = 1
    labels = jax.ShapeDtypeStruct((), jnp.float32)
    label_classes = None
    outcome = LOSS
    replay_buckets = 1

    def example_losses(self, outputs, y):
        return jnp.square(outputs[..., 0] - y)

    def nll(self, outputs, y):
        return 0.5 * jnp.square(outputs[..., 0] - y)

    def predict(self, outputs):
        return outputs[..., 0]

    def outcomes(self, outputs, y, losses):
        return losses


@dataclass(frozen=True)
class MultiLabel(Task):
    """Any number of `num_labels` labels per example (tags, clicks): independent sigmoid outputs.

    Labels are multi-hot int32 vectors of length `num_labels`. An example's loss is its
    binary cross-entropy summed over the labels, which is also its negative log-likelihood
    under independent Bernoulli outputs (the Fisher's likelihood). A label is predicted
    when its sigmoid exceeds 0.5 (its logit is positive).

    The guard pairs per-example losses, not right/wrong: an example counted right only when
    every label is (exact match) is wrong most of the time with many labels and cannot see
    a model that went from 9 of 10 tags right to 5; per-label accuracy is dominated by the
    many absent labels of sparse tags (predicting none scores well). The summed
    cross-entropy scores every label, weighs confident mistakes most, and is what is
    trained; its report figure is its mean, lower is better. ER-ACE does not apply:
    independent sigmoids do not compete as a softmax's classes do.
    """

    num_labels: int
    outcome = LOSS
    label_classes = 2  # each entry 0 or 1
    replay_buckets = 1

    def __post_init__(self):
        if not isinstance(self.num_labels, (int, np.integer)) or isinstance(self.num_labels, bool):
            raise ValueError(f"`num_labels` must be an integer >= 1. Got {self.num_labels!r}.")
        if self.num_labels < 1:
            raise ValueError(f"`num_labels` must be an integer >= 1. Got {self.num_labels!r}.")
        object.__setattr__(self, "num_labels", int(self.num_labels))

    @property
    def outputs(self) -> int:  # type: ignore[override]
        return self.num_labels

    @property
    def labels(self) -> jax.ShapeDtypeStruct:  # type: ignore[override]
        return jax.ShapeDtypeStruct((self.num_labels,), jnp.int32)

    def example_losses(self, outputs, y):
        return jnp.sum(optax.sigmoid_binary_cross_entropy(outputs, y.astype(outputs.dtype)), axis=-1)

    def nll(self, outputs, y):
        return self.example_losses(outputs, y)

    def predict(self, outputs):
        return (outputs > 0).astype(jnp.int32)

    def outcomes(self, outputs, y, losses):
        return losses
