"""The suite's pytest fixtures, loaded by ``tests/conftest.py``: the iii test engine and its consumers, and the
real services of :mod:`tests.support.services` (started lazily, once per session)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.services import PostgresServer, TansuBroker, kafka_bootstrap_from_env
from tests.support.tlsfront import Certs, TlsCertsDir, TlsKafka, tls_tools_missing

ENGINE_MODES = ("trigger", "observe")
"""The engines a test marked ``both_engines`` (``pytestmark = pytest.mark.both_engines`` for a module) runs
against: one before 0.25 (the bridge's trigger mode) and one with ``observe.v1`` (observe mode)."""

FEATURES = {"trigger": (), "observe": ("observe.v1",)}


@pytest.fixture
def iii_engine(request: pytest.FixtureRequest) -> Iterator[TestEngine]:
    """A started TestEngine for this test; fails the test if the engine hit an internal error. An engine before
    0.25 (trigger mode) unless the test is parametrized indirectly with ``"observe"`` (an engine with
    ``observe.v1``)."""
    mode = getattr(request, "param", "trigger")
    with TestEngine(features=FEATURES[mode]) as engine:
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


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """Bootstrap address of a Kafka-protocol broker: BRIDGE_TEST_KAFKA, or a Tansu broker for the session."""
    external = kafka_bootstrap_from_env()
    if external is not None:
        yield external
        return
    with TansuBroker() as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's started PostgresServer (external or throwaway)."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_database(pg_server: PostgresServer) -> Iterator[str]:
    """DSN of a fresh database for this test, dropped afterwards."""
    dsn = pg_server.create_database()
    try:
        yield dsn
    finally:
        pg_server.drop_database(dsn)


@pytest.fixture(scope="session")
def tls_certs() -> Iterator[Certs]:
    """A CA, server and client certificates (and a wrong CA) for the session; skips without openssl or socat."""
    missing = tls_tools_missing()
    if missing is not None:
        pytest.skip(f"TLS tests need socat and openssl: {missing}")
    with TlsCertsDir() as certs:
        yield certs


@pytest.fixture(scope="session")
def kafka_tls(tls_certs: Certs) -> Iterator[TlsKafka]:
    """A Tansu broker behind a socat TLS front (server certificate only), for the session."""
    with TlsKafka(tls_certs, "tls") as kafka:
        yield kafka


@pytest.fixture(scope="session")
def kafka_mtls(tls_certs: Certs) -> Iterator[TlsKafka]:
    """A Tansu broker behind a socat TLS front that requires a client certificate, for the session."""
    with TlsKafka(tls_certs, "mtls") as kafka:
        yield kafka


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_engines: run each test that uses iii_engine against both engines (trigger and observe mode)"
    )
    config.addinivalue_line(
        "markers", "trigger_only(why): in a both_engines module, a test of trigger mode only (why: what observe mode "
        "does instead)"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    definition = metafunc.definition
    chosen = any(m.args and m.args[0] == "iii_engine" for m in definition.iter_markers("parametrize"))
    if (
        "iii_engine" in metafunc.fixturenames
        and definition.get_closest_marker("both_engines")
        and not definition.get_closest_marker("trigger_only")
        and not chosen  # the test names its engine itself
    ):
        metafunc.parametrize("iii_engine", ENGINE_MODES, indirect=True)
