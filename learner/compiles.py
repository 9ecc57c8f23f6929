"""Counts XLA compilations, so benchmarks and tests can prove nothing recompiles after warm-up.

JAX records the backend-compile event around its persistent-cache lookup too, so an executable
loaded from that cache counts: it stands for a new trace all the same (tests/test_compiles.py).
"""

from __future__ import annotations

import threading

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_installed = False


def _on_event(event: str, duration_secs: float, **_kwargs) -> None:
    global _count
    if event == _BACKEND_COMPILE_EVENT:
        with _lock:
            _count += 1


def compilation_count() -> int:
    """XLA backend compilations in this process since the first call of this function."""
    global _installed
    with _lock:
        if not _installed:
            # JAX offers no public unregister; one process-wide listener is installed once.
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _installed = True
        return _count
