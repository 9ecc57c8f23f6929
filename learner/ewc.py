"""Online elastic weight consolidation: the penalty, the Fisher diagonal and its strength.

EWC (Kirkpatrick et al. 2017) holds weights that mattered for earlier data near their
old values with a quadratic penalty weighted by the Fisher information diagonal:

    penalty(theta) = strength / 2 * sum_i F_i * (theta_i - anchor_i) ** 2

Online EWC (Schwarz et al. 2018) keeps a single anchor and one running Fisher instead
of one penalty per task, so memory stays constant on an endless stream:

    F <- gamma * F + F_new,    anchor <- theta    (at each consolidation)

The strength adapts: it decays toward a floor while checkpoints are accepted and is
boosted when the continuity probe catches a regression.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = dict  # a nested dict of arrays, as `nnx.to_pure_dict` returns


class EWCState(NamedTuple):
    anchor: Params  # params at the last consolidation; same tree as params
    fisher: Params  # running Fisher diagonal, float32; zeros until the first consolidation
    strength: jax.Array  # shape=(), dtype=float32: lambda


def init(params: Params, strength: float) -> EWCState:
    """No consolidation yet: a zero Fisher makes the penalty exactly zero."""
    return EWCState(
        anchor=jax.tree.map(jnp.copy, params),
        fisher=jax.tree.map(jnp.zeros_like, params),
        strength=jnp.asarray(strength, jnp.float32),
    )


Total = Callable[[jax.Array], jax.Array]  # an array -> the sum of its elements, a scalar


def penalty(params: Params, ewc: EWCState) -> jax.Array:
    """strength / 2 * sum F (theta - anchor)^2 over every parameter (Kirkpatrick 2017, eq. 3)."""
    return penalty_and_pulled(params, ewc, jax.tree.map(jnp.zeros_like, params))[0]


def penalty_and_pulled(
    params: Params, ewc: EWCState, grads: Params, total: Total = jnp.sum
) -> tuple[jax.Array, Params]:
    """The penalty, and `grads` plus its gradient: g + strength * F * (theta - anchor) per leaf.

    The train step adds the penalty's gradient to the loss's instead of differentiating the
    penalty: the same figures (autodiff's (F * strength / 2) * (2 * (theta - anchor)) rounds
    alike, the halving and doubling being exact) in fewer kernels. Each leaf's pull is written
    twice, once into the gradient's sum and once into the penalty's, and kept apart (an
    optimization barrier, so XLA does not merge the two back into one array with two readers):
    each becomes one element-wise pass over the leaf, where a shared pull made XLA's CPU
    backend run four (the difference, the pull, the sum, the add; BENCHMARKS.md, issue 13).
    `total` sums a leaf's elements (the learner's choice for its device).
    """

    def pull(p, a, f):
        return ewc.strength * f * (p - a)

    pulled = jax.tree.map(lambda g, p, a, f: g + pull(p, a, f), grads, params, ewc.anchor, ewc.fisher)
    params, anchor, fisher = jax.lax.optimization_barrier((params, ewc.anchor, ewc.fisher))
    terms = jax.tree.map(lambda p, a, f: total(pull(p, a, f) * (p - a)), params, anchor, fisher)
    return 0.5 * jnp.sum(jnp.stack(jax.tree.leaves(terms))), pulled


ExampleNLL = Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, labels) -> per-example NLL (Task.nll)


def fisher_diagonal(
    logits_fn: Callable[[Params, Any], jax.Array],
    nll: ExampleNLL,
    params: Params,
    x,
    y: jax.Array,
    mask: jax.Array,
    *,
    chunk: int = 32,
    wrt: Params | None = None,
) -> Params:
    """Empirical Fisher diagonal: the mean over valid examples of squared per-example gradients.

    The gradients are of `nll`, each example's negative log-likelihood of its observed label
    (Kirkpatrick 2017; Schwarz 2018 keep the same empirical Fisher online): the task says
    which likelihood (Task.nll: categorical cross-entropy, a unit Gaussian's 0.5 (f(x) - y)^2,
    independent Bernoullis' summed binary cross-entropy). `x` is an array or a PyTree of
    arrays with a leading example axis.

    Per-example gradients come from `vmap(grad)`. They are taken
    `chunk` examples at a time under `lax.scan`, so memory is chunk x params rather than
    examples x params (a 1M-parameter model and 1000 examples would otherwise need 4 GB).
    `x` must hold a multiple of `chunk` rows (pad and mask the rest).

    `wrt`: a tree like `params` of bools; when given, only the leaves marked True are
    differentiated, and the others come back as None (see `merge_disjoint`).
    """
    n = jax.tree.leaves(x)[0].shape[0]
    if n % chunk:
        raise ValueError(f"fisher_diagonal needs a multiple of {chunk} examples (pad and mask). Got {n}.")
    if wrt is None:
        variable, fixed = params, None
    else:
        variable, fixed = select(params, wrt), select(params, jax.tree.map(lambda k: not k, wrt))

    def example_nll(p, xi, yi):
        full = p if fixed is None else merge_disjoint(p, fixed)
        return nll(logits_fn(full, jax.tree.map(lambda a: a[None], xi))[0], yi)

    per_example_grads = jax.vmap(jax.grad(example_nll), in_axes=(None, 0, 0))

    def accumulate(total, rows):
        xc, yc, mc = rows
        grads = per_example_grads(variable, xc, yc)
        weight = mc.astype(jnp.float32)
        squared = jax.tree.map(lambda g: jnp.einsum("n,n...->...", weight, jnp.square(g)), grads)
        return jax.tree.map(jnp.add, total, squared), None

    rows = (
        jax.tree.map(lambda a: a.reshape(n // chunk, chunk, *a.shape[1:]), x),
        y.reshape(n // chunk, chunk, *y.shape[1:]),
        mask.reshape(n // chunk, chunk),
    )
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), variable)
    total, _ = jax.lax.scan(accumulate, zeros, rows)
    count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    return jax.tree.map(lambda t: t / count, total)


def select(tree: Params, keep: Params) -> Params:
    """`tree` with the leaves where `keep` is False replaced by None (an empty subtree)."""
    return jax.tree.map(lambda leaf, k: leaf if k else None, tree, keep)


def merge_disjoint(a: Params, b: Params) -> Params:
    """Two trees of one structure whose None holes complement each other, as one tree."""
    return jax.tree.map(lambda u, v: v if u is None else u, a, b, is_leaf=lambda node: node is None)


@jax.custom_vjp
def squared_grad_linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """`x @ kernel + bias` whose gradient is the Fisher's: squared per-example gradients, summed.

    For a dense layer, example i's gradient w.r.t. the kernel is the outer product
    x_i^T d_i (d_i: its loss's gradient w.r.t. the layer's output row), so the sum over
    examples of its square is (x^2)^T (d^2), and for the bias sum(d^2): one matmul instead
    of one gradient per example. The backward pass returns those for kernel and bias, and
    the ordinary gradient for x, so the layers below see true output gradients. Exact when
    the loss is a sum of per-example losses and each parameter acts on each example once
    (a dense layer applied once to [examples, features]; not a convolution or a per-token
    layer, whose kernel is shared across positions: learner/fisher.py tells them apart).
    """
    return x @ kernel + bias


def _squared_grad_linear_forward(x, kernel, bias):
    return x @ kernel + bias, (x, kernel)


def _squared_grad_linear_backward(saved, d):
    x, kernel = saved
    return d @ kernel.T, jnp.square(x).T @ jnp.square(d), jnp.sum(jnp.square(d), axis=0)


squared_grad_linear.defvjp(_squared_grad_linear_forward, _squared_grad_linear_backward)


def fisher_diagonal_dense(
    squared_grad_logits_fn: Callable[[Params, Any], jax.Array],
    nll: ExampleNLL,
    params: Params,
    x,
    y: jax.Array,
    mask: jax.Array,
) -> Params:
    """`fisher_diagonal`'s result in one backward pass, for networks of dense layers only.

    `squared_grad_logits_fn` must route the dense layers through `squared_grad_linear`; the
    gradient of the masked summed negative log-likelihood (`nll`, as in `fisher_diagonal`)
    is then, for their kernels and biases, the sum over valid examples of squared
    per-example gradients, and the mean is taken here. Much faster than per-example
    gradients (BENCHMARKS.md, "Guard costs"), and the same figures up to float rounding.
    The gradients of any other parameter are plain sums, not a Fisher: the caller keeps
    only the dense layers' leaves (Learner.fisher).
    """

    def summed_nll(p):
        losses = nll(squared_grad_logits_fn(p, x), y)
        return jnp.sum(jnp.where(mask, losses, 0.0))

    squared = jax.grad(summed_nll)(params)
    count = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    return jax.tree.map(lambda s: s / count, squared)


def consolidate(ewc: EWCState, params: Params, new_fisher: Params, gamma: float) -> EWCState:
    """Online EWC update at an accepted checkpoint: anchor <- params, F <- gamma F + F_new (Schwarz 2018)."""
    return ewc._replace(
        anchor=jax.tree.map(jnp.copy, params),
        fisher=jax.tree.map(lambda old, new: gamma * old + new, ewc.fisher, new_fisher),
    )


def decay_strength(ewc: EWCState, *, decay: float, floor: float) -> EWCState:
    """After an accepted checkpoint the model is trusted more: lambda moves toward its floor."""
    return ewc._replace(strength=jnp.maximum(ewc.strength * decay, floor).astype(jnp.float32))


def boost_strength(ewc: EWCState, *, boost: float, ceiling: float) -> EWCState:
    """After a regression old knowledge needs holding harder: lambda is multiplied, up to a ceiling."""
    return ewc._replace(strength=jnp.minimum(ewc.strength * boost, ceiling).astype(jnp.float32))
