"""The Kafka (Tansu) and Postgres dead-letter destinations take any event content (DESIGN.md §3), and an event
whose delivery fails unexpectedly still ends: its Kafka offset is committed past it."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bridge.bindings import Binding, BindingTable
from bridge.config import DeadLetterConfig, DeliveryConfig, RetryConfig
from bridge.deadletter import FileDeadLetter, read_records
from bridge.dispatch import Dispatcher, Invocation
from bridge.runtime import SourceRunner
from bridge.sources import Event, Outcome
from bridge.sources.kafka.source import kafka_dead_letter
from bridge.sources.kafka.spec import KafkaSourceConfig
from bridge.sources.postgres._deadletter import PostgresDeadLetter
from tests.support.configs import source_config
from tests.support.services import read_topic

from .kafka.test_source import (
    committed,
    make_config,
    produce,
    running,
    source_for,
    topic,  # noqa: F401 (a fixture)
    wait_until,
)


def _deep(levels: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(levels):
        node.append([])
        node = node[0]
    return root


def _hostile_record(event_id: str) -> dict[str, Any]:
    return {
        "source": "orders",
        "event": {"id": event_id, "key": "k\udcfe", "value": {"text": "a\ud800b\x00c", "n": float("nan"),
                                                             "raw": b"\xff", "deep": _deep(1000)}},
        "binding": {"id": "b1", "function_id": "f::one", "namespace": None, "config": {"x\ud800": 1}},
        "payload": {"text": "\x00\udfff"},
        "error": {"code": "invocation_failed", "message": "boom \ud800\x00"},
        "attempts": 1, "first_attempt_at": None, "last_attempt_at": None,
    }


async def test_the_kafka_destination_takes_any_content(kafka_broker: str, topic: str) -> None:  # noqa: F811
    dlq = f"dlq-{uuid.uuid4().hex[:8]}"
    dead = kafka_dead_letter(DeadLetterConfig(kafka_topic=dlq), make_config(kafka_broker, topic))
    try:
        await asyncio.wait_for(dead.write(_hostile_record("kafka:t:0:1")), 30)
    finally:
        await dead.close()
    [message] = await read_topic(kafka_broker, dlq, 1)
    record = json.loads(message.value)
    assert record["event"]["value"]["text"] == "a\ud800b\x00c" and record["event"]["value"]["n"] == "NaN"
    assert record["event"]["value"]["raw"] == {"raw_b64": "/w=="}
    assert record["error"]["message"] == "boom \ud800\x00" and record["encoding_notes"]


async def test_the_postgres_destination_stores_any_content(pg_database: str) -> None:
    sink = PostgresDeadLetter(pg_database, "dead_letters", "orders")
    try:
        await asyncio.wait_for(sink.write(_hostile_record("pg:c:1:2")), 30)
    finally:
        await sink.close()
    conn = await asyncpg.connect(pg_database)
    try:
        [row] = await conn.fetch("SELECT * FROM dead_letters")
    finally:
        await conn.close()
    event = json.loads(row["event"])
    # jsonb refuses NUL and lone surrogates: they are kept as their escape text
    assert event["value"]["text"] == "a\\ud800b\\u0000c" and event["key"] == "k\\udcfe"
    assert event["value"]["n"] == "NaN" and event["value"]["raw"] == {"raw_b64": "/w=="}
    assert json.loads(row["binding"])["config"] == {"x\\ud800": 1}
    assert json.loads(row["payload"]) == {"text": "\\u0000\\udfff"}
    assert row["error_message"].startswith("boom \\ud800\\u0000 [dead-letter encoding: ")


class _Invoker:
    connected = True

    async def wait_connected(self) -> None:
        return None

    async def invoke(self, call: Invocation) -> Any:
        return None


class _BuggyDispatcher(Dispatcher):
    """A delivery bug for one event: the dispatcher itself raises what nothing handles."""

    async def deliver(self, event: Event) -> Outcome:
        if event.fields.get("offset") == 1:
            raise RecursionError("maximum recursion depth exceeded")
        return await super().deliver(event)


async def test_an_unexpected_delivery_error_still_commits_the_offset_past_the_event(
    kafka_broker: str, topic: str, tmp_path: Path  # noqa: F811
) -> None:
    await produce(kafka_broker, topic, [(0, b"k", json.dumps({"n": n}).encode(), []) for n in range(3)])
    config = make_config(kafka_broker, topic, commit_interval_ms=100)
    assert isinstance(config.kind_config, KafkaSourceConfig) and config.kind_config.group_id
    dl_path = tmp_path / "dl.jsonl"
    config = source_config(
        config.id, config.kind_config,
        delivery=DeliveryConfig(retry=RetryConfig(max_attempts=1), dead_letter=DeadLetterConfig(file=dl_path)),
    )
    table = BindingTable(config.id)
    table.upsert(Binding("b1", config.id, "f::one", None, {}))
    runner = SourceRunner(config, _BuggyDispatcher(config, table, _Invoker(), FileDeadLetter(dl_path)), table)
    source = source_for(config, tmp_path)
    async with running(source, runner):  # type: ignore[arg-type]
        await wait_until(lambda: source.committed_positions().get((topic, 0)) == 3, 30,
                         lambda: str(source.committed_positions()))
    assert (await committed(kafka_broker, config.kind_config.group_id, topic))[0] == 3
    [(_, record)] = list(read_records(dl_path))
    assert record["event"]["id"] == f"kafka:{topic}:0:1" and record["binding"] is None
    assert record["error"] == {"code": "internal_error", "message": "RecursionError: maximum recursion depth exceeded"}
