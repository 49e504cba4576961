"""Poison corpus, one test per source kind: `bridge up` as a real process with real inputs (files, a Tansu topic,
NOTIFYs, outbox rows), the real iii-sdk consumer through the test engine with one passing and one failing binding.

Good events are interleaved with poison ones (nesting 600 and 5,000 deep, NaN, 1e400, a 5,000-digit integer, a
lone surrogate escape, invalid UTF-8, an empty value: whatever the kind can carry). DESIGN.md §3 promises that
every event ends: each good event is delivered to the passing binding and dead-lettered for the failing one, each
poison event is dead-lettered once with ``binding: null`` and its raw content, every input is acknowledged
(Kafka committed to the end, the outbox table empty), every dead-letter line is JSON, and the bridge stays up
with no traceback in its log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import wait_for
from tests.support.process import BridgeProcess
from tests.support.services import committed_offsets

WAIT_S = 30.0  # bound on a wait that may include a Kafka group join (Tansu takes seconds)

CONFIG = """\
version: 1
engine:
  url: ${III_URL}
  reconcile_interval_ms: 500
state_dir: state
observability:
  listen: 127.0.0.1:0
defaults:
  delivery:
    timeout_ms: 5000
    retry: {max_attempts: 2, initial_backoff_ms: 20, jitter: 0}
    dead_letter: {file: dead-letters.jsonl}
sources:
  feed:
    description: Good events and poison
<kind>
    payload:
<payload>
"""
PAYLOAD = """\
      n: "{{ event.<field>.n }}"
      text: "{{ event.<field>.text }}"
      id: "{{ event.id }}\""""

# Poison every kind can carry as text, and what only bytes can carry.
DEEP_600 = b"[" * 600 + b"]" * 600
DEEP_5000 = b"[" * 5000 + b"]" * 5000
TEXT_POISON = [
    DEEP_600,
    DEEP_5000,
    b'{"n": NaN}',
    b'{"n": 1e400}',
    b'{"n": ' + b"9" * 5000 + b"}",
    b'{"n": 1, "text": "\\ud800"}',
]
BYTES_POISON = [b'{"n": 1, "text": "\xff"}', b""]


def good(n: int) -> bytes:
    # A valid surrogate pair escape: it decodes (to an emoji) and must survive every record that holds it.
    return json.dumps({"n": n, "text": "ok \U0001f600"}).encode()


def interleave(poison: list[bytes]) -> tuple[list[bytes], list[int]]:
    """Good event, poison, good event, poison, ..., good event; and the good events' numbers."""
    items: list[bytes] = []
    for n, bad in enumerate(poison):
        items += [good(n), bad]
    items.append(good(len(poison)))
    return items, list(range(len(poison) + 1))


# --- the bridge, the consumer, the checks ------------------------------------------------------------------------


@pytest.fixture
def start_bridge(tmp_path: Path, iii_engine: TestEngine) -> Iterator[Callable[..., BridgeProcess]]:
    """Factory: write bridge.yaml for a source block and its content field (and a payload block), start `bridge
    up`; killed after."""
    started: list[BridgeProcess] = []

    def start(kind_block: str, field: str, payload: str = PAYLOAD) -> BridgeProcess:
        text = CONFIG.replace("<kind>", kind_block).replace("<payload>", payload).replace("<field>", field)
        (tmp_path / "bridge.yaml").write_text(text)
        proc = BridgeProcess(tmp_path / "bridge.yaml", iii_engine.url)
        started.append(proc)
        proc.start()
        proc.wait_for_log(r"connected to the iii engine")
        return proc

    yield start
    for proc in started:
        proc.kill()


def bind_both(consumer: Consumer, bridge: BridgeProcess) -> None:
    def broken(payload: Any) -> Any:
        raise RuntimeError("the warehouse is down")

    consumer.function("poison::ok")
    consumer.function("poison::broken", broken)
    consumer.bind("feed", "poison::ok")
    consumer.bind("feed", "poison::broken")
    bridge.wait_for_log(r"binding \S+ added: feed → poison::", timeout=WAIT_S, count=2)


def raw_lines(tmp_path: Path) -> list[str]:
    path = tmp_path / "state" / "dead-letters.jsonl"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def carried(event: dict[str, Any], field: str) -> bytes | None:
    """The raw content a poison event's record carries: text in the content field, or base64 in raw_b64."""
    if "raw_b64" in event:
        return base64.b64decode(event["raw_b64"])
    value = event.get(field)
    return value.encode("utf-8") if isinstance(value, str) else None


