"""The one factory: the config's [model] [learner] [replay] [ewc] sections, made into a Learner's parts.

A `Learner` takes objects: a model factory, an optax transformation, a `Task`, a replay
policy, an `EWCConfig`. This module is the one place that reads configuration strings to
choose them, each from a table: a new choice (a model named by import path, an
optimizer by name, another task) is a new entry or a new builder here, and nothing in
the learner changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax

from continuity import replay as replay_lib
from continuity.learner import Classification, Learner, LearnerConfig, ModelConfig, ReplayConfig, Task, cnn, mlp
from continuity.learner.learner import ModelFactory
from continuity.learner.tasks import Regression
from continuity.stream.codecs import FeatureSpec

if TYPE_CHECKING:
    from continuity.config import Config


class TaskChoice(NamedTuple):
    """A `learner.task` value: how to build its Task from the stream's labels."""

    build: Callable[[int | None], Task]  # from stream.num_classes
    classes: bool  # its labels are class ids, counted by stream.num_classes (required), else left out


TASKS: dict[str, TaskChoice] = {
    "classification": TaskChoice(lambda num_classes: Classification(num_classes), classes=True),  # type: ignore[arg-type]
    "regression": TaskChoice(lambda _num_classes: Regression(), classes=False),
}

# [model] kind -> a model factory with the section's options bound (learner/models.py's presets).
MODELS: dict[str, Callable[[ModelConfig], ModelFactory]] = {
    "mlp": lambda config: functools.partial(mlp, hidden=config.hidden),
    "cnn": lambda config: functools.partial(cnn, channels=config.channels, dense=config.dense),
}

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {"adam": optax.adam, "sgd": optax.sgd}


def build_task(learner: LearnerConfig, num_classes: int | None) -> Task:
    """The task `learner.task` names, for labels as `stream.num_classes` describes them.

    Raises ValueError naming `stream.num_classes` when the two disagree, and `replay.kind`
    when the replay policy cannot hold the task's labels (class-balanced replay without
    classes).
    """
    name = learner.task
    choice = TASKS[name]
    if choice.classes and num_classes is None:
        raise ValueError(f'`stream.num_classes` is required when learner.task is "{name}". Got None.')
    if not choice.classes and num_classes is not None:
        raise ValueError(
            f'`stream.num_classes` must be left out when learner.task is "{name}" (labels are float '
            f"targets, not classes). Got {num_classes!r}."
        )
    try:
        task = choice.build(num_classes)
    except ValueError:
        raise ValueError(
            f'`stream.num_classes` must be >= 2 when learner.task is "{name}". Got {num_classes!r}.'
        ) from None
    policy = build_replay(learner.replay)
    if policy is not None:
        try:
            jax.eval_shape(
                lambda: policy.init(jax.ShapeDtypeStruct((1,), jnp.float32), task.labels, task.replay_buckets)
            )
        except ValueError:
            raise ValueError(
                f"`replay.kind` {learner.replay.kind!r} shares memory out by class, and learner.task {name!r} has no "
                f"classes: use 'reservoir' or 'fifo'. Got {learner.replay.kind!r}."
            ) from None
    return task


def build_model(config: ModelConfig) -> ModelFactory:
    """The model factory [model] describes (a preset with its options)."""
    return MODELS[config.kind](config)


def build_optimizer(config: LearnerConfig) -> optax.GradientTransformation:
    return OPTIMIZERS[config.optimizer](config.learning_rate)


def build_replay(config: ReplayConfig) -> replay_lib.ReplayPolicy | None:
    """The replay policy [replay] describes, or None when its capacity is 0."""
    return replay_lib.make(config.kind, config.capacity) if config.enabled else None


def build_learner(config: LearnerConfig, *, inputs, task: Task, model: ModelFactory | None = None) -> Learner:
    """A Learner for examples like `inputs` (a jax.ShapeDtypeStruct, or a dict of them) and `task`;
    `model` replaces the factory [model] describes."""
    return Learner(
        model or build_model(config.model),
        build_optimizer(config),
        task,
        inputs=inputs,
        batch_size=config.batch_size,
        replay=build_replay(config.replay),
        replay_batch_size=config.replay.batch_size,
        asymmetric=config.replay.asymmetric,
        ewc=config.ewc if config.ewc.enabled else None,
    )


def learner_for(config: LearnerConfig, example_shape: tuple[int, ...], num_classes: int | None) -> Learner:
    """The learner for float32 examples of `example_shape` (what the codecs decode) and the
    task `config.task` names with `num_classes` (None for regression targets)."""
    inputs = jax.ShapeDtypeStruct(tuple(example_shape), jnp.float32)
    return build_learner(config, inputs=inputs, task=build_task(config, num_classes))


def feature_spec(config: Config) -> FeatureSpec:
    """What the codecs accept for the config's stream, its labels as the task has them
    (`Task.label_classes`: class ids in [0, n), or finite numbers).

    The binary and JSON wire formats carry one label per example; a task whose labels have
    a shape (multi-label) has no wire format yet, which is an error naming `learner.task`.
    """
    stream = config.stream
    task = build_task(config.learner, stream.num_classes)
    if task.labels.shape != ():
        raise ValueError(
            f"`learner.task` {config.learner.task!r} has labels of shape {task.labels.shape}; the {stream.codec!r} "
            "wire format carries one label per example."
        )
    return FeatureSpec(shape=stream.feature_shape, dtype=stream.dtype, num_classes=task.label_classes)


def learner_from_config(config: Config) -> Learner:
    """The service's learner: the config's learner sections for its stream's examples and labels."""
    fields = config.stream.field_spec()
    if fields is not None:
        return learner_for_fields(config.learner, fields, config.stream.num_classes)
    return learner_for(config.learner, config.stream.feature_shape, config.stream.num_classes)


def learner_for_fields(config: LearnerConfig, fields, num_classes: int | None) -> Learner:
    """The learner for named-field events: inputs as the feature spec (stream.fields.FieldSpec) describes
    them; the `mlp` preset embeds their integer ids in tables of the spec's sizes."""
    inputs = {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for name, (shape, dtype) in fields.inputs().items()}
    model = config.model
    if model.kind != "mlp":
        raise ValueError(f'`model.kind` must be "mlp" for named-field events (codec "fields"). Got {model.kind!r}.')
    factory = functools.partial(mlp, hidden=model.hidden, vocabulary_sizes=fields.vocabulary_sizes())
    return build_learner(config, inputs=inputs, task=build_task(config, num_classes), model=factory)
