"""The one factory: the config's [model] [learner] [replay] [ewc] sections, made into a Learner's parts.

A `Learner` takes objects: a model factory, an optax transformation, a `Task`, a replay
policy, an `EWCConfig`. This module is the one place that reads configuration strings to
choose them: a preset or a model factory named by import path ("package.module:callable"
with [model.kwargs]), any optax optimizer by name with its keyword arguments, clipping
and a learning-rate schedule, and the task with the stream's labels.

What the config module cannot tell without JAX and the user's code (does the import path
resolve, does the callable return an `nnx.Module`, does it take those kwargs, does optax
have that optimizer and take those arguments) `check` finds by building everything once
abstractly (`jax.eval_shape`: no parameters are allocated), each failure a one-line
`ConfigError` naming the key: `continuity config check` and every command that builds a
learner call it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from continuity import replay as replay_lib
from continuity.config import ConfigError, labels_problem, replay_problem, sharded_replay_problem
from continuity.learner import (
    Classification,
    Learner,
    LearnerConfig,
    ModelConfig,
    ReplayConfig,
    Task,
    cnn,
    count_parameters,
    mlp,
    tree_bytes,
)
from continuity.learner.devices import process_devices
from continuity.learner.learner import ModelFactory
from continuity.learner.schema import key_text, suggest
from continuity.learner.tasks import MultiLabel, Regression
from continuity.memory import byte_size, host_memory
from continuity.stream.codecs import FeatureSpec

if TYPE_CHECKING:
    from continuity.config import Config

# learner.task -> its Task, from the stream's label keys (num_classes, num_labels).
TASKS: dict[str, Callable[[int | None, int | None], Task]] = {
    "classification": lambda num_classes, _num_labels: Classification(num_classes),  # type: ignore[arg-type]
    "regression": lambda _num_classes, _num_labels: Regression(),
    "multilabel": lambda _num_classes, num_labels: MultiLabel(num_labels),  # type: ignore[arg-type]
}

# [model] kind -> a model factory with the section's options bound (learner/models.py's presets).
MODELS: dict[str, Callable[[ModelConfig], ModelFactory]] = {
    "mlp": lambda config: functools.partial(mlp, hidden=config.hidden),
    "cnn": lambda config: functools.partial(cnn, channels=config.channels, dense=config.dense),
}


class FactoryError(ValueError):
    """A config key whose value only the code it names can reject; `check` makes it a ConfigError."""

    def __init__(self, key: tuple[str, ...], detail: str):
        super().__init__(f"{key_text(key)}: {detail}")
        self.key, self.detail = key, detail


def build_task(learner: LearnerConfig, num_classes: int | None, num_labels: int | None = None) -> Task:
    """The task `learner.task` names, for labels as `stream.num_classes` / `stream.num_labels` describe them.

    Raises ValueError naming the [stream] key when the two disagree, and `replay.kind`
    when the replay policy cannot hold the task's labels (class-balanced replay without
    classes): the checks `Config` runs on load, for learners built in code.
    """
    problem = labels_problem(learner.task, num_classes, num_labels) or replay_problem(learner)
    if problem is not None:
        key = (problem.key or "").removeprefix("learner.")
        raise ValueError(f"`{key}` {problem.detail}")
    return TASKS[learner.task](num_classes, num_labels)


def resolve(path: str) -> Callable:
    """The callable "package.module:attribute.path" names; FactoryError naming [model] factory."""
    module_name, _, attribute = path.partition(":")
    # The current directory is on the import path, as under `python -m`, so a model next to the
    # config (`examples.tokens.model:build`, run from the repository root) needs no install.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - ImportError, or the module failing as it loads: the user's to fix
        raise FactoryError(("model", "factory"), f"cannot import {module_name!r}: {_error_line(error)}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise FactoryError(
                ("model", "factory"), f"{module_name!r} has no attribute {part!r}{suggest(part, names)}. Got {path!r}."
            )
        target = getattr(target, part)
    if not callable(target):
        raise FactoryError(("model", "factory"), f"{path!r} is a {type(target).__name__}, not a callable")
    return target


def build_model(config: ModelConfig) -> ModelFactory:
    """The model factory [model] describes: a preset with its options, or `factory` with `kwargs` bound."""
    if config.factory is None:
        return MODELS[config.kind](config)
    return functools.partial(resolve(config.factory), **config.kwargs)


def _schedule(config: LearnerConfig) -> optax.Schedule | float:
    schedule, peak = config.schedule, config.learning_rate
    if schedule.kind == "cosine":
        return optax.cosine_decay_schedule(peak, schedule.decay_steps, alpha=schedule.alpha)
    if schedule.kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, schedule.warmup_steps, schedule.decay_steps, end_value=peak * schedule.alpha
        )
    if schedule.kind == "exponential":
        return optax.exponential_decay(peak, schedule.transition_steps, schedule.decay_rate)
    return peak  # "constant": a plain float keeps the compiled step as it was


def optimizer_names() -> list[str]:
    """optax's public lower-case callables: what a did-you-mean for `learner.optimizer` may suggest."""
    return sorted(n for n in dir(optax) if n.islower() and not n.startswith("_") and callable(getattr(optax, n)))