def check(tmp_path: Path, bridge: BridgeProcess, consumer: Consumer, field: str, good_ns: list[int],
          poison: list[bytes]) -> None:
    """Every good event delivered (and dead-lettered for the failing binding), every poison event dead-lettered
    once with binding null and its raw content, every dead-letter line JSON, the bridge alive and clean."""
    expected = len(good_ns) + len(poison)
    wait_for(lambda: len(raw_lines(tmp_path)) >= expected, WAIT_S, f"{expected} dead-letter records")
    wait_for(lambda: len(consumer.calls("poison::ok")) >= len(good_ns), WAIT_S, "the good events")
    lines = raw_lines(tmp_path)
    assert len(lines) == expected, lines[expected:]
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert sorted(c["n"] for c in consumer.calls("poison::ok")) == good_ns
    failed = [r for r in records if r["binding"] is not None]
    assert sorted(r["event"][field]["n"] for r in failed) == good_ns
    assert all(r["binding"]["function_id"] == "poison::broken" and r["error"]["code"] == "invocation_failed"
               and r["event"][field]["text"] == "ok \U0001f600" for r in failed)
    undecodable = [r for r in records if r["binding"] is None]
    assert all(r["error"]["code"] == "decode_error" and r["payload"] is None and r["attempts"] == 0
               for r in undecodable), [(r["error"], r["attempts"]) for r in undecodable]
    assert sorted(raw for r in undecodable if (raw := carried(r["event"], field)) is not None) == sorted(poison)
    assert bridge.proc is not None and bridge.proc.poll() is None, "the bridge exited"
    found = re.search(r"serving /metrics, /healthz and /readyz on (http://127\.0\.0\.1:\d+)", bridge.log())
    assert found, bridge.log()
    with urllib.request.urlopen(f"{found.group(1)}/healthz", timeout=5) as response:
        assert response.status == 200
    assert "Traceback" not in bridge.log()


# --- file ---------------------------------------------------------------------------------------------------------


FILE_BLOCK = """\
    file:
      path: ./inbox
      include: ["*.json"]
      content: json
      settle_ms: 50
      max_content_bytes: 100000"""


def test_file_poison(tmp_path: Path, start_bridge: Callable[..., BridgeProcess],
                     consumer: Consumer) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    bridge = start_bridge(FILE_BLOCK, "content")
    bind_both(consumer, bridge)
    poison = TEXT_POISON + BYTES_POISON
    items, good_ns = interleave(poison)
    for i, data in enumerate(items):
        (inbox / f".e{i:02d}.tmp").write_bytes(data)
        (inbox / f".e{i:02d}.tmp").rename(inbox / f"e{i:02d}.json")
    check(tmp_path, bridge, consumer, "content", good_ns, poison)
    # Acknowledged: every version is checkpointed, so a restarted bridge delivers nothing again.
    assert bridge.stop() == 0
    again = start_bridge(FILE_BLOCK, "content")
    again.wait_for_log(r"binding \S+ added: feed → poison::", timeout=WAIT_S, count=2)
    time.sleep(1.5)  # what would come again has come by now
    assert len(consumer.calls("poison::ok")) == len(good_ns)
    assert len(raw_lines(tmp_path)) == len(good_ns) + len(poison)
    assert "Traceback" not in again.log()


