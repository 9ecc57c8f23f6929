"""Shared fixtures: one embedded Kafka-compatible broker (Tansu) for the whole test session."""

from __future__ import annotations

import uuid

import pytest


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