def build_optimizer(config: LearnerConfig) -> optax.GradientTransformation:
    """`optax.<optimizer>(learning_rate=<rate or schedule>, **optimizer_args)`, after optional global-norm clipping.

    Raises FactoryError naming `learner.optimizer` (optax has no such transformation) or
    `learner.optimizer_args` (it does not take those arguments).
    """
    name = config.optimizer
    make = getattr(optax, name, None) if name.islower() and not name.startswith("_") else None
    if not callable(make):
        raise FactoryError(
            ("learner", "optimizer"),
            f"optax has no optimizer {name!r}{suggest(name, optimizer_names())} (e.g. adam, adamw, sgd, rmsprop, lion)",
        )
    arguments = {"learning_rate": _schedule(config), **config.optimizer_args}
    try:
        inspect.signature(make).bind(**arguments)
    except TypeError as error:
        raise FactoryError(("learner", "optimizer_args"), f"optax.{name} rejects them: {error}") from None
    except ValueError:  # no signature to read: let the call decide
        pass
    try:
        transformation = make(**arguments)
    except Exception as error:  # noqa: BLE001 - optax's own check of a value: the user's to fix
        raise FactoryError(("learner", "optimizer_args"), f"optax.{name} rejects them: {_error_line(error)}") from None
    if not isinstance(transformation, optax.GradientTransformation):
        raise FactoryError(
            ("learner", "optimizer"),
            f"optax.{name}(...) is a {type(transformation).__name__}, not an optimizer (a GradientTransformation)",
        )
    try:  # traced only: arguments of the wrong type fail here, naming the setting, not in the first step
        tiny = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
        jax.eval_shape(lambda p: transformation.update(p, transformation.init(p), p), tiny)
    except Exception as error:  # noqa: BLE001 - whatever optax raised on the user's arguments
        raise FactoryError(
            ("learner", "optimizer_args"), f"optax.{name} fails with them: {_error_line(error)}"
        ) from None
    if config.clip_global_norm is not None:
        transformation = optax.chain(optax.clip_by_global_norm(config.clip_global_norm), transformation)
    return transformation


def build_replay(config: ReplayConfig) -> replay_lib.ReplayPolicy | None:
    """The replay policy [replay] describes, or None when its capacity is 0."""
    return replay_lib.make(config.kind, config.capacity) if config.enabled else None