def test_a_file_nested_exactly_512_deep_is_decoded_sent_and_ends(
    tmp_path: Path, start_bridge: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    """The limit's valid side end to end: decoded (not a decode error), rendered and sent to both bindings. The
    target's own iii-sdk 0.25 cannot take it (it walks the arguments recursively, two frames per level, and answers
    ``invocation_failed``), so each binding ends dead-lettered with the event and payload kept: the event ends, and
    the records nesting it two levels deeper still write."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    bridge = start_bridge(FILE_BLOCK, "content", payload='      deep: "{{ event.content }}"')
    bind_both(consumer, bridge)
    deep: Any = []
    for _ in range(511):
        deep = [deep]
    (inbox / ".deep.tmp").write_text(json.dumps(deep))
    (inbox / ".deep.tmp").rename(inbox / "deep.json")
    wait_for(lambda: len(raw_lines(tmp_path)) >= 2, WAIT_S, "a dead letter per binding")
    records = [json.loads(line) for line in raw_lines(tmp_path)]
    assert sorted(r["binding"]["function_id"] for r in records) == ["poison::broken", "poison::ok"]
    for record in records:
        assert record["error"]["code"] == "invocation_failed"
        assert record["event"]["content"] == deep and record["payload"] == {"deep": deep}
    assert "Traceback" not in bridge.log()


# --- kafka --------------------------------------------------------------------------------------------------------


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(topic, value, key=f"k{i}".encode(), partition=0)
    finally:
        await producer.stop()


def test_kafka_poison(tmp_path: Path, start_bridge: Callable[..., BridgeProcess], consumer: Consumer,
                      kafka_broker: str) -> None:
    suffix = uuid.uuid4().hex[:12]
    topic, group = f"poison-{suffix}", f"bridge-{suffix}"
    poison = TEXT_POISON + BYTES_POISON
    items, good_ns = interleave(poison)
    asyncio.run(_produce(kafka_broker, topic, items))
    block = f"""\
    kafka:
      bootstrap_servers: {kafka_broker}
      topics: [{topic}]
      group_id: {group}
      start_from: earliest
      commit_interval_ms: 200
      client_options: {{session_timeout_ms: 3000, heartbeat_interval_ms: 500, rebalance_timeout_ms: 3000}}"""
    bridge = start_bridge(block, "value")
    bind_both(consumer, bridge)
    check(tmp_path, bridge, consumer, "value", good_ns, poison)

    def fully_committed() -> bool:
        return asyncio.run(committed_offsets(kafka_broker, group, topic, 1)) == {0: len(items)}

    wait_for(fully_committed, WAIT_S, f"offset {len(items)} committed")
    assert bridge.proc is not None and bridge.proc.poll() is None
    assert bridge.stop() == 0


# --- postgres -----------------------------------------------------------------------------------------------------


def _run_sql(dsn: str, statement: str, *args: Any) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(statement, *args)
        finally:
            await conn.close()

    asyncio.run(run())


def _notify(dsn: str, payloads: list[bytes]) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            for payload in payloads:
                await conn.execute("SELECT pg_notify('poison', $1)", payload.decode())
        finally:
            await conn.close()

    asyncio.run(run())


def _outbox_rows(dsn: str) -> int:
    async def run() -> int:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            count: int = await conn.fetchval("SELECT count(*) FROM bridge_outbox")
            return count
        finally:
            await conn.close()

    return asyncio.run(run())


# NOTIFY carries text under 8,000 bytes: the deepest payload that fits is 3,999 levels, and no invalid UTF-8.
LISTEN_POISON = [DEEP_600, b"[" * 3999 + b"]" * 3999, *TEXT_POISON[2:], b""]


def test_listen_poison(tmp_path: Path, start_bridge: Callable[..., BridgeProcess], consumer: Consumer,
                       pg_database: str) -> None:
    block = f"""\
    postgres:
      dsn: {pg_database}
      channels: [poison]
      payload_format: json"""
    bridge = start_bridge(block, "payload")
    bridge.wait_for_log(r"listening on poison")
    bind_both(consumer, bridge)
    items, good_ns = interleave(LISTEN_POISON)
    _notify(pg_database, items)
    check(tmp_path, bridge, consumer, "payload", good_ns, LISTEN_POISON)
    assert bridge.stop() == 0


# A json column keeps the text as written (jsonb would refuse the lone surrogate and turn 1e400 into an integer);
# Postgres refuses NaN, invalid UTF-8 and an empty value in both.
OUTBOX_POISON = [p for p in TEXT_POISON if b"NaN" not in p]


def test_outbox_poison(tmp_path: Path, start_bridge: Callable[..., BridgeProcess], consumer: Consumer,
                       pg_database: str) -> None:
    _run_sql(pg_database, "CREATE TABLE bridge_outbox (id bigserial PRIMARY KEY, channel text NOT NULL,"
                          " payload json NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
    items, good_ns = interleave(OUTBOX_POISON)
    for item in items:
        _run_sql(pg_database, "INSERT INTO bridge_outbox (channel, payload) VALUES ('orders', $1::json)", item.decode())
    block = f"""\
    postgres:
      dsn: {pg_database}
      mode: outbox
      outbox_table: bridge_outbox
      poll_interval_ms: 200
      batch_size: 4"""
    bridge = start_bridge(block, "payload")
    bind_both(consumer, bridge)
    check(tmp_path, bridge, consumer, "payload", good_ns, OUTBOX_POISON)
    wait_for(lambda: _outbox_rows(pg_database) == 0, WAIT_S, "the outbox table emptied")
    assert bridge.proc is not None and bridge.proc.poll() is None
    assert bridge.stop() == 0
