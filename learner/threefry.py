"""Threefry-2x32, JAX's default random hash, compiled unrolled on the CPU.

JAX lowers the hash (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3",
Threefry-2x32 with 20 rounds) on the CPU as a `while` loop of five iterations of four
rounds, to keep compile times short. XLA's CPU runtime runs each iteration's dozen small
kernels one after another, and the train step hashes nine times per update (the step's key,
replay sampling, the reservoir's per-row draws): those loops were ~700 of the ~1,200 kernels
one update ran (BENCHMARKS.md, "Updates per dispatch"). Unrolled, a hash is a chain of
element-wise integer operations that XLA fuses into a kernel or two.

`unroll_on_cpu()` registers the unrolled form as the CPU lowering of JAX's
`threefry2x32` primitive for the whole process: the same rounds, rotations and key
schedule, so every key and every random number is the same bit for bit; only the compiled
program's shape changes (GPUs already get the unrolled form, or a kernel of their own).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p
from jax.interpreters import mlir

# Salmon et al. 2011, Table 4: Threefry-2x32's rotation constants, rounds 0-3 and 4-7.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)  # the key schedule's constant (Skein's C240, 32-bit)


def _rotate_left(v, distance: int):
    return (v << np.uint32(distance)) | (v >> np.uint32(32 - distance))


def hash_2x32(key1, key2, x1, x2):
    """Threefry-2x32 (20 rounds) of the counters (x1, x2) under the key (key1, key2), unrolled.

    All uint32 arrays, broadcast together; returns the two output words.
    """
    keys = (key1, key2, key1 ^ key2 ^ _PARITY)
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for injection in range(1, 6):  # five groups of four rounds, a key injection after each
        for distance in _ROTATIONS[(injection - 1) % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, distance)
        x1 = x1 + keys[injection % 3]
        x2 = x2 + keys[(injection + 1) % 3] + np.uint32(injection)
    return x1, x2


def _broadcast_hash(key1, key2, x1, x2):
    shape = jnp.broadcast_shapes(*(jnp.shape(v) for v in (key1, key2, x1, x2)))
    return hash_2x32(*(jnp.broadcast_to(v, shape) for v in (key1, key2, x1, x2)))


@functools.cache
def unroll_on_cpu() -> None:
    """Compile JAX's threefry hash unrolled on the CPU from now on (once per process)."""
    mlir.register_lowering(threefry2x32_p, mlir.lower_fun(_broadcast_hash, multiple_results=True), platform="cpu")
