"""Live reload where it touches a Kafka consumer group or a Postgres outbox: a source reloaded mid-stream loses
nothing and delivers nothing twice (real Tansu broker, real PostgreSQL, `bridge up` as a real process)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from bridge.cli import main
from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import wait_for
from tests.support.process import BridgeProcess
from tests.support.services import committed_offsets, create_topics, pg_execute, pg_fetch

PARTITIONS = 4
JOIN_S = 30.0  # bound on waits that include a group join (Tansu takes seconds)
RELOAD_S = 15.0

KAFKA = """\
version: 1
engine: {url: "${III_URL:ws://127.0.0.1:49134}", reconcile_interval_ms: 1000}
state_dir: state
sources:
  orders:
    description: Orders from Kafka
    max_in_flight: 8
    kafka:
      bootstrap_servers: <bootstrap>
      topics: [<topic>]
      group_id: <group>
      start_from: earliest
      commit_interval_ms: 200
      client_options: {session_timeout_ms: 3000, heartbeat_interval_ms: 500, rebalance_timeout_ms: 3000}
    payload:
      id: "{{ event.id }}"
      label: <label>
"""

OUTBOX = """\
version: 1
engine: {url: "${III_URL:ws://127.0.0.1:49134}", reconcile_interval_ms: 1000}
state_dir: state
sources:
  orders:
    description: Orders from the outbox table
    max_in_flight: 8
    postgres:
      dsn: "<dsn>"
      mode: outbox
      outbox_table: bridge_outbox
      poll_interval_ms: 500
      batch_size: 50
    payload:
      n: "{{ event.payload.n }}"
      label: <label>
"""


def _write(path: Path, template: str, **values: str) -> Path:
    text = template
    for key, value in values.items():
        text = text.replace(f"<{key}>", value)
    tmp = path.with_name(".bridge.yaml.tmp")
    tmp.write_text(text)
    tmp.rename(path)
    return path


async def _slow(payload: Any) -> Any:
    await asyncio.sleep(0.02)  # ~400 calls/s with 8 in flight: the reload lands mid-stream
    return {"ok": True}


async def _topic_with(bootstrap: str, topic: str, count: int) -> dict[int, int]:
    """Create ``topic`` and produce ``count`` keyed messages; returns how many went to each partition."""
    await create_topics([topic], PARTITIONS, bootstrap_servers=bootstrap)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, b"{}", key=f"k{n}".encode()) for n in range(count)]
        placed = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return dict(Counter(m.partition for m in placed))


def test_a_kafka_source_reloaded_mid_stream_loses_nothing_and_keeps_its_committed_offsets(
    tmp_path: Path, kafka_broker: str, iii_engine: TestEngine, consumer: Consumer
) -> None:
    suffix = uuid.uuid4().hex[:12]
    topic, group = f"reload-{suffix}", f"bridge-{suffix}"
    per_partition = asyncio.run(_topic_with(kafka_broker, topic, 600))
    config = tmp_path / "bridge.yaml"
    values = {"bootstrap": kafka_broker, "topic": topic, "group": group}
    _write(config, KAFKA, label="v1", **values)
    consumer.function("shop::on-order", _slow)
    consumer.bind("orders", "shop::on-order")
    with BridgeProcess(config, iii_engine.url) as bridge:
        wait_for(lambda: len(consumer.records("shop::on-order")) >= 100, JOIN_S, "100 calls")
        _write(config, KAFKA, label="v2", **values)
        bridge.wait_for_log(r"config reloaded \(bridge\.yaml changed\): changed: orders", timeout=RELOAD_S)
        wait_for(lambda: len(consumer.records("shop::on-order")) >= 600, JOIN_S * 2, "600 calls")
        expected = {p: n for p, n in per_partition.items()}

        def all_committed() -> bool:
            found = asyncio.run(committed_offsets(kafka_broker, group, topic, PARTITIONS))
            return all(found.get(p) == n for p, n in expected.items())

        wait_for(all_committed, JOIN_S, "every offset committed")
        assert bridge.stop() == 0
    calls = consumer.calls("shop::on-order")
    ids = Counter(c["id"] for c in calls)
    assert len(ids) == 600
    assert max(ids.values()) == 1, [i for i, c in ids.items() if c > 1][:10]
    labels = Counter(c["label"] for c in calls)
    assert labels["v1"] >= 100 and labels["v2"] > 0, labels


def test_an_outbox_source_reloaded_mid_stream_finishes_or_releases_its_claimed_rows(
    tmp_path: Path, pg_database: str, iii_engine: TestEngine, consumer: Consumer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = _write(tmp_path / "bridge.yaml", OUTBOX, dsn=pg_database, label="v1")
    capsys.readouterr()
    assert main(["sql", "-c", str(config), "orders"]) == 0
    pg_execute(pg_database, capsys.readouterr().out)
    pg_fetch(pg_database, "INSERT INTO bridge_outbox (channel, payload) SELECT 'orders', jsonb_build_object('n', n)"
             " FROM generate_series(0, 999) AS n")
    consumer.function("pg::order", _slow)
    consumer.bind("orders", "pg::order")
    with BridgeProcess(config, iii_engine.url) as bridge:
        wait_for(lambda: len(consumer.records("pg::order")) >= 100, 20, "100 calls")
        _write(config, OUTBOX, dsn=pg_database, label="v2")
        bridge.wait_for_log(r"config reloaded \(bridge\.yaml changed\): changed: orders", timeout=RELOAD_S)
        wait_for(lambda: len(consumer.records("pg::order")) >= 1000, 30, "1000 calls")
        wait_for(lambda: pg_fetch(pg_database, "SELECT count(*) AS n FROM bridge_outbox")[0]["n"] == 0, 10,
                 "an empty outbox")
        assert bridge.stop() == 0
    calls = consumer.calls("pg::order")
    ns = Counter(c["n"] for c in calls)
    assert set(ns) == set(range(1000))
    assert max(ns.values()) == 1, [n for n, c in ns.items() if c > 1][:10]
    labels = Counter(c["label"] for c in calls)
    assert labels["v1"] >= 100 and labels["v2"] > 0, labels
