"""tests.support.services, the real test services every other test relies on: a Kafka-protocol broker and PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.services import (
    PostgresServer,
    ServiceStartError,
    TansuBroker,
    kafka_bootstrap_from_env,
)

# Tansu joins a group in about session_timeout_ms / 2: keep it short in tests.
GROUP_TIMINGS = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500, "rebalance_timeout_ms": 3000}


async def test_kafka_keyed_messages_with_headers_and_manual_commit(kafka_broker: str) -> None:
    topic, group = f"svc-{uuid.uuid4().hex}", f"svc-group-{uuid.uuid4().hex}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker)
    await producer.start()
    try:
        assert len(await producer.partitions_for(topic)) == 4
        sent = {}
        for i in range(8):
            meta = await producer.send_and_wait(
                topic, key=f"k{i}".encode(), value=f"v{i}".encode(), headers=[("seq", str(i).encode())]
            )
            sent[f"k{i}"] = (meta.partition, meta.offset)
    finally:
        await producer.stop()
    assert len({partition for partition, _ in sent.values()}) > 1, "keys should spread over partitions"

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **GROUP_TIMINGS,
    )
    await consumer.start()
    try:
        received: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(20):
            while len(received) < len(sent):
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    received.extend(messages)
        assert len(received) == len(sent)
        for msg in received:
            key = msg.key.decode()
            assert (msg.partition, msg.offset) == sent[key]
            assert msg.value == f"v{key[1:]}".encode()
            assert list(msg.headers) == [("seq", key[1:].encode())]

        # commit() stores the position of every assigned partition, 0 for the empty ones.
        await consumer.commit()
        assert len(consumer.assignment()) == 4
        for tp in consumer.assignment():
            offsets = [offset for partition, offset in sent.values() if partition == tp.partition]
            expected = max(offsets) + 1 if offsets else 0
            assert await consumer.committed(tp) == expected
    finally:
        await consumer.stop()


def test_kafka_bootstrap_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_TEST_KAFKA", "kafka.example:9092")
    assert kafka_bootstrap_from_env() == "kafka.example:9092"
    monkeypatch.setenv("BRIDGE_TEST_KAFKA", " ")
    assert kafka_bootstrap_from_env() is None
    monkeypatch.delenv("BRIDGE_TEST_KAFKA")
    assert kafka_bootstrap_from_env() is None


def test_broker_start_failure_reports_the_log_tail() -> None:
    # A bound (not listening) socket makes Tansu's bind fail at once, and refuses connections meanwhile.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        broker = TansuBroker(port=taken.getsockname()[1], startup_timeout_s=10)
        with pytest.raises(ServiceStartError, match="exited with code") as info:
            broker.start()
    assert "log tail:" in str(info.value)
    assert "Address in use" in str(info.value)
    assert broker.log_path is None, "the log file is removed once its tail is in the error"


async def _database_exists(server_dsn: str, name: str) -> bool:
    conn = await asyncpg.connect(server_dsn, timeout=10)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def test_pg_database_fixture_is_a_fresh_database(pg_database: str) -> None:
    conn = await asyncpg.connect(pg_database, timeout=10)
    try:
        name = await conn.fetchval("SELECT current_database()")
        tables = await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    assert name.startswith("bridge_test_")
    assert pg_database.endswith("/" + name)
    assert tables == 0


async def test_create_and_drop_database_even_while_connected(pg_server: PostgresServer) -> None:
    # The helpers are sync and run their own event loop; from async code they hop onto a thread.
    dsn = pg_server.create_database()
    name = dsn.rsplit("/", 1)[1]
    assert await _database_exists(pg_server.dsn, name)
    lingering = await asyncpg.connect(dsn, timeout=10)
    try:
        pg_server.drop_database(dsn)
        assert not await _database_exists(pg_server.dsn, name)
        assert lingering.is_closed() or not await _still_usable(lingering)
    finally:
        await lingering.close()
    with pytest.raises(ValueError, match="refusing to drop"):
        pg_server.drop_database(pg_server.dsn)


async def _still_usable(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=5)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return False
    return True


async def _notify_round_trip(dsn: str, payload: str) -> str:
    listener = await asyncpg.connect(dsn, timeout=10)
    notifier = await asyncpg.connect(dsn, timeout=10)
    try:
        got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await listener.add_listener("svc_events", lambda _c, _pid, _ch, data: got.set_result(data))
        await notifier.execute("SELECT pg_notify('svc_events', $1)", payload)
        return await asyncio.wait_for(got, 5)
    finally:
        await notifier.close()
        await listener.close()


async def test_listen_notify_round_trip(pg_database: str) -> None:
    assert await _notify_round_trip(pg_database, '{"id": 1}') == '{"id": 1}'


def test_env_dsn_is_used_as_is_and_never_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_TEST_PG_DSN", "postgresql://someone@db.example:5432/postgres")
    server = PostgresServer().start()
    assert server.dsn == "postgresql://someone@db.example:5432/postgres"
    assert not server.is_throwaway
    with pytest.raises(RuntimeError, match="throwaway"):
        server.restart_cluster()
    server.stop()


async def _insert_row(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("CREATE TABLE kept (id int)")
        await conn.execute("INSERT INTO kept VALUES (42)")
    finally:
        await conn.close()


async def _read_row(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        value: int = await conn.fetchval("SELECT id FROM kept")
        return value
    finally:
        await conn.close()


def test_throwaway_cluster_notifies_and_keeps_data_across_restarts() -> None:
    with PostgresServer(force_throwaway=True) as server:
        assert server.is_throwaway
        assert ":5432/" not in server.dsn
        data_dir = server.cluster_dir
        assert isinstance(data_dir, Path) and data_dir.is_dir()

        dsn = server.create_database()
        asyncio.run(_insert_row(dsn))
        assert asyncio.run(_notify_round_trip(dsn, "before")) == "before"

        server.stop_cluster()
        with pytest.raises(OSError):
            asyncio.run(_read_row(dsn))
        server.start_cluster()
        assert asyncio.run(_read_row(dsn)) == 42

        server.restart_cluster()
        assert asyncio.run(_read_row(dsn)) == 42
        assert asyncio.run(_notify_round_trip(dsn, "after")) == "after"
        server.drop_database(dsn)
    assert not data_dir.exists()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.dsn