def build_learner(
    config: LearnerConfig,
    *,
    inputs,
    task: Task,
    model: ModelFactory | None = None,
    devices: int | Sequence[jax.Device] = 1,
    replay: str = "replicated",
) -> Learner:
    """A Learner for examples like `inputs` (a jax.ShapeDtypeStruct, or a dict of them) and `task`;
    `model` replaces the factory [model] describes; `devices` local devices train it data-parallel,
    their replay buffer `replay` = "replicated" on each, or "sharded" over them ([scale] replay_layout)."""
    count = devices if isinstance(devices, int) else len(devices)
    policy = build_replay(config.replay)
    if policy is not None and replay == "sharded" and count > 1:
        # capacity and replay.batch_size divide by the devices: config.py checks it (sharded_replay_problem)
        policy = replay_lib.sharded(replay_lib.make(config.replay.kind, config.replay.capacity // count), count)
    return Learner(
        model or build_model(config.model),
        build_optimizer(config),
        task,
        inputs=inputs,
        batch_size=config.batch_size,
        replay=policy,
        replay_batch_size=config.replay.batch_size,
        asymmetric=config.replay.asymmetric,
        ewc=config.ewc if config.ewc.enabled else None,
        steps_per_dispatch=config.steps_per_dispatch,
        devices=devices,
    )


def learner_for(config: LearnerConfig, example_shape: tuple[int, ...], num_classes: int | None) -> Learner:
    """The learner for float32 examples of `example_shape` (what the codecs decode) and the
    task `config.task` names with `num_classes` (None for regression targets)."""
    inputs = jax.ShapeDtypeStruct(tuple(example_shape), jnp.float32)
    return build_learner(config, inputs=inputs, task=build_task(config, num_classes))


def model_inputs(config: Config):
    """One example's features as the model sees them: the inputs [stream.fields] makes of named-field
    events, or [stream.inputs] as a dict, else one float32 array."""
    stream = config.stream
    events = stream.field_spec()
    if events is not None:
        return {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for name, (shape, dtype) in events.inputs().items()}
    if stream.inputs:
        return {
            name: jax.ShapeDtypeStruct(tuple(spec.shape), jnp.dtype(spec.dtype)) for name, spec in stream.inputs.items()
        }
    return jax.ShapeDtypeStruct(tuple(stream.feature_shape), jnp.float32)


def task_for(config: Config) -> Task:
    return build_task(config.learner, config.stream.num_classes, config.stream.num_labels)


def feature_spec(config: Config) -> FeatureSpec:
    """What the codecs accept for the config's stream: its named inputs, or one array, and its
    labels as the task has them (`Task.label_classes`: class ids in [0, n), or finite numbers;
    `Task.labels.shape`: a multi-hot vector for a multi-label task, JSON only).

    The binary format carries one label per example; a task whose labels have a shape with
    it is an error naming `learner.task`.
    """
    stream = config.stream
    task = task_for(config)
    if task.labels.shape != () and stream.codec != "json":
        raise ValueError(
            f"`learner.task` {config.learner.task!r} has labels of shape {task.labels.shape}; the {stream.codec!r} "
            'wire format carries one label per example (use stream.codec = "json").'
        )
    return FeatureSpec(
        shape=stream.feature_shape,
        dtype=stream.dtype,
        num_classes=task.label_classes,
        inputs=stream.input_fields(),
        label_shape=tuple(task.labels.shape),
    )


def check_model(config: Config) -> Any:
    """Build the model once, abstractly: FactoryError naming [model] factory or [model] kwargs.
    Returns its parameters' shapes and dtypes (a tree of `jax.ShapeDtypeStruct`), what the
    memory check sizes the learner's state by."""
    model = config.learner.model
    factory, _ = service_model(config)
    inputs, outputs = model_inputs(config), task_for(config).outputs
    if model.factory is not None:
        try:
            inspect.signature(resolve(model.factory)).bind(rngs=None, inputs=inputs, outputs=outputs, **model.kwargs)
        except TypeError as error:
            raise FactoryError(
                ("model", "kwargs") if model.kwargs else ("model", "factory"),
                f"{model.factory} cannot be called as factory(rngs=, inputs=, outputs=, **kwargs): {error}",
            ) from None
        except ValueError:  # no signature to read: let the call decide
            pass
    key = ("model", "factory") if model.factory is not None else ("model", "kind")
    name = model.factory or model.kind
    try:
        return jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(_module(factory, inputs, outputs), nnx.Param)))
    except _NotAModule as error:
        raise FactoryError(key, f"{name} must return an nnx.Module. Got {error.kind}.") from None
    except Exception as error:  # noqa: BLE001 - the user's model failing to build: name it, one line
        raise FactoryError(key, f"building {name} failed: {_error_line(error)}") from None


