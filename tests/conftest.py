"""Shared fixtures: one embedded Kafka-compatible broker (Tansu) for the whole test session."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def broker():
    from stream.broker import EmbeddedBroker

    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def topic_name(request):
    """A topic name unique to this test (the broker is shared by the session)."""

    def make(suffix: str = "") -> str:
        base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
        return f"{base}{suffix}-{uuid.uuid4().hex[:8]}"

    return make
