"""The EWC Fisher diagonal of any model: one backward pass for its dense layers, per-example
gradients for the rest.

`ewc.squared_grad_linear` gives the empirical Fisher of a dense layer in one backward
pass, but only where that is exact: an `nnx.Linear` applied once per example to a 2-D
[examples, features] input. A Linear applied to [examples, T, features] (a token model),
or applied twice, a convolution, an embedding or a norm layer share their parameters
across positions, so the square of a summed gradient is not the sum of squares: their
Fisher needs per-example gradients (`ewc.fisher_diagonal`, vmap in chunks).

Which layers qualify is found from the model itself: the forward pass is traced once
with every Linear instance recording how it is called. The model's own code and its call
signature know nothing of EWC. The twins are made per instance, on a module merged inside
the traced function (its class swapped for a subclass), never by patching `nnx.Linear`,
so other threads tracing the same model at the same time are unaffected.

Assumptions: a dense layer's kernel and bias act only through its own call, and row i of
its input depends on example i alone (no mixing across the batch, as batch statistics do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from continuity.learner import ewc

Path = tuple  # a module's path in the model tree, as nnx.iter_graph gives it


class _SquaredGradLinear(nnx.Linear):
    """An nnx.Linear whose backward pass returns summed squared per-example gradients (ewc.squared_grad_linear)."""

    def __call__(self, inputs, out_sharding=None):
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else jnp.zeros(kernel.shape[-1], kernel.dtype)
        return ewc.squared_grad_linear(inputs, kernel, bias)


def _linears(module: nnx.Module) -> list[tuple[Path, nnx.Linear]]:
    """Every plain nnx.Linear in the module tree (subclasses may compute otherwise: left alone)."""
    return [(path, node) for path, node in nnx.iter_graph(module) if type(node) is nnx.Linear]


def exact_dense_layers(merge: Callable[[], nnx.Module], x) -> set[Path]:
    """Paths of the Linear layers of the model `merge()` builds that are applied exactly once, to
    a 2-D input with one row per example of `x` (whose leaves lead with the example axis).

    Traced abstractly (jax.eval_shape): nothing is computed, and it may run inside a jit.
    """
    rows = jax.tree.leaves(x)[0].shape[0]
    calls: dict[int, list[tuple]] = {}  # id of a layer -> the shapes it was applied to
    paths: dict[int, Path] = {}

    class Recording(nnx.Linear):  # a class per call: what it records is this call's alone
        def __call__(self, inputs, out_sharding=None):
            calls.setdefault(id(self), []).append(inputs.shape)
            return nnx.Linear.__call__(self, inputs, out_sharding)

    def forward(x):
        module = merge()
        for path, layer in _linears(module):
            layer.__class__ = Recording
            paths[id(layer)] = path
        return module(x)

    def once_per_example(shapes: list[tuple]) -> bool:
        return len(shapes) == 1 and len(shapes[0]) == 2 and shapes[0][0] == rows

    jax.eval_shape(forward, x)
    return {path for key, path in paths.items() if once_per_example(calls.get(key, []))}


def dense_leaves(params: dict, layers: set[Path]) -> dict:
    """A tree like `params` of bools: True for the kernel and bias of each layer in `layers`."""

    def mark(tree, path):
        if isinstance(tree, dict):
            return {key: mark(value, (*path, key)) for key, value in tree.items()}
        return path[:-1] in layers and path[-1] in ("kernel", "bias")

    return mark(params, ())


def model_fisher(
    merge: Callable[[Any], nnx.Module],
    nll: ewc.ExampleNLL,
    params: dict,
    x,
    y: jax.Array,
    mask: jax.Array,
    *,
    chunk: int,
) -> dict:
    """The empirical Fisher diagonal of the model `merge(params)` builds, at `params`, over the
    rows of (x, y) where `mask` is set: the exactly-dense layers' parameters in one backward
    pass, every other parameter from per-example gradients (`chunk` rows at a time; `x` must
    then hold a multiple of `chunk` rows), merged into one tree like `params`."""
    layers = exact_dense_layers(lambda: merge(params), x)
    dense = dense_leaves(params, layers)
    marks = jax.tree.leaves(dense)

    def logits(p, features):
        return merge(p)(features)

    if not any(marks):
        return ewc.fisher_diagonal(logits, nll, params, x, y, mask, chunk=chunk)

    def squared_grad_logits(p, features):
        module = merge(p)
        for path, layer in _linears(module):
            if path in layers:
                layer.__class__ = _SquaredGradLinear
        return module(features)

    one_pass = ewc.fisher_diagonal_dense(squared_grad_logits, nll, params, x, y, mask)
    if all(marks):
        return one_pass
    others = jax.tree.map(lambda is_dense: not is_dense, dense)
    per_example = ewc.fisher_diagonal(logits, nll, params, x, y, mask, chunk=chunk, wrt=others)
    return ewc.merge_disjoint(ewc.select(one_pass, dense), per_example)
