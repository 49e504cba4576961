"""End to end on the kafka source: `bridge up` as a real process, a real Kafka-protocol broker (Tansu, or
BRIDGE_TEST_KAFKA), the real iii-sdk consumer through the test engine. Every test has its own topic (4 partitions,
created by the admin client) and consumer group, and kills every bridge it started."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import read_jsonl, wait_for
from tests.support.process import BridgeProcess
from tests.support.services import committed_offsets, create_topics, read_topic

# Against an engine before 0.25 (trigger mode) and one with observe.v1 (observe mode).
pytestmark = pytest.mark.both_engines

PARTITIONS = 4
JOIN_S = 30.0  # bound on waits that include a group join or a rebalance (Tansu takes seconds)

# Placeholders are <name> (str.format would need every Jinja brace doubled).
CONFIG = """\
version: 1
engine:
  url: ${III_URL}
  reconcile_interval_ms: 500
state_dir: state
defaults:
  delivery:
    timeout_ms: 5000
    retry: {max_attempts: 2, initial_backoff_ms: 50, jitter: 0}
    dead_letter: <dead_letter>
sources:
  orders:
    description: Orders from Kafka
    kafka:
      bootstrap_servers: <bootstrap>
      topics: [<topic>]
      group_id: <group>
      start_from: earliest
      commit_interval_ms: <commit_interval_ms>
      client_options: {session_timeout_ms: 3000, heartbeat_interval_ms: 500, rebalance_timeout_ms: 3000}
    payload:
      id: "{{ event.id }}"
      n: "{{ event.value.n }}"
      key: "{{ event.key }}"
      trace: "{{ event.headers.trace }}"
      headers: "{{ event.headers }}"
      partition: "{{ event.partition }}"
      offset: "{{ event.offset }}"
      timestamp: "{{ event.timestamp }}"
      at: "{{ event.timestamp | datetime }}"
      iso: "{{ event.timestamp_iso }}"
      where: "{{ event.topic }}/{{ event.partition }}@{{ event.offset }} key={{ event.key }}"
"""


@dataclass(frozen=True)
class Topic:
    bootstrap: str
    name: str
    group: str


# --- broker helpers (aiokafka, run from these synchronous tests with asyncio.run) ----------------------------


async def _create_topics(bootstrap: str, *names: str) -> None:
    await create_topics(list(names), PARTITIONS, bootstrap_servers=bootstrap)


def _message(n: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Order ``n``: key, JSON value, headers."""
    value = json.dumps({"n": n, "total": n * 1.5}).encode()
    return f"order-{n}".encode(), value, [("trace", f"t{n}".encode()), ("shop", b"eu")]


