"""The compilation counter the no-recompile tests and benchmarks rely on."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from continuity.learner.compiles import compilation_count


def test_a_new_trace_counts_once_whether_compiled_or_loaded_from_the_persistent_cache():
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR")  # tests/conftest.py turns the cache on

    def step(x):
        return jnp.tanh(x) * 3.0 + jnp.float32(0.125)

    x, longer = jnp.arange(7, dtype=jnp.float32), jnp.arange(9, dtype=jnp.float32)
    before = compilation_count()
    jax.jit(step)(x).block_until_ready()
    jax.jit(step)(x).block_until_ready()  # the same trace: nothing new
    assert compilation_count() == before + 1
    jax.clear_caches()  # forget the in-memory executable: the next call reads the persistent cache
    jax.jit(step)(x).block_until_ready()
    assert compilation_count() == before + 2
    jax.jit(step)(longer).block_until_ready()  # a new shape: a new trace
    assert compilation_count() == before + 3
