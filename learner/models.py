"""The built-in model presets, `mlp` and `cnn`: model factories like any user's.

A model factory is called with keyword arguments `rngs` (an `nnx.Rngs`), `inputs` (one
example's features: a `jax.ShapeDtypeStruct`, or a dict of them) and `outputs` (the
task's output width), plus its own options, and returns an `nnx.Module` mapping a batch
of examples to outputs of shape (batch, outputs). The learner calls it once per seed, so
`init(seed)` gets fresh parameters.

The presets take one feature array: an MLP over the flattened example, a small CNN over
(height, width, channels) images. The MLP also takes named (dict) features when it is told
the size of every integer input's id space (`vocabulary_sizes`, what a feature spec of
named-field events says): float arrays are flattened, integer ids embedded (a list of ids
is averaged over its non-padding ids, 0 being padding), and all of it concatenated.
Other named features need a model of one's own.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class MLP(nnx.Module):
    """ReLU MLP over the flattened example."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], outputs: int, *, rngs: nnx.Rngs):
        widths = (in_features, *hidden)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.head = nnx.Linear(widths[-1], outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.head(x)


class NamedMLP(nnx.Module):
    """The MLP over named features: embeddings of integer ids beside the flattened floats."""

    def __init__(
        self,
        inputs: dict,
        vocabulary_sizes: dict[str, int],
        hidden: tuple[int, ...],
        outputs: int,
        *,
        embedding_dim: int,
        rngs: nnx.Rngs,
    ):
        self.ids = sorted(name for name, spec in inputs.items() if jnp.issubdtype(spec.dtype, jnp.integer))
        self.floats = sorted(name for name in inputs if name not in self.ids)
        missing = [name for name in self.ids if name not in vocabulary_sizes]
        if missing:
            raise ValueError(f"`model.kind` 'mlp' needs the id count of integer inputs {missing} to embed them.")
        self.embeddings = nnx.Dict(
            {name: nnx.Embed(vocabulary_sizes[name], embedding_dim, rngs=rngs) for name in self.ids}
        )
        width = sum(math.prod(inputs[name].shape) for name in self.floats) + embedding_dim * len(self.ids)
        self.mlp = MLP(width, hidden, outputs, rngs=rngs)

    def __call__(self, x: dict) -> jax.Array:
        parts = [x[name].reshape(x[name].shape[0], -1).astype(jnp.float32) for name in self.floats]
        for name in self.ids:
            ids = x[name]
            vectors = self.embeddings[name](ids)
            if ids.ndim > 1:  # a list of ids: the mean over its real (non-zero) ids
                real = (ids != 0)[..., None]
                vectors = (vectors * real).sum(axis=1) / jnp.maximum(real.sum(axis=1), 1)
            parts.append(vectors)
        return self.mlp(jnp.concatenate(parts, axis=-1))


class CNN(nnx.Module):
    """3x3 convolutions with 2x2 average pooling, then one dense layer; for (H, W, C) examples."""

    def __init__(
        self, example_shape: tuple[int, ...], channels: tuple[int, ...], dense: int, outputs: int, *, rngs: nnx.Rngs
    ):
        if len(example_shape) != 3:
            raise ValueError(
                f"`model.kind` 'cnn' needs image-shaped examples (height, width, channels). Got shape {example_shape}."
            )
        height, width, in_channels = example_shape
        widths = (in_channels, *channels)
        self.convs = nnx.List([nnx.Conv(a, b, kernel_size=(3, 3), rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        for _ in channels:  # pooling stops at 1x1 so small inputs still work
            height, width = max(1, height // 2), max(1, width // 2)
        self.dense = nnx.Linear(height * width * channels[-1], dense, rngs=rngs)
        self.head = nnx.Linear(dense, outputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
            window = (min(2, x.shape[1]), min(2, x.shape[2]))
            x = nnx.avg_pool(x, window_shape=window, strides=window)
        x = x.reshape(x.shape[0], -1)
        return self.head(jax.nn.relu(self.dense(x)))


def mlp(
    *,
    rngs: nnx.Rngs,
    inputs: jax.ShapeDtypeStruct | dict,
    outputs: int,
    hidden: tuple[int, ...] = (256, 256),
    vocabulary_sizes: dict[str, int] | None = None,
    embedding_dim: int = 16,
) -> MLP | NamedMLP:
    """The `mlp` preset: ReLU layers of widths `hidden` over the flattened example (or, with
    `vocabulary_sizes`, over named features with their integer ids embedded)."""
    if isinstance(inputs, dict) and vocabulary_sizes is not None:
        return NamedMLP(
            inputs, vocabulary_sizes, tuple(hidden), _outputs(outputs), embedding_dim=embedding_dim, rngs=rngs
        )
    return MLP(math.prod(_one_array("mlp", inputs).shape), tuple(hidden), _outputs(outputs), rngs=rngs)


def cnn(
    *,
    rngs: nnx.Rngs,
    inputs: jax.ShapeDtypeStruct,
    outputs: int,
    channels: tuple[int, ...] = (32, 64),
    dense: int = 128,
) -> CNN:
    """The `cnn` preset: 3x3 convolutions of widths `channels`, each pooled 2x2, then a dense layer."""
    shape = tuple(_one_array("cnn", inputs).shape)
    return CNN(shape, tuple(channels), dense, _outputs(outputs), rngs=rngs)


def _one_array(preset: str, inputs) -> jax.ShapeDtypeStruct:
    if not (hasattr(inputs, "shape") and hasattr(inputs, "dtype")):
        raise ValueError(
            f"`model.kind` {preset!r} takes one feature array per example; named features "
            f"({sorted(inputs) if isinstance(inputs, dict) else inputs!r}) need a model of your own."
        )
    return inputs


def _outputs(outputs) -> int:
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < 1:
        raise ValueError(f"`outputs` must be an integer >= 1. Got {outputs!r}.")
    return outputs


def count_parameters(params) -> int:
    """The parameters' count, of arrays or of their `jax.ShapeDtypeStruct`s."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))


def tree_bytes(tree) -> int:
    """The bytes a tree of arrays (or of their `jax.ShapeDtypeStruct`s, counted without
    allocating) takes: what a model's state costs in memory."""
    return sum(int(leaf.size) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))
