"""Typed, validated learner configuration: what model, optimizer, task, replay and EWC to use.

These are the config file's [model] [learner] [replay] [ewc] sections; the application's
factory (continuity/factory.py) turns them into the parts a `Learner` takes. Each field's
type, bounds, default and description are declared once, here (learner/schema.py): the
loader, `continuity config example` and the README's reference read them. A bad value
fails when the section is built, naming the key, what is allowed and what was received,
before any compilation. `EWCConfig` is also what the `Learner` takes for online EWC.

What needs JAX to check (an import path that resolves to a model factory, an optimizer
that optax has, keyword arguments they accept) is checked by the application's factory,
so this module imports no JAX.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from continuity.learner.schema import (
    Bool,
    ConfigProblem,
    Count,
    Float,
    Int,
    OptionalFloat,
    OptionalStr,
    PositiveInts,
    Str,
    section,
)

MODEL_KINDS = ("mlp", "cnn")
REPLAY_KINDS = ("reservoir", "class_balanced", "fifo")
TASKS = ("classification", "regression", "multilabel")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "exponential")

# "package.module:callable" (the callable may be an attribute path: "pkg.mod:Class.build").
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


@section("model")
class ModelConfig:
    """Which network maps an example to the task's outputs: a preset, or a factory of your own."""

    kind: Literal["mlp", "cnn"] = Field(
        default="mlp", description='a preset: "mlp" or "cnn" (cnn: [H, W, C] features); not used with factory'
    )
    hidden: PositiveInts = Field(default=(256, 256), description="mlp: hidden layer widths ([] for a linear model)")
    channels: PositiveInts = Field(
        default=(32, 64), min_length=1, description="cnn: 3x3 conv widths, each followed by 2x2 pooling"
    )
    dense: Int = Field(default=128, gt=0, description="cnn: width of the dense layer after the convolutions")
    factory: OptionalStr = Field(
        default=None,
        description="a model of your own: factory(rngs=, inputs=, outputs=, **kwargs) -> nnx.Module",
        examples=["my_models:build"],
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for model.factory", examples=[{"width": 64}]
    )

    def __post_init__(self):
        if self.factory is not None and not _IMPORT_PATH.fullmatch(self.factory):
            raise ConfigProblem(f'expected "package.module:callable", got {self.factory!r}', "factory")
        if self.kwargs and self.factory is None:
            raise ConfigProblem("keyword arguments are for a model factory: set model.factory too", "kwargs")


@section("learner.schedule")
class ScheduleConfig:
    """How the learning rate moves over train steps (optax schedules; learning_rate is the peak)."""

    kind: Literal["constant", "cosine", "warmup_cosine", "exponential"] = Field(
        default="constant", description='"constant", "cosine", "warmup_cosine" or "exponential"'
    )
    decay_steps: Int = Field(
        default=100_000, ge=1, description="cosine, warmup_cosine: steps to decay over (with warmup)"
    )
    warmup_steps: Int = Field(
        default=0, ge=0, description="warmup_cosine: steps rising linearly from 0 to learning_rate"
    )
    alpha: Float = Field(
        default=0.0, ge=0, le=1, description="cosine, warmup_cosine: final rate as a share of learning_rate"
    )
    transition_steps: Int = Field(default=1000, ge=1, description="exponential: steps per decay_rate factor")
    decay_rate: Float = Field(
        default=0.5, gt=0, le=1, description="exponential: rate <- rate * decay_rate each transition"
    )

    def __post_init__(self):
        if self.kind == "warmup_cosine" and self.decay_steps <= self.warmup_steps:
            raise ConfigProblem(
                f"must be > warmup_steps ({self.warmup_steps}) for warmup_cosine. Got {self.decay_steps}.",
                "decay_steps",
            )


