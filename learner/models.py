"""Flax NNX networks chosen by config: an MLP over flattened features and a small CNN.

Models are built once and split (`nnx.split`) into a static graph definition and a plain
dict of parameters; the jitted step merges them back. The functional form dispatches
faster than `nnx.jit` and keeps the learner state a plain PyTree that Orbax saves whole.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from continuity.learner.config import ModelConfig


class MLP(nnx.Module):
    """ReLU MLP over the flattened example.

    `linear(x, kernel, bias)`, when given, replaces every layer's affine map: the EWC
    Fisher passes `ewc.squared_grad_linear` to get per-example squared gradients in one
    backward pass (an MLP is dense layers only, which that needs).
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], outputs: int, *, rngs: nnx.Rngs):
        widths = (in_features, *hidden)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.head = nnx.Linear(widths[-1], outputs, rngs=rngs)

    def __call__(self, x: jax.Array, linear=None) -> jax.Array:
        def affine(layer, x):
            return layer(x) if linear is None else linear(x, layer.kernel[...], layer.bias[...])

        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = jax.nn.relu(affine(layer, x))
        return affine(self.head, x)


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


def build_model(config: ModelConfig, example_shape: tuple[int, ...], outputs: int, seed: int) -> nnx.Module:
    """The model `config` names, for examples of `example_shape`, with `outputs` output units
    (one logit per class for classification, 1 for regression)."""
    if not isinstance(outputs, int) or outputs < 1:
        raise ValueError(f"`outputs` must be an integer >= 1. Got {outputs!r}.")
    rngs = nnx.Rngs(seed)
    if config.kind == "mlp":
        return MLP(math.prod(example_shape), config.hidden, outputs, rngs=rngs)
    return CNN(tuple(example_shape), config.channels, config.dense, outputs, rngs=rngs)


def count_parameters(params) -> int:
    return sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(params))