class _NotAModule(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def _module(factory: ModelFactory, inputs, outputs: int) -> nnx.Module:
    module = factory(rngs=nnx.Rngs(0), inputs=inputs, outputs=outputs)
    if not isinstance(module, nnx.Module):
        raise _NotAModule(type(module).__name__)
    return module


def check(config: Config) -> None:
    """What the config module cannot check without JAX and the user's code: the model builds
    (`jax.eval_shape`), optax has the optimizer and takes its arguments, the wire format can
    carry the task's labels, the replay buffer fits in memory. Raises a one-line ConfigError
    naming the key."""
    prefix = _config_prefix(config)
    try:
        build_optimizer(config.learner)
        params = check_model(config)
    except FactoryError as error:
        raise ConfigError(f"{prefix}: {error}") from None
    try:
        feature_spec(config)
    except ValueError as error:
        raise ConfigError(f"{prefix}: [learner] task: {_error_line(error)}") from None
    check_memory(config, device_count(config), params)


def _config_prefix(config: Config) -> str:
    """How a ConfigError line starts: "config PATH" for a file, "config" for defaults and --set alone."""
    return f"config {config.source_path}" if config.source_path else "config"


def device_count(config: Config) -> int:
    """How many local devices [scale] devices names ("all": every one JAX sees); a ConfigError
    when there are not that many, or when learner.batch_size does not divide by them."""
    prefix = _config_prefix(config)
    available = jax.local_devices()
    wanted = config.scale.devices
    count = len(available) if wanted == "all" else wanted
    if count > len(available):
        raise ConfigError(
            f"{prefix}: [scale] devices: must be at most the {len(available)} local {available[0].platform} "
            f"device(s) JAX sees. Got {count}."
        )
    if config.learner.batch_size % count:
        raise ConfigError(
            f"{prefix}: [learner] batch_size: must divide by the {count} device(s) [scale] devices = "
            f"{wanted!r} trains over. Got {config.learner.batch_size}."
        )
    problem = sharded_replay_problem(config.learner, config.scale.replay_layout, count * config.scale.num_processes)
    if problem is not None:
        raise ConfigError(f"{prefix}: [replay] {(problem.key or '').rsplit('.', 1)[-1]}: {problem.detail}")
    return count


def check_memory(config: Config, count: int, params: Any) -> None:
    """A ConfigError when the learner's state surely cannot fit in the memory of the devices
    that hold it (`count` local ones: on the CPU all in this machine's memory, a copy each; on
    an accelerator, one device's in its memory): naming the model when its own state does not
    fit (`params`: the parameters' shapes, from `check_model`), else replay.capacity when the
    replay buffer does not fit beside it (sharded, each device holds its share).

    Checked before anything is allocated: JAX would otherwise fail at the first state with a
    RESOURCE_EXHAUSTED traceback, or, for a model too large to initialise, leave the first read
    of the state waiting forever (JAX 0.10). Only what surely cannot fit is refused (against all
    the memory there is, not what is free now, and without the step's own buffers); the
    training loop reports a failed allocation in one line too."""
    device = jax.local_devices()[0]
    copies = count if device.platform == "cpu" else 1
    if device.platform == "cpu":
        have = host_memory()
        where = "this machine's memory" + (f" (a copy on each of {count} devices)" if count > 1 else "")
    else:
        have = device_memory(device)
        where = f"one {device.platform} device's memory ({device.device_kind})"
    if have is None:
        return
    model = model_state_bytes(config, params) * copies
    prefix = _config_prefix(config)
    if model > have:
        raise ConfigError(f"{prefix}: {_model_too_large(config, params, model, have, where)}")
    task = task_for(config)
    # Two dispatches' stacks at once at least: the one training and the next, put on the device
    # while it trains. The loop holds more (the host's copies), so this refuses only the surely too large.
    stacks = 2 * stack_bytes(config, task)
    if model + stacks > have:
        raise ConfigError(f"{prefix}: {_stacks_too_large(config, stacks, model, have, where)}")
    policy = build_replay(config.learner.replay)
    if policy is None:
        return
    total = replay_lib.buffer_bytes(policy, model_inputs(config), task.labels, task.replay_buckets)
    shards = count * config.scale.num_processes if config.scale.replay_layout == "sharded" else 1
    need = total // shards * copies
    if model + stacks + need <= have:
        return
    capacity = policy.capacity
    raise ConfigError(
        f"{prefix}: [replay] capacity: a replay buffer of {capacity:,} examples needs {byte_size(need)} "
        f"({byte_size(need // capacity)} an example), more than the {byte_size(have)} of {where} holds beside "
        f"the model's state and a dispatch's batches ({byte_size(model + stacks)}): at most "
        f"~{(have - model - stacks) * capacity // need:,} examples fit. Got {capacity}."
    )


def stack_bytes(config: Config, task: Task) -> int:
    """The bytes of one dispatch's stack: `learner.steps_per_dispatch` micro-batches of this
    process's share of `learner.batch_size` rows, each row its features, label and mask."""
    row = tree_bytes((model_inputs(config), task.labels)) + 1
    rows = config.learner.batch_size // config.scale.num_processes
    return config.learner.steps_per_dispatch * rows * row


def _stacks_too_large(config: Config, stacks: int, model: int, have: int, where: str) -> str:
    """The line for a dispatch's batches that cannot fit: the key that sized them (steps per
    dispatch, unless one micro-batch alone is too large: then the batch size) and how many would."""
    learner = config.learner
    one = stacks // learner.steps_per_dispatch  # a micro-batch, twice
    if learner.steps_per_dispatch > 1 and model + one <= have:
        key, value, fit = "steps_per_dispatch", learner.steps_per_dispatch, (have - model) // one
    else:
        key, value, fit = "batch_size", learner.batch_size, max(0, (have - model) * learner.batch_size // stacks)
    batches = f"{learner.steps_per_dispatch:,} micro-batches" if learner.steps_per_dispatch > 1 else "one micro-batch"
    return (
        f"[learner] {key}: a dispatch's {batches} of {learner.batch_size:,} "
        f"examples, two dispatches at once, take {byte_size(stacks)}, more than the "
        f"{byte_size(have)} of {where} holds beside the model's state ({byte_size(model)}): "
        f"at most ~{fit:,} fit. Got {value}."
    )


def model_state_bytes(config: Config, params: Any) -> int:
    """The bytes of the learner's state that grow with the model (`params`: its parameters'
    shapes): the parameters, the optimizer's state for them (Adam: two moments) and EWC's anchor
    and Fisher (held whether or not EWC is on). Each of the learner's devices holds all of it."""
    optimizer_state = jax.eval_shape(build_optimizer(config.learner).init, params)
    return 3 * tree_bytes(params) + tree_bytes(optimizer_state)


def _model_too_large(config: Config, params: Any, need: int, have: int, where: str) -> str:
    """The line for a model whose state cannot fit: the key that sized it, its parameter count,
    and its largest parameter (an embedding table of [stream.fields] buckets, a wide layer)."""
    path, largest = max(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda item: tree_bytes(item[1]))
    shape = f"{np.dtype(largest.dtype).name}{list(largest.shape)}"
    model = config.learner.model
    events = config.stream.field_spec()
    names = [getattr(entry, "key", None) for entry in path]
    value: object
    if model.factory is None and events is not None and names[0] == "embeddings":
        # The preset's table for one named field: sized by that field's buckets (or vocabulary).
        field = next(f for f in events.fields if f.name == names[1])
        option = "buckets" if getattr(field, "buckets", None) else "vocabulary"
        key, value = f"[stream.fields.{field.name}] {option}", getattr(field, option)
    elif model.factory is not None:
        key, value = ("[model] kwargs", model.kwargs) if model.kwargs else ("[model] factory", model.factory)
    elif model.kind == "mlp":
        key, value = "[model] hidden", list(model.hidden)
    else:
        key, value = "[model] kind", model.kind
    return (
        f"{key}: the model's {count_parameters(params):,} parameters "
        f"(the largest {jax.tree_util.keystr(path)}: {shape}) "
        f"with their optimizer state and EWC's anchor and Fisher need {byte_size(need)}, more than the "
        f"{byte_size(have)} of {where}. Got {value}."
    )


def device_memory(device: jax.Device) -> int | None:
    """The bytes an accelerator lets JAX allocate (its memory_stats' bytes_limit); None where it does not say."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def learner_from_config(config: Config) -> Learner:
    """The service's learner: the config's learner sections for its stream's examples and labels
    (checked first: a bad model or optimizer is a ConfigError, exit status 2)."""
    check(config)
    factory, _ = service_model(config)
    count = device_count(config)
    # Joined ([scale] num_processes): one mesh over every process's devices.
    devices: int | list[jax.Device] = process_devices(count) if jax.process_count() > 1 else count
    return build_learner(
        config.learner,
        inputs=model_inputs(config),
        task=task_for(config),
        model=factory,
        devices=devices,
        replay=config.scale.replay_layout,
    )


def _error_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def model_description(config: ModelConfig) -> dict:
    """How to build the model again outside the service: the factory's import path and its
    keyword arguments (a preset's are its options). What a published model's spec names."""
    if config.factory:
        return {"factory": config.factory, "kwargs": dict(config.kwargs)}
    if config.kind == "mlp":
        return {"factory": "continuity.learner:mlp", "kwargs": {"hidden": list(config.hidden)}}
    return {
        "factory": "continuity.learner:cnn",
        "kwargs": {"channels": list(config.channels), "dense": config.dense},
    }


def service_model(config: Config) -> tuple[ModelFactory, dict]:
    """The service's model factory, and how to build it again (`model_description`): [model] as
    written, except that the `mlp` preset over named-field events ([stream.fields]) embeds their
    integer ids in tables of the spec's sizes. A factory of your own gets those ids as int32
    inputs and sizes its own tables (the config's check rejects the `cnn` preset there)."""
    model = config.learner.model
    events = config.stream.field_spec()
    if events is None or model.factory is not None:
        return build_model(model), model_description(model)
    sizes = events.vocabulary_sizes()
    factory = functools.partial(mlp, hidden=model.hidden, vocabulary_sizes=sizes)
    return factory, {
        "factory": "continuity.learner:mlp",
        "kwargs": {"hidden": list(model.hidden), "vocabulary_sizes": sizes},
    }
