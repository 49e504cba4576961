"""pytest plugin (a test utility): fixtures for the iii test engine and test consumers, plus the real-service
fixtures of :mod:`bridge.testing.services`. Registered through the ``pytest11`` entry point."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from bridge.testing.services import kafka_broker, pg_database, pg_server  # noqa: F401


@pytest.fixture
def iii_engine() -> Iterator[TestEngine]:
    """A started TestEngine for this test; fails the test if the engine hit an internal error."""
    with TestEngine() as engine:
        yield engine
        errors = engine.internal_errors
    assert not errors, "the iii test engine failed while handling frames:\n" + "\n".join(errors)


@pytest.fixture
def make_consumer(iii_engine: TestEngine) -> Iterator[Callable[..., Consumer]]:
    """Factory: ``make_consumer(worker_name=..., namespace=...)`` -> a Consumer on ``iii_engine``, closed after."""
    made: list[Consumer] = []

    def make(**kwargs: Any) -> Consumer:
        consumer = Consumer(iii_engine.url, engine=iii_engine, **kwargs)
        made.append(consumer)
        return consumer

    yield make
    for consumer in reversed(made):
        consumer.close()


@pytest.fixture
def consumer(make_consumer: Callable[..., Consumer]) -> Consumer:
    """A Consumer on ``iii_engine``, closed after the test."""
    return make_consumer()
