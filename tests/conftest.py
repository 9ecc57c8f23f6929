"""Shared fixtures (one embedded Kafka-compatible broker for the session) and the test markers.

Every test gets one of three markers: `kafka` (it uses the broker fixture), `slow` (marked where
it is defined: anything that runs something whole and takes seconds for it: the CLI or the
service end to end, the training loop over a stream, a subprocess, a property search, a model
trained to a target figure, a Monte-Carlo estimate of a rate) or else `unit`. The fast part
runs first, so a broken invariant shows up early: `pytest -m unit` runs it alone.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

# One persistent XLA compilation cache, set before anything imports JAX: hundreds of tests build
# the same learners, and a cache hit skips XLA's compile (about half the unit tests' CPU time).
# It lives in .pytest_cache (git-ignored) and outlives the session, so a second `make unit` on
# the same code compiles almost nothing; JAX keys each entry on the program, its own version
# and the flags, and evicts the least recently used beyond 256 MiB. Workers and subprocesses
# inherit the variables. A cache hit still counts as a compilation (learner.compiles), so the
# no-recompile tests keep their bite (tests/test_compiles.py).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "xla"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_COMPILATION_CACHE_MAX_SIZE=str(256 * 2**20),
    )

from continuity.stream.broker import SHORT_HEARTBEAT_INTERVAL_MS, SHORT_SESSION_TIMEOUT_MS

_ORDER = ("unit", "kafka", "slow")

# The embedded broker holds a consumer-group join for about half the session timeout; the
# library default is Apache Kafka's 45 s, so every group consumer in the tests uses the short one.
SHORT_SESSION = {"session_timeout_ms": SHORT_SESSION_TIMEOUT_MS, "heartbeat_interval_ms": SHORT_HEARTBEAT_INTERVAL_MS}
SHORT_SESSION_SET = f"stream.session_timeout_ms={SHORT_SESSION_TIMEOUT_MS}"  # the same as a config override


def pytest_collection_modifyitems(items):
    for item in items:
        # A property search (hypothesis's @given) runs hundreds of inputs: slow wherever it is.
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        # A test needs Kafka when it takes the session broker or its module starts brokers of its own.
        starts_brokers = getattr(item.module, "EmbeddedBroker", None) is not None
        if ("broker" in item.fixturenames or starts_brokers) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.kafka)
        if item.get_closest_marker("kafka") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)
    # Stable: within a category, files and tests keep their order.
    items.sort(key=lambda item: next(i for i, name in enumerate(_ORDER) if item.get_closest_marker(name)))


@pytest.fixture(scope="session")
def broker():
    from continuity.stream.broker import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def topic_name(request):
    """A topic name unique to this test (the broker is shared by the session)."""

    def make(suffix: str = "") -> str:
        base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
        return f"{base}{suffix}-{uuid.uuid4().hex[:8]}"

    return make


def record_scenario(path, *, segments: int, seed: int, topic: str = "digits"):
    """A permuted-digits stream written to Parquet exactly as `continuity record` writes one."""
    from continuity.stream import FeatureSpec, RecordingWriter, ScenarioSource, make_codec
    from continuity.stream.scenarios import make_scenario

    source = ScenarioSource(
        make_scenario("permuted-digits", segments=segments, seed=seed),
        make_codec("binary", FeatureSpec((8, 8, 1), "float32", 10)),
        topic=topic,
    )
    writer = RecordingWriter(path)
    while not source.finished:
        for run in source.poll():
            writer.write(run)
    writer.close()
    return path


def accepted_chain(ledger: list[dict], final: int | None) -> list[dict]:
    """The checkpoints of the surviving lineage, oldest first: "accept" events followed by parent
    links back from checkpoint `final`."""
    accepts = {e["checkpoint"]: e for e in ledger if e["event"] == "accept"}
    chain, number = [], final
    while number is not None:
        chain.append(accepts[number])
        number = accepts[number]["parent"]
    return chain[::-1]