@section("replay")
class ReplayConfig:
    """The rehearsal buffer: `capacity` 0 turns replay off (no sampling, no insertion)."""

    kind: Literal["reservoir", "class_balanced", "fifo"] = Field(
        default="reservoir", description='"reservoir", "class_balanced" (classification only) or "fifo"'
    )
    capacity: Count = Field(default=0, ge=0, description="examples kept; 0 = no replay")
    # Half a default fresh batch by default in the library (BENCHMARKS.md).
    batch_size: Count = Field(default=16, ge=1, description="replayed examples mixed into every step")
    # ER-ACE (Caccia et al. 2022): fresh rows' cross-entropy only over the classes present
    # in the fresh batch, so learning new classes does not push old classes' logits down;
    # replayed rows use all classes. Changes nothing when every batch holds every class.
    # Ignored by tasks without classes (Task.classes_present). With few classes and small
    # batches, a batch often holds one class, and its fresh rows then teach nothing (their
    # loss over one logit is 0): turn it off there (BENCHMARKS.md, "Prequential accuracy").
    asymmetric: Bool = Field(
        default=True,
        description="ER-ACE (Caccia et al. 2022): fresh rows' loss only over the classes they contain "
        "(false for few classes and small batches)",
    )

    @property
    def enabled(self) -> bool:
        return self.capacity > 0


@section("ewc")
class EWCConfig:
    """Online EWC (Schwarz et al. 2018): one penalty, a running Fisher, an adaptive strength.

    `strength` is lambda at start. On an accepted window lambda decays toward
    `strength_min` by `decay`; on a regression it is multiplied by `boost` up to
    `strength_max`. `gamma` discounts the old Fisher: F <- gamma F + F_new.
    """

    enabled: Bool = Field(default=False, description="")
    strength: Float = Field(default=100.0, ge=0, description="lambda at start")
    strength_min: Float = Field(default=10.0, ge=0, description="lambda decays toward this on accepted windows")
    strength_max: Float = Field(default=10_000.0, ge=0, description="and is boosted up to this on regressions")
    # A boost wears off within a few accepted windows, so plasticity comes back.
    decay: Float = Field(
        default=0.5, gt=0, le=1, description="lambda <- max(strength_min, lambda * decay) on each accepted window"
    )
    boost: Float = Field(
        default=4.0, ge=1, description="lambda <- min(strength_max, lambda * boost) on each regression"
    )
    gamma: Float = Field(default=0.9, ge=0, le=1, description="Fisher discount: F <- gamma F + F_new")
    fisher_samples: Count = Field(default=256, ge=1, description="examples per Fisher refresh (from replay, or given)")

    def __post_init__(self):
        if not 0 <= self.strength_min <= self.strength <= self.strength_max:
            raise ConfigProblem(
                "`ewc` strengths must satisfy 0 <= strength_min <= strength <= strength_max. Got "
                f"strength_min={self.strength_min}, strength={self.strength}, strength_max={self.strength_max}."
            )


@section("learner")
class LearnerConfig:
    """Everything that decides the compiled train step; equal configs give equal programs.

    `task` names a built-in `Task` (learner/tasks.py): "classification" (integer labels,
    softmax cross-entropy over the stream's `num_classes` logits), "regression" (float
    targets, one output, squared error) or "multilabel" (`num_labels` independent sigmoid
    outputs). The optimizer is any optax transformation by name, with its other keyword
    arguments in `optimizer_args`, optional clipping and a learning-rate schedule.
    """

    model: ModelConfig = Field(default_factory=ModelConfig, description="[model]")
    task: Literal["classification", "regression", "multilabel"] = Field(
        default="classification",
        description='"classification" (integer labels), "regression" (float targets, squared error) '
        'or "multilabel" (stream.num_labels sigmoid outputs)',
    )
    optimizer: Str = Field(
        default="adam", min_length=1, description="any optax optimizer by name: adam, adamw, sgd, rmsprop, lion, ..."
    )
    learning_rate: Float = Field(default=1e-3, gt=0, description="the optimizer's (peak) learning rate")
    clip_global_norm: OptionalFloat = Field(
        default=None, gt=0, description="clip each update's gradients to this global norm", examples=[1.0]
    )
    batch_size: Count = Field(
        default=32, ge=1, description="fresh examples per step (fixed shape: a short batch is padded and masked)"
    )
    steps_per_dispatch: Count = Field(
        default=8,
        ge=1,
        description="train updates per dispatch to the device (a quiet stream's shorter stack is padded: "
        "each dispatch computes all K)",
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="the optimizer's other keyword arguments (optax's names)",
        examples=[{"weight_decay": 0.0001, "b1": 0.9}],
    )
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="[learner.schedule]")
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="[replay]")
    ewc: EWCConfig = Field(default_factory=EWCConfig, description="[ewc]")

    def __post_init__(self):
        if "learning_rate" in self.optimizer_args:
            raise ConfigProblem("give the learning rate as learner.learning_rate", "optimizer_args")
