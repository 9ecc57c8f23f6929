"""Typed, validated learner configuration: what model, optimizer, task, replay and EWC to use.

These are the config file's [model] [learner] [replay] [ewc] sections; the application's
factory (continuity/factory.py) turns them into the parts a `Learner` takes. Every option
is checked where it is built, and an error names the field, what is allowed and what was
received, so a bad config fails before any compilation. `EWCConfig` is also what the
`Learner` takes for online EWC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL_KINDS = ("mlp", "cnn")
OPTIMIZERS = ("adam", "sgd")
REPLAY_KINDS = ("reservoir", "class_balanced", "fifo")
TASKS = ("classification", "regression")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    choices = ", ".join(repr(a) for a in allowed)
    _require(value in allowed, f"`{name}` must be one of {choices}. Got {value!r}.")


def _positive_ints(name: str, values: tuple[int, ...]) -> None:
    _require(
        len(values) > 0 and all(isinstance(v, int) and v > 0 for v in values),
        f"`{name}` must be a non-empty list of positive integers. Got {list(values)!r}.",
    )


@dataclass(frozen=True)
class ModelConfig:
    """Which network maps an example to class logits (or, for regression, to one number)."""

    kind: str = "mlp"
    hidden: tuple[int, ...] = (256, 256)  # mlp: widths of the hidden layers
    channels: tuple[int, ...] = (32, 64)  # cnn: 3x3 conv widths, each followed by 2x2 pooling
    dense: int = 128  # cnn: width of the dense layer after the convolutions

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "channels", tuple(self.channels))
        _one_of("model.kind", self.kind, MODEL_KINDS)
        _positive_ints("model.hidden", self.hidden)
        _positive_ints("model.channels", self.channels)
        _require(self.dense > 0, f"`model.dense` must be a positive integer. Got {self.dense!r}.")


@dataclass(frozen=True)
class ReplayConfig:
    """The rehearsal buffer: `capacity` 0 turns replay off (no sampling, no insertion)."""

    kind: str = "reservoir"
    capacity: int = 0
    batch_size: int = 16  # replayed rows mixed into every step (half a default fresh batch: see BENCHMARKS.md)
    # ER-ACE (Caccia et al. 2022): fresh rows' cross-entropy only over the classes present
    # in the fresh batch, so learning new classes does not push old classes' logits down;
    # replayed rows use all classes. Changes nothing when every batch holds every class.
    # Ignored by tasks without classes (Task.classes_present).
    asymmetric: bool = True

    def __post_init__(self):
        _one_of("replay.kind", self.kind, REPLAY_KINDS)
        _require(self.capacity >= 0, f"`replay.capacity` must be >= 0. Got {self.capacity!r}.")
        _require(self.batch_size >= 1, f"`replay.batch_size` must be >= 1. Got {self.batch_size!r}.")

    @property
    def enabled(self) -> bool:
        return self.capacity > 0


@dataclass(frozen=True)
class EWCConfig:
    """Online EWC (Schwarz et al. 2018): one penalty, a running Fisher, an adaptive strength.

    `strength` is lambda at start. On an accepted window lambda decays toward
    `strength_min` by `decay`; on a regression it is multiplied by `boost` up to
    `strength_max`. `gamma` discounts the old Fisher: F <- gamma F + F_new.
    """

    enabled: bool = False
    strength: float = 100.0
    strength_min: float = 10.0
    strength_max: float = 10_000.0
    decay: float = 0.5  # a boost wears off within a few accepted windows, so plasticity comes back
    boost: float = 4.0
    gamma: float = 0.9
    fisher_samples: int = 256  # examples (from replay, or given) per Fisher refresh

    def __post_init__(self):
        _require(
            0 <= self.strength_min <= self.strength <= self.strength_max,
            "`ewc` strengths must satisfy 0 <= strength_min <= strength <= strength_max. "
            f"Got strength_min={self.strength_min}, strength={self.strength}, strength_max={self.strength_max}.",
        )
        _require(0 < self.decay <= 1, f"`ewc.decay` must be in (0, 1]. Got {self.decay!r}.")
        _require(self.boost >= 1, f"`ewc.boost` must be >= 1. Got {self.boost!r}.")
        _require(0 <= self.gamma <= 1, f"`ewc.gamma` must be in [0, 1]. Got {self.gamma!r}.")
        _require(self.fisher_samples >= 1, f"`ewc.fisher_samples` must be >= 1. Got {self.fisher_samples!r}.")


@dataclass(frozen=True)
class LearnerConfig:
    """Everything that decides the compiled train step; equal configs give equal programs.

    `task` names a built-in `Task` (learner/tasks.py): "classification" (integer labels,
    softmax cross-entropy over the stream's `num_classes` logits) or "regression" (float
    targets, one output, squared error).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    batch_size: int = 32
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)
    task: str = "classification"
    # Updates per dispatch (K): a `lax.scan` over K micro-batches of `batch_size` in one jitted
    # call. Each update is the same as with K = 1; only the per-dispatch cost is shared.
    steps_per_dispatch: int = 1

    def __post_init__(self):
        _one_of("learner.task", self.task, TASKS)
        _one_of("learner.optimizer", self.optimizer, OPTIMIZERS)
        _require(self.learning_rate > 0, f"`learner.learning_rate` must be > 0. Got {self.learning_rate!r}.")
        _require(self.batch_size >= 1, f"`learner.batch_size` must be >= 1. Got {self.batch_size!r}.")
        _require(
            isinstance(self.steps_per_dispatch, int) and self.steps_per_dispatch >= 1,
            f"`learner.steps_per_dispatch` must be an integer >= 1. Got {self.steps_per_dispatch!r}.",
        )
