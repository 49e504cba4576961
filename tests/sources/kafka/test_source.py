"""The kafka source against a real Kafka-protocol broker (Tansu, or BRIDGE_TEST_KAFKA), with an in-memory Sink
(MemorySink) standing in for the runtime. Every test uses its own topic (4 partitions) and consumer group."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge._clock import iso_ms
from bridge.config import DeadLetterConfig, DeliveryConfig, SourceConfig
from bridge.errors import DeadLetterError, DecodeError
from bridge.sources import Event
from bridge.sources.kafka._conn import consumer_options
from bridge.sources.kafka._deadletter import MAX_REQUEST_BYTES, fit_record, truncation_marker
from bridge.sources.kafka._decode import decode, record_event
from bridge.sources.kafka._flow import Shares
from bridge.sources.kafka._offsets import PartitionTrack
from bridge.sources.kafka.source import KafkaDeadLetter, KafkaSource, connection_options, kafka_dead_letter
from bridge.sources.kafka.spec import KafkaSecurity, KafkaSourceConfig
from bridge.testing.sink import MemorySink, stop_source
from bridge.testing.sink import running as run_source
from tests.support.configs import source_config
from tests.support.logwatch import watch_log
from tests.support.services import committed_offsets, read_topic

PARTITIONS = 4
GROUP_TIMINGS = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500, "rebalance_timeout_ms": 3000}
STOP_S = 20.0  # a cancelled source leaves its group and commits: within this
JOIN_S = 15.0  # bound on waits that include a group join or a rebalance (Tansu takes seconds)


def new_sink(*, bound: bool = True, window: int = 1000, hold: Callable[[Event], bool] | None = None) -> MemorySink:
    """The runtime stand-in: events for which ``hold`` is true stay in flight until ``sink.ack``; ``wait_for``
    allows for a group join by default."""
    return MemorySink(bound=bound, window=window, hold=hold or False, wait_timeout_s=JOIN_S)


def by_partition(sink: MemorySink) -> dict[int, list[int]]:
    """The offsets delivered per partition, in delivery order."""
    out: dict[int, list[int]] = {}
    for e in sink.events:
        out.setdefault(e.fields["partition"], []).append(e.fields["offset"])
    return out


async def wait_until(check: Callable[[], bool], timeout: float, what: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s: {what()}")
        await asyncio.sleep(0.02)


# --- broker helpers ------------------------------------------------------------------------------------------


async def create_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()


@pytest.fixture
async def topic(kafka_broker: str) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    await create_topic(kafka_broker, name)
    return name


def make_config(bootstrap: str, topic: str, *, source_id: str = "orders", max_in_flight: int = 64,
                **kw: Any) -> SourceConfig:
    kw.setdefault("group_id", f"g-{uuid.uuid4().hex[:12]}")
    kw.setdefault("commit_interval_ms", 200)
    kw["client_options"] = {**GROUP_TIMINGS, **kw.get("client_options", {})}
    kc = KafkaSourceConfig(bootstrap_servers=bootstrap, topics=(topic,), **kw)
    return source_config(source_id, kc, max_in_flight=max_in_flight)


def group_of(config: SourceConfig) -> str:
    assert isinstance(config.kind_config, KafkaSourceConfig) and config.kind_config.group_id
    return config.kind_config.group_id


Message = tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]  # partition, key, value, headers


async def produce(bootstrap: str, topic: str, messages: list[Message]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, partition=partition, headers=headers)
            for partition, key, value, headers in messages
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def orders(count: int) -> list[Message]:
    """Keyed JSON orders spread round-robin over the partitions."""
    return [
        (i % PARTITIONS, f"order-{i}".encode(), json.dumps({"n": i, "total": i * 1.5}).encode(),
         [("trace", f"t{i}".encode())])
        for i in range(count)
    ]


async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    return await committed_offsets(bootstrap, group, topic, PARTITIONS)


def running(source: KafkaSource, sink: MemorySink) -> contextlib.AbstractAsyncContextManager[asyncio.Task[None]]:
    return run_source(source, sink, stop_timeout_s=STOP_S)


async def stop(task: asyncio.Task[None]) -> None:
    await stop_source(task, STOP_S)


def source_for(config: SourceConfig, tmp_path: Any, grace_s: float = 0.5, *, dry_run: bool = False) -> KafkaSource:
    return KafkaSource(config, tmp_path, shutdown_grace_s=grace_s, dry_run=dry_run)


# --- events ---------------------------------------------------------------------------------------------------


async def test_keyed_json_over_four_partitions_each_once_in_partition_order(kafka_broker: str, topic: str,
                                                                           tmp_path: Any) -> None:
    messages = orders(40)
    await produce(kafka_broker, topic, messages)
    sink = new_sink()
    config = make_config(kafka_broker, topic)
    async with running(source_for(config, tmp_path), sink):
        await sink.wait_for(40)
        await asyncio.sleep(0.3)  # nothing more arrives
    assert len(sink.events) == 40
    assert len(set(sink.ids())) == 40
    assert {p: offsets for p, offsets in by_partition(sink).items()} == {p: list(range(10)) for p in range(4)}
    event = next(e for e in sink.events if e.fields["partition"] == 2 and e.fields["offset"] == 3)
    assert event.id == f"kafka:{topic}:2:3"
    assert event.source == "orders"
    assert event.error is None
    assert event.order_key == (topic, 2)
    fields = dict(event.fields)
    timestamp, iso = fields.pop("timestamp"), fields.pop("timestamp_iso")
    assert fields == {"topic": topic, "partition": 2, "offset": 3, "key": "order-14",
                      "value": {"n": 14, "total": 21.0}, "headers": {"trace": "t14"}}
    assert abs(timestamp - time.time() * 1000) < 60_000
    assert iso == iso_ms(timestamp) and iso.endswith("Z") and len(iso) == len("2024-01-01T00:00:00.000Z")


async def test_bytes_and_text_formats_and_null_key_and_value(kafka_broker: str, topic: str, tmp_path: Any) -> None:
    raw_key, raw_value = b"\x00\xffkey", b"\x01\x02\xfe"
    await produce(kafka_broker, topic, [
        (0, raw_key, raw_value, [("bin", b"\xff ok")]),
        (0, None, b"AA==", []),
        (0, b"gone", None, []),
    ])
    sink = new_sink()
    config = make_config(kafka_broker, topic, key_format="bytes", value_format="bytes", ordering="key")
    async with running(source_for(config, tmp_path), sink):
        first, keyless, tombstone = await sink.wait_for(3)
    assert first.error is None
    assert first.fields["key"] == base64.b64encode(raw_key).decode()
    assert first.fields["value"] == base64.b64encode(raw_value).decode()
    assert first.fields["headers"] == {"bin": "\ufffd ok"}
    assert first.order_key == (topic, 0, raw_key)
    assert keyless.error is None
    assert (keyless.fields["key"], keyless.fields["value"], keyless.fields["headers"]) == (None, "QUE9PQ==", {})
    assert keyless.order_key == (topic, 0)  # a null key falls back to the partition
    assert tombstone.error is None
    assert (tombstone.fields["key"], tombstone.fields["value"]) == (base64.b64encode(b"gone").decode(), None)


async def test_a_record_larger_than_the_default_partition_fetch_size_is_delivered(kafka_broker: str, topic: str,
                                                                                   tmp_path: Any) -> None:
    # The bridge fetches at most 256 KiB per partition by default (memory stays flat whatever the backlog); a
    # larger record still comes, alone in its fetch, and the records after it too.
    big = json.dumps({"blob": "x" * 400_000}).encode()
    await produce(kafka_broker, topic, [(2, b"small", b"1", []), (2, b"big", big, []), (2, b"after", b"2", [])])
    sink = new_sink()
    config = make_config(kafka_broker, topic)
    assert isinstance(config.kind_config, KafkaSourceConfig)
    options = consumer_options(config.kind_config)
    assert (options["fetch_max_bytes"], options["max_partition_fetch_bytes"]) == (1024 * 1024, 256 * 1024)
    async with running(source_for(config, tmp_path), sink):
        events = await sink.wait_for(3)
    assert [e.fields["key"] for e in events] == ["small", "big", "after"]
    assert len(events[1].fields["value"]["blob"]) == 400_000
    chosen = dataclasses.replace(config.kind_config, client_options={"max_partition_fetch_bytes": 4096})
    assert consumer_options(chosen)["max_partition_fetch_bytes"] == 4096  # client_options win


async def test_json_key_text_value_ordering_none_and_topic_pattern(kafka_broker: str, topic: str,
                                                                   tmp_path: Any) -> None:
    await produce(kafka_broker, topic, [(1, b'{"id": 7}', "héllo".encode(), [])])
    sink = new_sink()
    config = make_config(kafka_broker, topic, key_format="json", value_format="text", ordering="none")
    assert isinstance(config.kind_config, KafkaSourceConfig)
    by_pattern = dataclasses.replace(config.kind_config, topics=(), topic_pattern=re.escape(topic) + "$")
    config = dataclasses.replace(config, kind_config=by_pattern)
    async with running(source_for(config, tmp_path), sink):
        [event] = await sink.wait_for(1)
    assert (event.fields["key"], event.fields["value"], event.order_key) == ({"id": 7}, "héllo", None)


def test_decoding_each_format() -> None:
    assert decode(b'{"a": [1, 2]}', "json") == ({"a": [1, 2]}, None)
    assert decode(b"plain", "text") == ("plain", None)
    assert decode(b"\x00\x01", "bytes") == ("AAE=", None)
    assert decode(None, "json") == (None, None)
    # Undecodable: the raw text comes back with the reason (None when the bytes are not UTF-8 text).
    assert decode(b"NaN", "json") == ("NaN", "not valid JSON (NaN is not JSON)")
    assert decode(b"\xff", "text") == (None, "not UTF-8: invalid start byte at byte 0")
    assert decode(b"\xff", "json") == (None, "not valid JSON (not UTF-8: invalid start byte at byte 0)")
    assert decode(b"[" * 100_000, "json") == ("[" * 100_000, "not valid JSON (nested deeper than 512 levels)")
    assert decode(b"[" * 900 + b"]" * 900, "json")[1] == "not valid JSON (nested deeper than 512 levels)"
    assert decode(b"[" * 512 + b"]" * 512, "json")[1] is None
    assert decode(b"[1e400]", "json")[1] == "not valid JSON (number 1e400 is beyond a double's range)"
    assert decode(b'"\\ud800"', "json")[1] == "not valid JSON (lone surrogate \\ud800 at character 1)"
    assert decode(b"", "json") == ("", "not valid JSON (Expecting value at line 1 column 1)")
    assert decode(b"", "text") == ("", None)
    assert iso_ms(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert iso_ms(2**62) is None  # a producer may set any timestamp


@dataclasses.dataclass
class _Record:
    key: bytes | None
    value: bytes | None
    topic: str = "t"
    partition: int = 0
    offset: int = 7
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: int = 1_700_000_000_000


@pytest.mark.parametrize(
    ("key", "value", "fields", "said"),
    [
        (b"k", b"[" * 900 + b"]" * 900, {"key": "k", "value": "[" * 900 + "]" * 900},
         ["value is not valid JSON (nested deeper than 512 levels) for value_format json; "
          "event.value holds the raw value as text"]),
        (b"k", b"\xffNaN", {"key": "k", "value": None, "raw_b64": "/05hTg=="},
         ["event.raw_b64 holds the raw value as base64"]),
        (b"\xfe", b"{}", {"key": None, "value": {}, "key_raw_b64": "/g=="},
         ["key is not UTF-8: invalid start byte at byte 0 for key_format text; "
          "event.key_raw_b64 holds the raw key as base64"]),
        (b"\xfe", b"", {"key": None, "value": "", "key_raw_b64": "/g=="},
         ["event.key_raw_b64 holds the raw key as base64", "event.value holds the raw value as text"]),
    ],
)
def test_an_undecodable_record_carries_its_raw_content(key: bytes, value: bytes, fields: dict[str, Any],
                                                       said: list[str]) -> None:
    config = make_config("127.0.0.1:9", "t", key_format="text")
    assert isinstance(config.kind_config, KafkaSourceConfig)
    event = record_event("orders", config.kind_config, _Record(key, value))
    assert isinstance(event.error, DecodeError)
    assert str(event.error).startswith("kafka record t/0@7: ")
    assert all(part in str(event.error) for part in said), str(event.error)
    assert {k: event.fields[k] for k in ("key", "value", "raw_b64", "key_raw_b64") if k in event.fields} == fields
    json.dumps(event.template_view(), ensure_ascii=False).encode()  # the dead-letter record can hold it


def test_partition_track_position_never_passes_an_undone_offset() -> None:
    class Rec:
        def __init__(self, offset: int) -> None:
            self.offset = offset

    track = PartitionTrack("t", 0)
    assert track.position() is None
    track.add_fetched([Rec(5), Rec(6), Rec(7), Rec(8)])
    assert track.position() == 5
    five, six, seven = track.take(), track.take(), track.take()
    track.done(six.offset)
    track.done(seven.offset)
    assert track.position() == 5 and track.undone == 1 and track.outstanding == 2
    track.done(five.offset)
    assert track.position() == 8  # the buffered record is not done either
    track.done(five.offset)  # a second acknowledgement changes nothing
    assert track.undone == 0
    eight = track.take()
    track.untake(eight)
    assert track.drop_buffer() == 1 and track.position() == 8
    assert track.commit_due() == 8
    track.committed = 8
    assert track.commit_due() is None


def test_a_partition_at_its_cap_is_polled_again_once_half_its_buffer_allowance_is_free() -> None:
    class Rec:
        def __init__(self, offset: int) -> None:
            self.offset = offset

    shares = Shares(8, "partition")  # 4 assigned partitions: a share of 2, allowance 256, cap 258
    assigned = [TopicPartition("t", p) for p in range(4)]
    track = PartitionTrack("t", 0)
    track.add_fetched([Rec(o) for o in range(131)])
    parts = {track.key: track}
    assert shares.share(4, 1) == 2
    assert shares.free_room(131, 4, 1) == (127, False)
    assert shares.free_room(130, 4, 1) == (128, True)
    assert shares.fetchable(assigned, parts) == (assigned[1:], 258, True)
    first = track.take()
    assert not shares.pollable_again(track, parts, 4)  # still 131 outstanding: no reason to wake the fetch loop
    track.done(first.offset)
    assert shares.pollable_again(track, parts, 4)  # 130: half the allowance is free, as fetchable says too
    assert shares.fetchable(assigned, parts) == (assigned, 128, False)
    # Ordering none: a partition that runs empty enlarges the others' shares, so the fetch loop looks again.
    track = PartitionTrack("t", 1)
    track.add_fetched([Rec(0)])
    track.done(track.take().offset)
    assert Shares(64, "none").pollable_again(track, {track.key: track}, 4)


async def test_poison_value_becomes_an_error_event_and_the_stream_goes_on(kafka_broker: str, topic: str,
                                                                         tmp_path: Any, caplog: Any) -> None:
    await produce(kafka_broker, topic, [
        (0, b"a", b'{"ok": 1}', []),
        (0, b"b", b"\x89PNG not json", []),
        (0, b"c", b'{"ok": 3}', []),
    ])
    sink = new_sink()
    config = make_config(kafka_broker, topic)
    source = source_for(config, tmp_path)
    with caplog.at_level(logging.WARNING, logger="bridge.sources.kafka"):
        async with running(source, sink):
            events = await sink.wait_for(3)
            await wait_until(lambda: source.committed_positions().get((topic, 0)) == 3, 5,
                             lambda: str(source.committed_positions()))
    good, poison, after = events
    assert good.error is None and after.error is None and after.fields["value"] == {"ok": 3}
    assert isinstance(poison.error, DecodeError)
    message = str(poison.error)
    assert f"{topic}/0@1" in message and "value_format json" in message and "not valid JSON" in message
    assert "event.raw_b64 holds the raw value as base64" in message
    assert poison.fields["value"] is None  # not UTF-8: the raw bytes are in raw_b64
    assert poison.fields["raw_b64"] == base64.b64encode(b"\x89PNG not json").decode()
    assert poison.fields["key"] == "b"
    assert any(r.levelno == logging.WARNING and f"{topic}/0@1" in r.getMessage() for r in caplog.records)


# --- commits --------------------------------------------------------------------------------------------------


async def test_commits_never_pass_an_event_that_is_not_done(kafka_broker: str, topic: str, tmp_path: Any) -> None:
    await produce(kafka_broker, topic, orders(20))  # 5 per partition
    held_id = f"kafka:{topic}:0:2"
    sink = new_sink(hold=lambda e: e.id == held_id)
    config = make_config(kafka_broker, topic, ordering="none")
    source = source_for(config, tmp_path)
    async with running(source, sink):
        await sink.wait_for(20)
        expected = {0: 2, 1: 5, 2: 5, 3: 5}
        await wait_until(lambda: source.committed_positions() == {(topic, p): o for p, o in expected.items()}, 5,
                         lambda: str(source.committed_positions()))
        await asyncio.sleep(0.5)  # several commit intervals: still held back by the undone event
        assert await committed(kafka_broker, group_of(config), topic) == expected
        assert source.lag() == {(topic, 0): 3, (topic, 1): 0, (topic, 2): 0, (topic, 3): 0}
        await sink.ack(held_id)
        await wait_until(lambda: source.committed_positions().get((topic, 0)) == 5, 5)
        assert await committed(kafka_broker, group_of(config), topic) == {0: 5, 1: 5, 2: 5, 3: 5}
        assert source.lag() == {(topic, p): 0 for p in range(4)}


async def test_no_bindings_no_consumption_then_delivery_from_the_start(kafka_broker: str, topic: str,
                                                                      tmp_path: Any) -> None:
    await produce(kafka_broker, topic, orders(8))
    sink = new_sink(bound=False)
    config = make_config(kafka_broker, topic)
    source = source_for(config, tmp_path)
    async with running(source, sink):
        await asyncio.sleep(1.0)
        assert sink.events == []
        assert await committed(kafka_broker, group_of(config), topic) == dict.fromkeys(range(4))
        sink.bind()
        await sink.wait_for(8)
        assert sorted(e.fields["offset"] for e in sink.events) == [0, 0, 0, 0, 1, 1, 1, 1]
        # The last binding goes: partitions are paused, nothing new is submitted.
        await wait_until(lambda: len(source.committed_positions()) == 4, 5)
        with watch_log("bridge.sources.kafka", r"no function is bound any more; partitions paused") as paused:
            sink.unbind()
            await wait_until(lambda: paused.seen > 0, 5, lambda: "the partitions paused")
        await produce(kafka_broker, topic, orders(4))
        await asyncio.sleep(1.0)
        assert len(sink.events) == 8
        assert source.committed_positions() == {(topic, p): 2 for p in range(4)}
        sink.bind()
        await sink.wait_for(12)


async def test_a_restarted_source_resumes_from_committed_and_redelivers_only_unacked(
        kafka_broker: str, topic: str, tmp_path: Any) -> None:
    await produce(kafka_broker, topic, orders(40))  # offsets 0..9 per partition
    unacked = {f"kafka:{topic}:0:{o}" for o in (7, 8, 9)}
    # Tansu numbers the first generation 0, for which aiokafka sends no LeaveGroup: the next member waits for the
    # first one's session to expire, so a shorter session keeps this test short.
    config = make_config(kafka_broker, topic, client_options={"session_timeout_ms": 1500, "rebalance_timeout_ms": 1500})
    first = new_sink(hold=lambda e: e.id in unacked)
    source = source_for(config, tmp_path, grace_s=0.2)
    async with running(source, first):
        await first.wait_for(40)
        await wait_until(lambda: source.committed_positions().get((topic, 1)) == 10, 5)
    assert source.committed_positions() == {(topic, 0): 7, (topic, 1): 10, (topic, 2): 10, (topic, 3): 10}
    await produce(kafka_broker, topic, [(3, b"late", b'{"late": true}', [])])
    second = new_sink()
    async with running(source_for(config, tmp_path), second):
        await second.wait_for(4)
        await asyncio.sleep(0.5)
    assert sorted(second.ids()) == sorted([*unacked, f"kafka:{topic}:3:10"])


async def test_a_slow_partition_does_not_block_the_others(kafka_broker: str, topic: str, tmp_path: Any) -> None:
    await produce(kafka_broker, topic, orders(200) + [(0, b"more", b"{}", [])] * 1000)  # 1050 in partition 0
    sink = new_sink(window=8, hold=lambda e: e.fields["partition"] == 0)
    source = source_for(make_config(kafka_broker, topic, max_in_flight=8), tmp_path)
    async with running(source, sink):
        await wait_until(lambda: sum(len(v) for p, v in by_partition(sink).items() if p) == 150, JOIN_S,
                         lambda: str({p: len(v) for p, v in by_partition(sink).items()}))
        await asyncio.sleep(0.3)
        assert len(sink.held) == 8 // 4  # partition 0 keeps its share of the window, no more
        assert 0 < source.outstanding()[(topic, 0)] <= 2 + 256  # and a bounded buffer
        sink.hold = lambda e: False
        for event, _ in list(sink.held):
            await sink.ack(event.id)
        await sink.wait_for(1200)
    assert by_partition(sink) == {0: list(range(1050)), 1: list(range(50)), 2: list(range(50)), 3: list(range(50))}


async def test_start_from_latest_skips_what_was_there(kafka_broker: str, topic: str, tmp_path: Any) -> None:
    await produce(kafka_broker, topic, orders(4))
    sink = new_sink()
    source = source_for(make_config(kafka_broker, topic, start_from="latest"), tmp_path)
    async with running(source, sink):
        await wait_until(lambda: len(source.assigned()) == 4, JOIN_S)
        # The reset to the end follows the assignment and shows nowhere outside the consumer: add a record to
        # every partition until one came through from each. A record added before the reset is skipped like the
        # first four, so a partition's first delivered offset is 1 unless the reset was slow, never 0.
        rounds, deadline = 0, time.monotonic() + JOIN_S
        while set(by_partition(sink)) != set(range(4)):
            assert time.monotonic() < deadline, f"no new record delivered from some partition: {by_partition(sink)}"
            await produce(kafka_broker, topic, [(p, b"new", b'{"new": true}', []) for p in range(4)])
            rounds += 1
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: set(by_partition(sink)) == set(range(4)), 1.0)
        await asyncio.sleep(0.3)  # nothing more arrives
    delivered = by_partition(sink)
    # From its first delivered record on, a partition gets every one produced, once, in order.
    expected = {p: list(range(offsets[0], rounds + 1)) for p, offsets in delivered.items()}
    assert delivered == expected and all(offsets[0] > 0 for offsets in delivered.values()), (rounds, delivered)


# --- connections and security ---------------------------------------------------------------------------------


async def test_an_unreachable_broker_makes_run_raise_for_the_supervisor(tmp_path: Any, caplog: Any) -> None:
    from aiokafka.errors import KafkaConnectionError

    config = make_config("127.0.0.1:1", "orders", client_options={"request_timeout_ms": 2000})
    with caplog.at_level(logging.ERROR, logger="bridge.sources.kafka"), pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(source_for(config, tmp_path).run(new_sink()), 15)
    # The probe after the failed bootstrap names the step that failed: here the TCP connect.
    assert any("127.0.0.1:1: cannot connect (" in r.getMessage() and "the broker runs and is reachable" in
               r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_sasl_credentials_reach_the_broker_and_never_the_logs(kafka_broker: str, topic: str, tmp_path: Any,
                                                                    caplog: Any) -> None:
    from aiokafka.errors import KafkaError

    security = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", username="svc",
                             password="pa55-w0rd-do-not-log")
    config = make_config(kafka_broker, topic, security=security, client_options={"request_timeout_ms": 2000})
    assert isinstance(config.kind_config, KafkaSourceConfig)
    options = connection_options(config.kind_config)
    assert {k: options[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username")} == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "svc"}
    with caplog.at_level(logging.DEBUG), pytest.raises(KafkaError):
        # The test broker has no SASL: the handshake is refused, which shows the credentials were offered.
        await asyncio.wait_for(source_for(config, tmp_path).run(new_sink()), 15)
    assert caplog.records
    assert not any("pa55-w0rd-do-not-log" in r.getMessage() for r in caplog.records)


def test_connection_options_per_protocol() -> None:
    plain = connection_options(KafkaSourceConfig(bootstrap_servers="a:1,b:2"))
    assert plain == {"bootstrap_servers": "a:1,b:2", "security_protocol": "PLAINTEXT"}
    default_mechanism = connection_options(KafkaSourceConfig(
        bootstrap_servers="a:1", security=KafkaSecurity(protocol="SASL_SSL", username="u", password="p")))
    assert default_mechanism["sasl_mechanism"] == "PLAIN"
    assert isinstance(default_mechanism["ssl_context"], ssl.SSLContext)
    certifi = pytest.importorskip("certifi")
    tls = connection_options(KafkaSourceConfig(
        bootstrap_servers="a:1", security=KafkaSecurity(protocol="SSL", ca_file=Path(certifi.where()))))
    assert isinstance(tls["ssl_context"], ssl.SSLContext) and "sasl_mechanism" not in tls
    assert tls["ssl_context"].cert_store_stats()["x509_ca"] > 0


# --- groups ---------------------------------------------------------------------------------------------------


async def test_two_sources_split_partitions_and_one_takes_over_without_loss(kafka_broker: str, topic: str,
                                                                           tmp_path: Any) -> None:
    config = make_config(kafka_broker, topic, commit_interval_ms=60_000)  # commits only on revoke and shutdown
    sink_a, sink_b = new_sink(), new_sink()
    source_a, source_b = source_for(config, tmp_path), source_for(config, tmp_path)

    def delivered() -> set[str]:
        return set(sink_a.ids()) | set(sink_b.ids())

    await produce(kafka_broker, topic, orders(40))
    task_a = asyncio.create_task(source_a.run(sink_a))
    task_b: asyncio.Task[None] | None = None
    try:
        await sink_a.wait_for(40)
        # A second member joins: A's partitions are revoked (what is done is committed) and split.
        task_b = asyncio.create_task(source_b.run(sink_b))
        await wait_until(lambda: bool(source_a.assigned()) and bool(source_b.assigned()), 2 * JOIN_S,
                         lambda: f"{source_a.assigned()} / {source_b.assigned()}")
        assert source_a.assigned().isdisjoint(source_b.assigned())
        await produce(kafka_broker, topic, orders(40))
        await wait_until(lambda: len(delivered()) == 80, JOIN_S)
        # A committed what it had done when its partitions were revoked: B starts after it, redelivering nothing.
        assert sorted(e.fields["offset"] for e in sink_b.events) == [o for o in range(10, 20) for _ in range(2)]
        await stop(task_b)
        await produce(kafka_broker, topic, orders(40))
        await wait_until(lambda: len(delivered()) == 120, 2 * JOIN_S, lambda: f"{len(delivered())} of 120")
        await wait_until(lambda: len(source_a.assigned()) == 4, JOIN_S)
    finally:
        if task_b is not None:
            await stop(task_b)
        await stop(task_a)
    assert delivered() == {f"kafka:{topic}:{p}:{o}" for p in range(4) for o in range(30)}
    assert await committed(kafka_broker, group_of(config), topic) == dict.fromkeys(range(4), 30)


async def test_an_event_abandoned_at_a_revoke_commits_nothing_when_it_finishes(kafka_broker: str, topic: str,
                                                                             tmp_path: Any) -> None:
    held_id = f"kafka:{topic}:0:0"
    config = make_config(kafka_broker, topic, client_options={"metadata_max_age_ms": 300})
    assert isinstance(config.kind_config, KafkaSourceConfig)
    by_pattern = dataclasses.replace(config.kind_config, topics=(), topic_pattern=re.escape(topic) + "(-more)?$")
    config = dataclasses.replace(config, kind_config=by_pattern)
    sink = new_sink(hold=lambda e: e.id == held_id)
    source = source_for(config, tmp_path)
    await produce(kafka_broker, topic, orders(8))
    async with running(source, sink):
        await sink.wait_for(8)
        await wait_until(lambda: source.committed_positions().get((topic, 1)) == 2, 5)
        # A new matching topic makes the lone member rebalance: every partition is revoked and assigned again,
        # and partition 0 comes back from its committed offset 0.
        await create_topic(kafka_broker, f"{topic}-more")
        await wait_until(lambda: sink.ids().count(held_id) == 2, 2 * JOIN_S)
        await sink.ack(held_id)  # the delivery abandoned at the revoke
        await asyncio.sleep(0.6)
        assert source.committed_positions()[(topic, 0)] == 0
        assert (await committed(kafka_broker, group_of(config), topic))[0] == 0
        await sink.ack(held_id)  # the current delivery
        await wait_until(lambda: source.committed_positions()[(topic, 0)] == 2, 5)


# --- dry runs -------------------------------------------------------------------------------------------------


async def test_a_dry_run_reads_from_the_committed_offsets_and_commits_nothing(kafka_broker: str, topic: str,
                                                                             tmp_path: Any, caplog: Any) -> None:
    config = make_config(kafka_broker, topic)
    await produce(kafka_broker, topic, orders(20))  # offsets 0..4 of each partition
    live = source_for(config, tmp_path)
    async with running(live, new_sink()):
        await wait_until(lambda: live.committed_positions() == {(topic, p): 5 for p in range(4)}, JOIN_S,
                         lambda: str(live.committed_positions()))
    await produce(kafka_broker, topic, orders(20))  # offsets 5..9
    assert await committed(kafka_broker, group_of(config), topic) == dict.fromkeys(range(4), 5)
    sink = new_sink()
    dry = source_for(config, tmp_path, dry_run=True)
    with caplog.at_level(logging.INFO, logger="bridge.sources.kafka"):
        async with running(dry, sink):
            await sink.exactly(20)  # quiet for longer than a commit interval
    assert by_partition(sink) == {p: list(range(5, 10)) for p in range(4)}
    assert dry.committed_positions() == {}
    assert await committed(kafka_broker, group_of(config), topic) == dict.fromkeys(range(4), 5)
    assert any(f"without joining group {group_of(config)} or committing" in r.getMessage() for r in caplog.records)


async def test_a_dry_run_beside_a_live_member_takes_none_of_its_partitions(kafka_broker: str, topic: str,
                                                                          tmp_path: Any, caplog: Any) -> None:
    config = make_config(kafka_broker, topic)
    await produce(kafka_broker, topic, orders(8))
    # The live member holds what comes later, so the group's offsets stay where the dry run starts from.
    live_sink = new_sink(hold=lambda e: e.fields["offset"] >= 2)
    live, dry, dry_sink = source_for(config, tmp_path), source_for(config, tmp_path, dry_run=True), new_sink()
    with caplog.at_level(logging.INFO, logger="bridge.sources.kafka"):
        async with running(live, live_sink):
            await live_sink.wait_for(8)
            await wait_until(lambda: live.committed_positions() == {(topic, p): 2 for p in range(4)}, 5)
            async with running(dry, dry_sink):
                await wait_until(lambda: len(dry.assigned()) == 4, JOIN_S)
                await produce(kafka_broker, topic, orders(8))
                await dry_sink.exactly(8)
                await live_sink.wait_for(16)
                assert live.assigned() == {(topic, p) for p in range(4)}
            await live_sink.ack_all()
            await wait_until(lambda: live.committed_positions() == {(topic, p): 4 for p in range(4)}, 5)
    assert sorted(dry_sink.ids()) == sorted(f"kafka:{topic}:{p}:{o}" for p in range(4) for o in (2, 3))
    assert not [r.getMessage() for r in caplog.records if "partitions revoked" in r.getMessage()]
    assert await committed(kafka_broker, group_of(config), topic) == dict.fromkeys(range(4), 4)


async def test_a_dry_run_follows_pattern_topics_created_while_it_runs(kafka_broker: str, topic: str,
                                                                     tmp_path: Any) -> None:
    config = make_config(kafka_broker, topic, client_options={"metadata_max_age_ms": 300})
    assert isinstance(config.kind_config, KafkaSourceConfig)
    by_pattern = dataclasses.replace(config.kind_config, topics=(), topic_pattern=re.escape(topic) + "(-more)?$")
    config = dataclasses.replace(config, kind_config=by_pattern)
    await produce(kafka_broker, topic, orders(8))
    sink = new_sink()
    dry = source_for(config, tmp_path, dry_run=True)
    async with running(dry, sink):
        await sink.wait_for(8)  # the group has no offsets: start_from earliest
        await create_topic(kafka_broker, f"{topic}-more")
        await wait_until(lambda: len(dry.assigned()) == 8, JOIN_S, lambda: str(dry.assigned()))
        await produce(kafka_broker, f"{topic}-more", orders(4))
        await produce(kafka_broker, topic, orders(4))
        # The partitions it read before the new assignment go on where they were, nothing comes twice.
        await sink.exactly(16)
    assert sorted(sink.ids()) == sorted([f"kafka:{topic}:{p}:{o}" for p in range(4) for o in range(3)]
                                        + [f"kafka:{topic}-more:{p}:0" for p in range(4)])
    assert await committed(kafka_broker, group_of(config), topic) == dict.fromkeys(range(4))


# --- dead letters ---------------------------------------------------------------------------------------------


async def test_kafka_dead_letter_is_readable_with_key_and_headers(kafka_broker: str, topic: str,
                                                                 tmp_path: Any) -> None:
    dlq = f"dlq-{uuid.uuid4().hex[:8]}"
    config = make_config(kafka_broker, topic)
    dead = kafka_dead_letter(DeadLetterConfig(kafka_topic=dlq), config)
    assert dead.describe() == f"kafka topic {dlq} on {kafka_broker}"
    record = {"source": "orders", "event": {"id": f"kafka:{topic}:1:4", "key": "k"}, "binding": None,
              "payload": None, "error": {"code": "decode_error", "message": "bad"}, "attempts": 0,
              "first_attempt_at": None, "last_attempt_at": None}
    try:
        await dead.write(record)
    finally:
        await dead.close()
    [message] = await read_topic(kafka_broker, dlq, 1)
    assert json.loads(message.value) == record
    assert message.key == f"kafka:{topic}:1:4".encode()  # the source is not running: the id is the key
    assert dict(message.headers) == {"error_code": b"decode_error", "source": b"orders"}


async def test_dead_letter_of_a_live_source_keeps_the_original_key_bytes(kafka_broker: str, topic: str,
                                                                        tmp_path: Any) -> None:
    dlq = f"dlq-{uuid.uuid4().hex[:8]}"
    raw_key = b"\xfe\x00k"
    await produce(kafka_broker, topic, [(0, raw_key, b"not json", [])])
    config = make_config(kafka_broker, topic, key_format="bytes")
    dead = kafka_dead_letter(DeadLetterConfig(kafka_topic=dlq), config)
    sink = new_sink(hold=lambda e: True)
    try:
        async with running(source_for(config, tmp_path, grace_s=0), sink):
            [event] = await sink.wait_for(1)
            assert event.raw_key == raw_key  # the bytes travel on the event, the template view has base64
            await dead.write({"source": config.id, "event": event.template_view(),
                              "error": {"code": "decode_error", "message": str(event.error)}}, key=event.raw_key)
    finally:
        await dead.close()
    [message] = await read_topic(kafka_broker, dlq, 1)
    assert message.key == raw_key


async def test_dead_letter_failures_and_wrong_source_kinds(tmp_path: Any) -> None:
    from bridge.sources.file.spec import FileSourceConfig

    file_source = SourceConfig(id="inbox", kind="file", description="", kind_config=FileSourceConfig(path=tmp_path),
                               delivery=DeliveryConfig(), max_in_flight=1, bind_schema=None, payload_schema=None,
                               when=None, payload=None)
    with pytest.raises(DeadLetterError, match="needs a kafka source"):
        kafka_dead_letter(DeadLetterConfig(kafka_topic="dlq"), file_source)
    closed_port = make_config("127.0.0.1:1", "x", client_options={"request_timeout_ms": 1000})
    assert isinstance(closed_port.kind_config, KafkaSourceConfig)
    dead = KafkaDeadLetter(closed_port.kind_config, "dlq")
    with pytest.raises(DeadLetterError, match="dlq"):
        await dead.write({"source": "x", "event": {"id": "e"}, "error": {"code": "c"}})
    await dead.close()


def test_a_dead_letter_too_large_for_kafka_loses_its_biggest_values_to_markers() -> None:
    value = {"text": "é" * 600_000}  # 1.2 MB of JSON
    payload = "p" * 700_000
    record = {"source": "orders", "event": {"id": "kafka:t:0:7", "topic": "t", "partition": 0, "offset": 7,
                                            "key": "k", "value": value, "headers": {"h": "v"}},
              "binding": {"id": "b1", "function_id": "shop::f", "namespace": None, "config": {}},
              "payload": payload, "error": {"code": "invocation_failed", "message": "boom"}, "attempts": 2,
              "first_attempt_at": None, "last_attempt_at": None}
    whole = json.dumps(record, ensure_ascii=False).encode()
    assert fit_record(record, len(whole)) == (whole, [])

    encoded, cut = fit_record(record, 1_000_000)
    fitted = json.loads(encoded)
    value_json = json.dumps(value, ensure_ascii=False).encode()
    assert cut == fitted["truncated"] == ["event.value"]
    assert fitted["event"]["value"] == {"truncated": True, "original_bytes": len(value_json),
                                        "sha256": hashlib.sha256(value_json).hexdigest()}
    assert {k: v for k, v in fitted["event"].items() if k != "value"} == {
        k: v for k, v in record["event"].items() if k != "value"}
    assert {k: v for k, v in fitted.items() if k not in ("event", "truncated")} == {
        k: v for k, v in record.items() if k != "event"}
    assert record["event"]["value"] is value and "truncated" not in record  # the caller's record is left alone

    encoded, cut = fit_record(record, 100_000)
    assert cut == ["event.value", "payload"] and len(encoded) < 1000
    assert json.loads(encoded)["payload"] == truncation_marker(payload)
    assert truncation_marker(payload)["sha256"] == hashlib.sha256(payload.encode()).hexdigest()  # text: its bytes

    # What describes the failure goes last, and only as far as needed.
    long_error = {**record, "error": {"code": "invocation_failed", "message": "m" * 50_000}}
    encoded, cut = fit_record(long_error, 10_000)
    assert cut == ["event.value", "payload", "error.message"]
    assert json.loads(encoded)["error"]["code"] == "invocation_failed"


def test_an_undecodable_value_carried_as_base64_is_cut_from_an_oversized_dead_letter() -> None:
    raw = bytes(range(256)) * 4096  # 1 MiB that is not UTF-8: event.raw_b64 holds 1.4 MB of base64
    config = make_config("127.0.0.1:9", "t")
    assert isinstance(config.kind_config, KafkaSourceConfig)
    event = record_event("orders", config.kind_config, _Record(b"\xfe" * 300_000, raw))
    assert {"raw_b64", "key_raw_b64"} <= set(event.fields)  # key_format text: \xfe is not UTF-8 either
    record = {"source": "orders", "event": event.template_view(), "binding": None, "payload": None,
              "error": {"code": "decode_error", "message": str(event.error)}, "attempts": 0}
    encoded, cut = fit_record(record, MAX_REQUEST_BYTES)
    assert cut == ["event.raw_b64"] and len(encoded) <= MAX_REQUEST_BYTES
    assert json.loads(encoded)["event"]["raw_b64"] == truncation_marker(event.fields["raw_b64"])
    encoded, cut = fit_record(record, 100_000)
    assert cut == ["event.raw_b64", "event.key_raw_b64"] and len(encoded) <= 100_000


async def test_an_oversized_dead_letter_is_cut_to_fit_before_sending_and_after_a_refusal(
        kafka_broker: str, topic: str, tmp_path: Any, caplog: Any) -> None:
    dlq = f"dlq-{uuid.uuid4().hex[:8]}"
    config = make_config(kafka_broker, topic)
    big = "x" * 2_000_000

    def dead_letter_of(offset: int, payload: Any) -> dict[str, Any]:
        return {"source": "orders", "event": {"id": f"kafka:{topic}:0:{offset}", "topic": topic, "partition": 0,
                                              "offset": offset, "key": None, "value": big, "headers": {}},
                "binding": {"id": "b1", "function_id": "shop::f", "namespace": None, "config": {}},
                "payload": payload, "error": {"code": "invocation_failed", "message": "boom"}, "attempts": 2,
                "first_attempt_at": None, "last_attempt_at": None}

    dead = kafka_dead_letter(DeadLetterConfig(kafka_topic=dlq), config)
    try:
        with caplog.at_level(logging.WARNING, logger="bridge.sources.kafka"):
            await dead.write(dead_letter_of(0, {"raw": big}))  # 4 MB: cut before it is sent
            # As if the limit were higher than it is (a broker with a lower one than the producer's): the first
            # attempt is refused as too large, the limit lowered and the record cut.
            dead._limit = 4 * MAX_REQUEST_BYTES
            await dead.write(dead_letter_of(1, None))
    finally:
        await dead.close()
    assert dead._limit < MAX_REQUEST_BYTES
    assert any("refused a" in r.getMessage() and "too large" in r.getMessage() for r in caplog.records)
    messages = await read_topic(kafka_broker, dlq, 2)
    # Their keys differ, so they may be on different partitions: the event's offset tells them apart.
    first, second = sorted((json.loads(m.value) for m in messages), key=lambda r: r["event"]["offset"])
    assert all(len(m.value) < MAX_REQUEST_BYTES for m in messages)
    assert first["truncated"] == ["payload", "event.value"]  # the largest first
    assert first["payload"] == truncation_marker({"raw": big})
    assert first["event"]["value"] == second["event"]["value"] == {
        "truncated": True, "original_bytes": len(big), "sha256": hashlib.sha256(big.encode()).hexdigest()}
    assert second["truncated"] == ["event.value"] and second["payload"] is None
    assert sorted(m.key for m in messages) == [f"kafka:{topic}:0:0".encode(), f"kafka:{topic}:0:1".encode()]
    assert first["event"]["offset"] == 0 and first["error"] == {"code": "invocation_failed", "message": "boom"}
    assert first["binding"]["function_id"] == "shop::f"
