"""The unrolled CPU lowering of JAX's threefry hash (learner/threefry.py): the same bits, no loop."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

import continuity.learner.learner  # noqa: F401  (the learner registers the lowering)
from continuity.learner.threefry import hash_2x32

# Known-answer vectors of Threefry-2x32, 20 rounds (Random123's kat_vectors: key, counter, result).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize("key, counter, expected", KNOWN_ANSWERS)
def test_the_compiled_hash_gives_threefrys_known_answers(key, counter, expected):
    got = jax.jit(threefry_2x32)(np.array(key, np.uint32), np.array(counter, np.uint32))
    assert [int(v) for v in np.asarray(got)] == list(expected)
    words = hash_2x32(*(np.array([v], np.uint32) for v in (*key, *counter)))
    assert [int(v[0]) for v in words] == list(expected)


def test_the_hash_compiles_without_a_loop_on_the_cpu():
    compiled = jax.jit(threefry_2x32).lower(np.zeros(2, np.uint32), np.zeros(64, np.uint32)).compile().as_text()
    assert jax.default_backend() != "cpu" or " while(" not in compiled
