"""An embedding-bag classifier over token ids: a model of one's own, named in the config by
`[model] factory = "examples.tokens.model:build"` (its options in `[model.kwargs]`).

A factory is called with keyword arguments `rngs` (an `nnx.Rngs`), `inputs` (one example's
features as the stream declares them: here `{"tokens": int32[T], "numeric": float32[F]}`,
from `[stream.inputs]`) and `outputs` (the task's output width), plus its own options, and
returns an `nnx.Module` that maps a batch to outputs of shape (batch, outputs).

Token id 0 is padding: a sequence shorter than T is filled with zeros, which the mean of
the embeddings leaves out (an embedding bag; Joulin et al. 2017, "Bag of Tricks for
Efficient Text Classification", without the n-grams). Ids at or above `vocab` share the
last row (an "unknown" token), so a producer's new words cannot index out of the table.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class TokenBag(nnx.Module):
    """Mean of the non-padding tokens' embeddings, joined with the numeric features, then an MLP head."""

    def __init__(self, *, vocab: int, dim: int, hidden: int, numeric: int, outputs: int, rngs: nnx.Rngs):
        self.vocab = vocab
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.hidden = nnx.Linear(dim + numeric, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, outputs, rngs=rngs)

    def __call__(self, x: dict) -> jax.Array:
        tokens = x["tokens"]
        if not jnp.issubdtype(tokens.dtype, jnp.integer):  # at trace time: ids that became floats are a bug upstream
            raise TypeError(f"token ids must reach the model as integers. Got {tokens.dtype}")
        present = (tokens > 0)[..., None]
        vectors = self.embed(jnp.clip(tokens, 0, self.vocab - 1))
        bag = jnp.sum(vectors * present, axis=1) / jnp.maximum(jnp.sum(present, axis=1), 1)
        if "numeric" in x:
            bag = jnp.concatenate([bag, x["numeric"].reshape(bag.shape[0], -1)], axis=-1)
        return self.head(jax.nn.relu(self.hidden(bag)))


def build(*, rngs: nnx.Rngs, inputs, outputs: int, vocab: int = 512, dim: int = 32, hidden: int = 64) -> TokenBag:
    """The factory the config names. `inputs` must hold int32 `tokens`; `numeric` is optional."""
    if not isinstance(inputs, dict) or "tokens" not in inputs:
        raise ValueError(f"the token model needs named inputs with an int32 'tokens' field. Got {inputs!r}")
    if not jnp.issubdtype(inputs["tokens"].dtype, jnp.integer):
        raise ValueError(f"'tokens' must be integer ids (dtype int32). Got {inputs['tokens'].dtype}")
    numeric = math.prod(inputs["numeric"].shape) if "numeric" in inputs else 0
    return TokenBag(vocab=vocab, dim=dim, hidden=hidden, numeric=numeric, outputs=outputs, rngs=rngs)