async def _produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes, list[tuple[str, bytes]]]],
                   partition: int | None = None, max_request_size: int = 1048576) -> list[tuple[int, int]]:
    """Send ``items`` (key, value, headers); returns (partition, offset) of each, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=max_request_size)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key, headers=headers, partition=partition)
                   for key, value, headers in items]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metadata]


def produce(topic: Topic, numbers: range) -> dict[int, tuple[int, int]]:
    """Produce orders ``numbers`` (the key picks the partition); returns n → (partition, offset)."""
    placed = asyncio.run(_produce(topic.bootstrap, topic.name, [_message(n) for n in numbers]))
    return dict(zip(numbers, placed, strict=True))


def committed(topic: Topic) -> dict[int, int | None]:
    return asyncio.run(committed_offsets(topic.bootstrap, topic.group, topic.name, PARTITIONS))


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture
def topic(kafka_broker: str) -> Topic:
    suffix = uuid.uuid4().hex[:12]
    created = Topic(kafka_broker, f"orders-{suffix}", f"bridge-{suffix}")
    asyncio.run(_create_topics(kafka_broker, created.name))
    return created


def write_config(workdir: Path, topic: Topic, *, dead_letter: str = "{file: dead-letters.jsonl}",
                 commit_interval_ms: int = 500) -> Path:
    text = CONFIG
    for name, value in {"bootstrap": topic.bootstrap, "topic": topic.name, "group": topic.group,
                        "dead_letter": dead_letter, "commit_interval_ms": str(commit_interval_ms)}.items():
        text = text.replace(f"<{name}>", value)
    path = workdir / "bridge.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def bridges(tmp_path: Path, iii_engine: TestEngine) -> Iterator[Callable[..., BridgeProcess]]:
    """Factory: a started `bridge up` (``dry_run=True``: `bridge up --dry-run`) on ``tmp_path/bridge.yaml`` (write
    it first); every one is killed after."""
    started: list[BridgeProcess] = []

    def start(*, dry_run: bool = False) -> BridgeProcess:
        proc = BridgeProcess(tmp_path / "bridge.yaml", iii_engine.url, extra_args=("--dry-run",) if dry_run else ())
        started.append(proc)
        proc.start()
        if not dry_run:
            proc.wait_for_log(r"connected to the iii engine")
        return proc

    yield start
    for proc in started:
        proc.kill()


def bind(consumer: Consumer, function_id: str, handler: Any = None) -> None:
    consumer.function(function_id, handler)
    consumer.bind("orders", function_id)


def assigned(proc: BridgeProcess) -> set[int]:
    """The partitions ``proc`` holds according to its log (its latest assignment since its latest revoke)."""
    held: set[int] = set()
    for line in proc.log().splitlines():
        found = re.search(r"partitions (assigned|revoked): (.*)$", line)
        if found is None:
            continue
        parts = {int(p) for p in re.findall(r"/(\d+)", found.group(2))}
        held = held | parts if found.group(1) == "assigned" else held - parts
    return held


def wait_count(consumer: Consumer, function_id: str, n: int, timeout: float) -> list[dict[str, Any]]:
    """Wait until ``function_id`` got at least ``n`` calls; returns calls(). Polls the count only: rebuilding
    thousands of payloads on every poll would take the GIL from the engine and consumer threads in this process."""
    wait_for(lambda: len(consumer.records(function_id)) >= n, timeout, f"{n} calls of {function_id}")
    return consumer.calls(function_id)


def by_partition(calls: list[dict[str, Any]]) -> dict[int, list[int]]:
    """Offsets received per partition, in arrival order."""
    out: dict[int, list[int]] = {}
    for call in calls:
        out.setdefault(call["partition"], []).append(call["offset"])
    return out


def dead_letters(workdir: Path, n: int, timeout: float = JOIN_S) -> list[dict[str, Any]]:
    path = workdir / "state" / "dead-letters.jsonl"
    wait_for(lambda: len(read_jsonl(path)) >= n, timeout, f"{n} dead letter(s)")
    return read_jsonl(path)


def iso(timestamp_ms: int) -> str:
    moment = datetime.fromtimestamp(timestamp_ms // 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{timestamp_ms % 1000:03d}Z"


# --- tests ---------------------------------------------------------------------------------------------------


def test_2000_keyed_messages_each_once_in_partition_order_with_every_template_field(
    tmp_path: Path, topic: Topic, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    write_config(tmp_path, topic)
    bridge = bridges()
    bind(consumer, "shop::on-order")
    placed = produce(topic, range(2000))
    assert {p for p, _ in placed.values()} == set(range(PARTITIONS)), "the keys should spread over 4 partitions"
    produced_ms = time.time() * 1000
    wait_count(consumer, "shop::on-order", 2000, timeout=60)
    time.sleep(0.5)  # nothing more arrives
    calls = consumer.calls("shop::on-order")
    assert len(calls) == 2000
    assert Counter(c["id"] for c in calls) == Counter(f"kafka:{topic.name}:{p}:{o}" for p, o in placed.values())
    per_partition = by_partition(calls)
    for partition, offsets in per_partition.items():
        assert offsets == sorted(offsets), f"partition {partition} arrived out of order"
        assert offsets == list(range(len(offsets)))
    for call in calls:
        n = call["n"]
        partition, offset = placed[n]
        assert (call["partition"], call["offset"]) == (partition, offset)
        assert call["key"] == f"order-{n}"
        assert call["trace"] == f"t{n}"
        assert call["headers"] == {"trace": f"t{n}", "shop": "eu"}
        assert call["where"] == f"{topic.name}/{partition}@{offset} key=order-{n}"
        assert isinstance(call["timestamp"], int) and abs(call["timestamp"] - produced_ms) < 60_000
        assert call["at"] == call["iso"] == iso(call["timestamp"])
    assert bridge.stop() == 0
    assert committed(topic) == {p: len(offsets) for p, offsets in per_partition.items()}


def test_kill_9_mid_stream_redelivers_only_what_was_not_committed(
    tmp_path: Path, topic: Topic, bridges: Callable[..., BridgeProcess], consumer: Consumer, iii_engine: TestEngine
) -> None:
    """Bound on duplicates: the restarted bridge resumes exactly at the committed offsets, so a message is
    delivered twice only if the first bridge had not committed it: it was in flight (at most one per partition
    with ordering partition) or finished after the last commit, which ran at most one commit interval (0.5 s)
    before the kill. So every duplicate's first delivery started within commit interval + 1 s of slack (commit
    round trip, scheduling on 2 busy cores) before the kill, and there are no more of them than calls started
    in that window."""
    interval_s = 0.5
    write_config(tmp_path, topic, commit_interval_ms=int(interval_s * 1000))

    async def slow(payload: Any) -> Any:
        await asyncio.sleep(0.001)  # a little slow: 5,000 messages take seconds, so the kill lands mid-stream
        return {"ok": True}

    bind(consumer, "shop::slow", slow)
    placed = produce(topic, range(5000))
    first = bridges()
    wait_count(consumer, "shop::slow", 1000, timeout=JOIN_S)
    killed_at = time.monotonic()
    first.kill()

    def routed_calls_arrived() -> bool:
        """Calls the engine had already routed still arrive; once it saw the bridge's connection close it routes
        no more, so the consumer must have every call the engine sent it."""
        bridge_gone = not any(w.connected for w in iii_engine.workers() if w.name != consumer.worker_name)
        sent = iii_engine.frames_of("invokefunction", direction="out", worker=consumer.worker_name)
        routed = sum(1 for frame in sent if frame.get("function_id") == "shop::slow")
        return bridge_gone and len(consumer.records("shop::slow")) >= routed

    wait_for(routed_calls_arrived, 10, "the calls the engine had routed to arrive")
    before = consumer.records("shop::slow")
    before_ids = {r.payload["id"] for r in before}
    assert len(before_ids) < 5000, "the kill should land mid-stream"
    after_kill = committed(topic)
    assert all(o is not None for o in after_kill.values()), f"nothing committed before the kill: {after_kill}"

    second = bridges()
    ends = Counter(p for p, _ in placed.values())
    expected = {f"kafka:{topic.name}:{p}:{o}" for p, o in placed.values()}
    rest = sum(end - (after_kill[p] or 0) for p, end in ends.items())
    wait_count(consumer, "shop::slow", len(before) + rest, timeout=60)
    wait_for(lambda: before_ids | {c["id"] for c in consumer.calls("shop::slow")} >= expected, 30,
             "every message delivered at least once")
    time.sleep(0.5)
    again = [r.payload for r in consumer.records("shop::slow")[len(before):]]
    # The second bridge starts each partition exactly at the committed offset and goes on in order. (Should the
    # group rebalance once more, when the killed member's session runs out, abandoned events come again.)
    rebalanced = "partitions revoked" in second.log()
    redelivered = by_partition(again)
    for partition, end in ends.items():
        start = after_kill[partition] or 0
        offsets = redelivered.get(partition, [])
        assert offsets[:1] == ([start] if start < end else []), f"partition {partition} (committed {start})"
        if rebalanced:
            assert sorted(set(offsets)) == list(range(start, end)), f"partition {partition} (committed {start})"
        else:
            assert offsets == list(range(start, end)), f"partition {partition} (committed {start})"
    duplicates = [r for r in before if r.payload["offset"] >= (after_kill[r.payload["partition"]] or 0)]
    assert {r.payload["id"] for r in duplicates} == before_ids & {c["id"] for c in again}
    window_start = killed_at - interval_s - 1.0
    late = [r for r in duplicates if r.at < window_start]
    assert not late, f"{len(late)} duplicate(s) had been delivered long before the kill: {late[:3]}"
    assert len(duplicates) <= sum(1 for r in before if r.at >= window_start)


def test_an_always_failing_function_is_dead_lettered_to_a_file_and_offsets_advance(
    tmp_path: Path, topic: Topic, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    def broken(payload: Any) -> Any:
        raise RuntimeError("warehouse is down")

    write_config(tmp_path, topic)
    bridge = bridges()
    bind(consumer, "shop::broken", broken)
    placed = produce(topic, range(40))
    records = dead_letters(tmp_path, 40)
    time.sleep(0.3)  # no more
    assert len(read_jsonl(tmp_path / "state" / "dead-letters.jsonl")) == 40
    assert sorted(r["event"]["id"] for r in records) == sorted(f"kafka:{topic.name}:{p}:{o}"
                                                               for p, o in placed.values())
    for record in records:
        n = record["event"]["value"]["n"]
        assert record["source"] == "orders"
        assert record["binding"]["function_id"] == "shop::broken"
        assert record["error"]["code"] == "invocation_failed"
        assert "warehouse is down" in record["error"]["message"]
        assert record["attempts"] == 2
        assert record["payload"]["key"] == f"order-{n}"
        assert record["event"]["key"] == f"order-{n}" and record["event"]["headers"]["trace"] == f"t{n}"
    assert len(consumer.calls("shop::broken")) == 80
    assert bridge.stop() == 0
    assert committed(topic) == dict(Counter(p for p, _ in placed.values()))


def test_an_always_failing_function_is_dead_lettered_to_a_kafka_topic_and_offsets_advance(
    tmp_path: Path, topic: Topic, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    dlq = f"{topic.name}-dlq"
    asyncio.run(_create_topics(topic.bootstrap, dlq))
    write_config(tmp_path, topic, dead_letter=f"{{kafka_topic: {dlq}}}")

    def broken(payload: Any) -> Any:
        raise RuntimeError("warehouse is down")

    bridge = bridges()
    bind(consumer, "shop::broken", broken)
    placed = produce(topic, range(40))
    messages = asyncio.run(read_topic(topic.bootstrap, dlq, 40, timeout_s=JOIN_S))
    assert len(messages) == 40
    seen: set[str] = set()
    for message in messages:
        record = json.loads(message.value)
        n = record["event"]["value"]["n"]
        assert message.key == f"order-{n}".encode()  # the original record's key
        assert dict(message.headers) == {"error_code": b"invocation_failed", "source": b"orders"}
        assert record["source"] == "orders"
        assert record["binding"]["function_id"] == "shop::broken"
        assert record["error"]["code"] == "invocation_failed"
        assert record["attempts"] == 2
        seen.add(record["event"]["id"])
    assert seen == {f"kafka:{topic.name}:{p}:{o}" for p, o in placed.values()}
    assert not (tmp_path / "state" / "dead-letters.jsonl").exists()
    assert bridge.stop() == 0
    assert committed(topic) == dict(Counter(p for p, _ in placed.values()))


def test_poison_messages_are_dead_lettered_without_a_binding_and_the_stream_goes_on(
    tmp_path: Path, topic: Topic, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    write_config(tmp_path, topic)
    bridge = bridges()
    bind(consumer, "shop::on-order")
    items = [_message(0), (b"bad-1", b"\x89PNG not json", []), _message(2), (b"bad-3", b"{truncated", []),
             _message(4), _message(5)]
    asyncio.run(_produce(topic.bootstrap, topic.name, items, partition=0))
    calls = wait_count(consumer, "shop::on-order", 4, timeout=JOIN_S)
    records = dead_letters(tmp_path, 2)
    assert [c["n"] for c in calls] == [0, 2, 4, 5]  # the good messages after each poison one arrive, in order
    assert [r["event"]["id"] for r in records] == [f"kafka:{topic.name}:0:1", f"kafka:{topic.name}:0:3"]
    for record, key in zip(records, ("bad-1", "bad-3"), strict=True):
        assert record["binding"] is None
        assert record["payload"] is None
        assert record["attempts"] == 0
        assert record["error"]["code"] == "decode_error"
        assert "value_format json" in record["error"]["message"]
        assert record["event"]["key"] == key
    assert bridge.stop() == 0
    assert committed(topic)[0] == 6


@pytest.mark.trigger_only("observe mode: the first owner delivers alone; see the README, Replicas")
def test_two_replicas_split_the_partitions_and_one_takes_over_without_loss(
    tmp_path: Path, topic: Topic, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    write_config(tmp_path, topic)
    bind(consumer, "shop::on-order")
    a, b = bridges(), bridges()
    # Each replica ends up with the binding (the engine replays it to the newest; reconcile catches the other up).
    a.wait_for_log(r"binding \S+ added: orders → shop::on-order", timeout=JOIN_S)
    b.wait_for_log(r"binding \S+ added: orders → shop::on-order", timeout=JOIN_S)
    wait_for(lambda: assigned(a) and assigned(b) and len(assigned(a) | assigned(b)) == PARTITIONS, 2 * JOIN_S,
             "the partitions split between both replicas")
    assert assigned(a).isdisjoint(assigned(b))
    placed = produce(topic, range(400))
    ids = {n: f"kafka:{topic.name}:{p}:{o}" for n, (p, o) in placed.items()}
    wait_count(consumer, "shop::on-order", 400, timeout=JOIN_S)
    time.sleep(0.5)
    records = consumer.records("shop::on-order")
    assert Counter(r.payload["id"] for r in records) == Counter(ids.values())  # each exactly once
    callers = Counter(r.payload["_caller_worker_id"] for r in records)
    assert len(callers) == 2, f"both replicas should deliver: {callers}"

    # A continued stream: half before the kill, half after it.
    placed = produce(topic, range(400, 600))
    a.kill()
    placed |= produce(topic, range(600, 800))
    ids |= {n: f"kafka:{topic.name}:{p}:{o}" for n, (p, o) in placed.items()}
    wanted = set(ids.values())
    wait_for(lambda: len(consumer.records("shop::on-order")) >= len(wanted)
             and {c["id"] for c in consumer.calls("shop::on-order")} >= wanted, 2 * JOIN_S,
             "every message delivered after the kill")
    wait_for(lambda: assigned(b) == set(range(PARTITIONS)), JOIN_S, "the survivor holding every partition")


def test_nothing_is_consumed_or_committed_until_a_function_is_bound(
    tmp_path: Path, topic: Topic, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    write_config(tmp_path, topic)
    bridge = bridges()
    bridge.wait_for_log(r"no function is bound; joining group")
    placed = produce(topic, range(40))
    time.sleep(2.0)  # four commit intervals
    assert committed(topic) == dict.fromkeys(range(PARTITIONS))
    assert "subscribed to" not in bridge.log()
    bind(consumer, "shop::late")
    wait_count(consumer, "shop::late", 40, timeout=JOIN_S)
    time.sleep(0.3)
    calls = consumer.calls("shop::late")
    ends = Counter(p for p, _ in placed.values())
    assert by_partition(calls) == {p: list(range(ends[p])) for p in ends}  # from the start: earliest
    assert bridge.stop() == 0
    assert committed(topic) == dict(ends)


def test_an_oversized_event_that_fails_is_dead_lettered_to_kafka_cut_to_fit_and_its_partition_goes_on(
    tmp_path: Path, topic: Topic, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    dlq = f"{topic.name}-dlq"
    asyncio.run(_create_topics(topic.bootstrap, dlq))
    write_config(tmp_path, topic, dead_letter=f"{{kafka_topic: {dlq}}}")

    def picky(payload: Any) -> Any:
        if payload["n"] == 0:
            raise RuntimeError("cannot take the big one")
        return {"ok": True}

    bridge = bridges()
    bind(consumer, "shop::picky", picky)
    big = json.dumps({"n": 0, "blob": "x" * 2_000_000}).encode()  # twice what a Kafka message may hold by default
    items = [(b"order-0", big, [("trace", b"t0")]), *(_message(n) for n in range(1, 6))]
    asyncio.run(_produce(topic.bootstrap, topic.name, items, partition=0, max_request_size=4 * len(big)))
    # Two attempts at the big one, its dead letter, then the rest of the partition (without the fix it stalled).
    calls = wait_count(consumer, "shop::picky", 7, timeout=JOIN_S)
    assert [c["n"] for c in calls] == [0, 0, 1, 2, 3, 4, 5]
    [message] = asyncio.run(read_topic(topic.bootstrap, dlq, 1, timeout_s=JOIN_S))
    assert len(message.value) < 1_000_000
    assert message.key == b"order-0"
    record = json.loads(message.value)
    assert record["truncated"] == ["event.value"]
    assert record["event"]["value"] == {"truncated": True, "original_bytes": len(big),
                                        "sha256": hashlib.sha256(big).hexdigest()}
    assert (record["event"]["id"], record["event"]["partition"], record["event"]["offset"]) == (
        f"kafka:{topic.name}:0:0", 0, 0)
    assert record["event"]["key"] == "order-0" and record["event"]["headers"] == {"trace": "t0"}
    assert record["binding"]["function_id"] == "shop::picky" and record["payload"]["n"] == 0
    assert record["error"]["code"] == "invocation_failed" and "cannot take the big one" in record["error"]["message"]
    assert re.search(rf"dead letter of event kafka:{re.escape(topic.name)}:0:0: event.value cut", bridge.log())
    assert bridge.stop() == 0
    assert committed(topic)[0] == 6


def test_a_dry_run_beside_a_live_bridge_prints_what_is_not_committed_and_takes_nothing(
    tmp_path: Path, topic: Topic, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    write_config(tmp_path, topic)
    live = bridges()
    consumer.function("shop::on-order")
    binding = consumer.bind("orders", "shop::on-order")
    first = produce(topic, range(40))
    wait_count(consumer, "shop::on-order", 40, timeout=JOIN_S)
    ends = Counter(p for p, _ in first.values())
    wait_for(lambda: committed(topic) == dict(ends), JOIN_S, "the live bridge committing all it delivered")
    # Unbound, the live bridge stays in the group with its partitions paused: what comes now waits for it.
    binding.unregister()
    live.wait_for_log(r"no function is bound any more", timeout=JOIN_S)
    later = produce(topic, range(40, 60))
    later_ids = sorted(f"kafka:{topic.name}:{p}:{o}" for p, o in later.values())

    dry = bridges(dry_run=True)
    dry.wait_for_log(rf"dry run: reading .* without joining group {topic.group} or committing", timeout=JOIN_S)
    wait_for(lambda: len(dry.stdout().splitlines()) >= 20, JOIN_S, "the dry run printing 20 payloads")
    assert dry.stop() == 0
    printed = [json.loads(line) for line in dry.stdout().splitlines()]
    assert sorted(p["payload"]["id"] for p in printed) == later_ids
    assert {p["function_id"] for p in printed} == {"dry-run::orders"}
    assert committed(topic) == dict(ends)
    assert "partitions revoked" not in live.log()

    # Nothing the dry run showed is lost for the live bridge.
    consumer.bind("orders", "shop::on-order")
    calls = wait_count(consumer, "shop::on-order", 60, timeout=JOIN_S)
    assert sorted(c["id"] for c in calls[40:]) == later_ids
    assert live.stop() == 0
    assert committed(topic) == dict(Counter(p for p, _ in (first | later).values()))
