"""The contract every source kind keeps with the runtime, stated once and run for every kind.

Each test takes a :class:`Harness`: one per kind (and per postgres mode) that builds the real config, builds the
source through :data:`bridge.sources.REGISTRY` as the runtime does, produces real events (files, Kafka records,
NOTIFYs, outbox rows) and knows the kind's documented event fields (DESIGN.md §2) and delivery semantics (§3).
Where a kind's semantics differ by design (``listen`` is at-most-once), the harness says so and the test asserts
that kind's documented behaviour instead of skipping it. :class:`~bridge.testing.sink.MemorySink` stands in for the
runtime.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.config import SourceConfig
from bridge.errors import DecodeError
from bridge.sources import REGISTRY, Event, Outcome, Source
from bridge.sources.file.spec import FileSourceConfig
from bridge.sources.kafka.source import KafkaSource
from bridge.sources.kafka.spec import KafkaSourceConfig
from bridge.sources.postgres.source import PostgresSource, outbox_ddl
from bridge.sources.postgres.spec import PostgresSourceConfig
from bridge.testing.sink import MemorySink, wait_ended
from bridge.testing.waiting import until
from tests.support.configs import source_config

QUIET_S = 0.5  # how long "nothing (more) arrives" is watched for
STOP_S = 10.0  # a cancelled run() must have returned within this
ABANDON_GRACE_S = 0.2  # shutdown grace of a source that abandons an event in flight (see Harness.build)


# --- harnesses --------------------------------------------------------------------------------------------------


class Harness:
    """What the contract needs to know about one kind: how to build its source and produce its events.

    ``produce`` takes JSON values and makes one real event of each, carrying the value as its content (the field
    ``content_field``). ``at_least_once`` is False for a kind that loses what arrives while nothing is bound or
    while it is down (DESIGN.md §3).
    """

    kind: ClassVar[str]
    fields: ClassVar[frozenset[str]]  # the template fields of DESIGN.md §2 besides id and source
    content_field: ClassVar[str]
    id_pattern: re.Pattern[str]
    at_least_once: ClassVar[bool] = True
    wait_s: ClassVar[float] = 5.0  # bound on a wait for events (a Kafka group join takes seconds)

    def __init__(self, config: SourceConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir

    def build(self, *, abandon_in_flight: bool = False) -> Source:
        """The source as the runtime builds it. Built so, a kind that waits for events in flight when cancelled
        waits up to SHUTDOWN_GRACE_S (15 s) before giving them up; ``abandon_in_flight`` builds the kind's class
        with a grace of ABANDON_GRACE_S instead, for the test that leaves an event unacknowledged at shutdown."""
        return REGISTRY[self.config.kind].open_source(self.config, self.state_dir)

    def sink(self, **kw: Any) -> MemorySink:
        return MemorySink(wait_timeout_s=self.wait_s, quiet_s=QUIET_S, **kw)

    async def ready(self, source: Source, sink: MemorySink) -> None:
        """Wait until an event produced from now on will be seen (what is produced earlier may be missed only by
        a kind that is not at-least-once)."""

    async def produce(self, values: list[Any]) -> None:
        raise NotImplementedError

    async def produce_undecodable(self) -> bytes:
        """Produce one event whose raw content the kind cannot decode under its config (strict JSON, DESIGN.md §3).
        Returns the raw content, which the event must carry for the dead-letter record: as text in the content
        field when it is UTF-8, else as base64 in ``raw_b64``."""
        raise NotImplementedError

    def dropped(self, source: Source) -> int:
        """How many events a kind that is not at-least-once counted as dropped."""
        raise NotImplementedError


class FileHarness(Harness):
    kind = "file"
    fields = frozenset({"path", "relative_path", "name", "change", "size", "mtime", "content"})
    content_field = "content"
    id_pattern = re.compile(r"file:[^:]+\.json:\d+:\d+")

    def __init__(self, tmp_path: Path) -> None:
        self.inbox = tmp_path / "inbox"
        self.inbox.mkdir()
        config = source_config("inbox", FileSourceConfig(path=self.inbox, content="json", settle_ms=30))
        super().__init__(config, tmp_path / "state")
        self._made = 0

    async def ready(self, source: Source, sink: MemorySink) -> None:
        # It took the directory's lock; the initial scan covers whatever the watch starts too late for.
        await until(lambda: sink.activations >= 1, 5, "the file source to become active")

    async def produce(self, values: list[Any]) -> None:
        for value in values:
            self._write(json.dumps(value).encode())

    async def produce_undecodable(self) -> bytes:
        self._write(b'{"amount": ')
        return b'{"amount": '

    def _write(self, data: bytes) -> None:
        # Written aside and renamed in, so the file appears whole: one event, whatever settle_ms.
        self._made += 1
        name = f"e{self._made:03d}.json"
        (self.inbox / f".{name}.tmp").write_bytes(data)
        (self.inbox / f".{name}.tmp").rename(self.inbox / name)


class KafkaHarness(Harness):
    kind = "kafka"
    fields = frozenset({"topic", "partition", "offset", "key", "value", "headers", "timestamp", "timestamp_iso"})
    content_field = "value"
    wait_s = 20.0

    def __init__(self, bootstrap: str, topic: str, tmp_path: Path) -> None:
        kc = KafkaSourceConfig(
            bootstrap_servers=bootstrap,
            topics=(topic,),
            group_id=f"g-{uuid.uuid4().hex[:12]}",
            value_format="json",
            commit_interval_ms=200,
            # Tansu makes a restarted member wait for the previous one's session to expire: keep it short.
            client_options={"session_timeout_ms": 1500, "heartbeat_interval_ms": 500, "rebalance_timeout_ms": 1500},
        )
        super().__init__(source_config("orders", kc), tmp_path / "state")
        self.bootstrap = bootstrap
        self.topic = topic
        self.id_pattern = re.compile(rf"kafka:{re.escape(topic)}:0:\d+")

    @classmethod
    async def create(cls, bootstrap: str, tmp_path: Path) -> KafkaHarness:
        """A harness on a new single-partition topic: one partition keeps the order of the events produced."""
        topic = f"contract-{uuid.uuid4().hex[:12]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()
        return cls(bootstrap, topic, tmp_path)

    def build(self, *, abandon_in_flight: bool = False) -> Source:
        if abandon_in_flight:
            return KafkaSource(self.config, self.state_dir, shutdown_grace_s=ABANDON_GRACE_S)
        return super().build()

    async def produce(self, values: list[Any]) -> None:
        await self._send([json.dumps(value).encode() for value in values])

    async def produce_undecodable(self) -> bytes:
        await self._send([b"\x89PNG not json"])
        return b"\x89PNG not json"

    async def _send(self, values: list[bytes]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        try:
            for i, value in enumerate(values):
                await producer.send_and_wait(self.topic, value, key=f"k{i}".encode(), partition=0)
        finally:
            await producer.stop()


class PostgresHarness(Harness):
    kind = "postgres"
    fields = frozenset({"channel", "payload", "pid", "received_at"})
    content_field = "payload"

    def __init__(self, dsn: str, config: SourceConfig, tmp_path: Path) -> None:
        super().__init__(config, tmp_path / "state")
        self.dsn = dsn

    def build(self, *, abandon_in_flight: bool = False) -> Source:
        if abandon_in_flight:
            return PostgresSource(self.config, self.state_dir, shutdown_grace_s=ABANDON_GRACE_S)
        return super().build()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            yield conn
        finally:
            await conn.close()


class ListenHarness(PostgresHarness):
    """``mode: listen``: at-most-once, so NOTIFYs sent while nothing is bound or nobody listens are lost."""

    at_least_once = False
    id_pattern = re.compile(r"pg:signup:\d+:\d+")

    def __init__(self, dsn: str, tmp_path: Path) -> None:
        pc = PostgresSourceConfig(dsn=dsn, channels=("signup",), payload_format="json", mode="listen",
                                  reconnect_initial_backoff_ms=50, reconnect_max_backoff_ms=500)
        super().__init__(dsn, source_config("signups", pc), tmp_path)

    async def ready(self, source: Source, sink: MemorySink) -> None:
        assert isinstance(source, PostgresSource)
        await until(lambda: source.listening, 5, "the source to listen")

    async def produce(self, values: list[Any]) -> None:
        await self._notify([json.dumps(value) for value in values])

    async def produce_undecodable(self) -> bytes:
        await self._notify(["not json"])
        return b"not json"

    def dropped(self, source: Source) -> int:
        assert isinstance(source, PostgresSource)
        return source.dropped

    async def _notify(self, payloads: list[str]) -> None:
        async with self.connection() as conn:
            for payload in payloads:
                await conn.execute("SELECT pg_notify('signup', $1)", payload)


class OutboxHarness(PostgresHarness):
    """``mode: outbox``: at-least-once; the rows wait in the table until their events are done."""

    id_pattern = re.compile(r"pg:bridge_outbox:\d+")

    def __init__(self, dsn: str, tmp_path: Path) -> None:
        pc = PostgresSourceConfig(dsn=dsn, mode="outbox", outbox_table="bridge_outbox", poll_interval_ms=200,
                                  reconnect_initial_backoff_ms=50, reconnect_max_backoff_ms=500)
        super().__init__(dsn, source_config("outbox", pc), tmp_path)

    @classmethod
    async def create(cls, dsn: str, tmp_path: Path) -> OutboxHarness:
        harness = cls(dsn, tmp_path)
        async with harness.connection() as conn:
            await conn.execute(outbox_ddl(harness.config))
        return harness

    async def produce(self, values: list[Any]) -> None:
        async with self.connection() as conn:
            for value in values:
                await conn.execute("INSERT INTO bridge_outbox (channel, payload) VALUES ('orders', $1::jsonb)",
                                   json.dumps(value))

    async def produce_undecodable(self) -> bytes:
        # jsonb refuses what is not JSON, but takes nesting deeper than the bridge decodes.
        deep = "[" * 600 + "]" * 600
        async with self.connection() as conn:
            await conn.execute("INSERT INTO bridge_outbox (channel, payload) VALUES ('orders', $1::jsonb)", deep)
        return deep.encode()


@pytest.fixture(params=["file", "kafka", "postgres-listen", "postgres-outbox"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    # The services are asked for only by the kinds that use them: the file tests start neither broker nor server.
    kind: str = request.param
    if kind == "file":
        return FileHarness(tmp_path)
    if kind == "kafka":
        return await KafkaHarness.create(request.getfixturevalue("kafka_broker"), tmp_path)
    dsn: str = request.getfixturevalue("pg_database")
    if kind == "postgres-listen":
        return ListenHarness(dsn, tmp_path)
    return await OutboxHarness.create(dsn, tmp_path)


# --- running a source -------------------------------------------------------------------------------------------


async def stop(task: asyncio.Task[None]) -> float:
    """Cancel a source's run and return how long it took to end; it must end within STOP_S, by cancellation."""
    started = time.monotonic()
    task.cancel()
    await ended(task)
    return time.monotonic() - started


async def ended(task: asyncio.Task[None]) -> None:
    """Wait for a cancelled run to end, within STOP_S, by cancellation. (Cancelling it once more would interrupt
    its shutdown: the grace wait, the final commit.)"""
    await wait_ended(task, STOP_S)
    assert task.cancelled(), "run() ended otherwise than cancelled"


@contextlib.asynccontextmanager
async def running(harness: Harness, source: Source, sink: MemorySink) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``source`` into ``sink`` until the block ends; the block starts once the source is ready."""
    task = asyncio.create_task(source.run(sink), name=f"{harness.kind} source under test")
    try:
        await harness.ready(source, sink)
        yield task
    finally:
        if not task.done():
            await stop(task)


def contents(harness: Harness, events: list[Event]) -> list[Any]:
    return [event.fields[harness.content_field] for event in events]


def numbered(start: int, count: int) -> list[dict[str, int]]:
    return [{"n": n} for n in range(start, start + count)]


def by_number(values: list[Any]) -> list[Any]:
    return sorted(values, key=lambda v: v["n"])


# --- the contract -----------------------------------------------------------------------------------------------


async def test_produced_events_reach_the_sink_with_the_kinds_fields(harness: Harness) -> None:
    sink = harness.sink()
    async with running(harness, harness.build(), sink):
        await harness.produce(numbered(0, 3))
        events = await sink.exactly(3)
    assert len({event.id for event in events}) == 3
    for event in events:
        assert harness.id_pattern.fullmatch(event.id), event.id
        assert event.source == harness.config.id
        assert event.error is None
        assert set(event.fields) == harness.fields
    assert by_number(contents(harness, events)) == numbered(0, 3)


async def test_nothing_is_submitted_while_nothing_is_bound(harness: Harness) -> None:
    sink = harness.sink(bound=False)
    source = harness.build()
    async with running(harness, source, sink):
        await harness.produce(numbered(0, 3))
        if harness.at_least_once:
            await asyncio.sleep(QUIET_S)  # the point: nothing arrives
            assert sink.events == []
            sink.bind()
            events = await sink.exactly(3)  # kept, and delivered once a binding appears
            assert by_number(contents(harness, events)) == numbered(0, 3)
        else:
            await until(lambda: harness.dropped(source) == 3, 5, lambda: f"3 drops, got {harness.dropped(source)}")
            assert sink.events == []
            sink.bind()
            await harness.produce(numbered(3, 1))
            events = await sink.exactly(1)  # the dropped ones are gone for good
            assert contents(harness, events) == numbered(3, 1)
            assert harness.dropped(source) == 3


async def test_back_pressure_keeps_one_event_in_flight_until_it_is_acknowledged(harness: Harness) -> None:
    sink = harness.sink(window=1, hold=True)
    async with running(harness, harness.build(), sink):
        await harness.produce(numbered(0, 3))
        await sink.wait_for(1)
        await asyncio.sleep(QUIET_S)  # the point: the others wait for the acknowledgement
        assert len(sink.events) == 1
        for count in (2, 3):
            await sink.ack(sink.events[-1].id)
            await sink.wait_for(count)  # each acknowledgement releases the next one
            assert sink.in_flight() == 1
        await sink.ack(sink.events[-1].id)
        await sink.exactly(3)
    assert sink.peak_in_flight == 1
    assert by_number(contents(harness, sink.events)) == numbered(0, 3)


async def test_a_restart_delivers_again_only_what_was_not_acknowledged(harness: Harness) -> None:
    """Whatever its outcome, an acknowledged event is done for good; one left in flight at shutdown comes back
    (kinds that are not at-least-once replay nothing)."""
    outcomes: list[Outcome] = ["delivered", "filtered", "dead_lettered"]
    first = harness.sink(hold=True, window=1)  # one at a time, so that the last one submitted is the one left
    async with running(harness, harness.build(abandon_in_flight=True), first):
        await harness.produce(numbered(0, len(outcomes) + 1))
        for count, outcome in enumerate(outcomes, start=1):
            await first.wait_for(count)
            await first.ack(first.events[-1].id, outcome)
        [*acked, abandoned] = await first.wait_for(len(outcomes) + 1)
    assert [event for event, _ in first.held] == [abandoned]  # left unacknowledged at cancellation

    second = harness.sink()
    async with running(harness, harness.build(), second):
        await harness.produce(numbered(10, 1))
        replayed = [abandoned] if harness.at_least_once else []
        events = await second.exactly(len(replayed) + 1)
    assert not {event.id for event in acked} & set(second.ids())
    assert [event.id for event in events if event.id == abandoned.id] == [event.id for event in replayed]
    assert by_number(contents(harness, events)) == by_number([*contents(harness, replayed), *numbered(10, 1)])


async def test_an_event_acknowledged_after_cancellation_within_the_grace_stays_acknowledged(
    harness: Harness,
) -> None:
    """The runtime cancels its sources and drains their in-flight events at the same time (``Runtime.shutdown``):
    an event that finishes after the cancellation, within SHUTDOWN_GRACE_S, is acknowledged like any other."""
    first = harness.sink(hold=True)
    source = harness.build()
    task = asyncio.create_task(source.run(first), name=f"{harness.kind} source under test")
    try:
        await harness.ready(source, first)
        await harness.produce(numbered(0, 1))
        [event] = await first.wait_for(1)
        task.cancel()
        # A source that does not wait for events in flight ends within this; the others wait for the event.
        await asyncio.wait({task}, timeout=QUIET_S)
        await first.ack(event.id)
    finally:
        if not task.cancelling():
            task.cancel()
        await ended(task)

    second = harness.sink()
    async with running(harness, harness.build(), second):
        await harness.produce(numbered(1, 1))
        events = await second.exactly(1)
    assert contents(harness, events) == numbered(1, 1)


async def test_cancelling_run_returns_promptly_and_leaves_no_task(harness: Harness) -> None:
    before = asyncio.all_tasks()
    sink = harness.sink()
    async with running(harness, harness.build(), sink) as task:
        await harness.produce(numbered(0, 1))
        await sink.wait_for(1)
        sink.unbind()  # the next event may find the source waiting for a binding: cancellation ends that too
        await harness.produce(numbered(1, 1))
        took = await stop(task)
    assert took < STOP_S
    await sink.settle()
    left = [t.get_name() for t in asyncio.all_tasks() - before if not t.done()]
    assert left == []


@pytest.mark.parametrize("moment", ["never bound", "just bound"])
async def test_cancelling_run_early_returns_promptly_and_leaves_no_task(harness: Harness, moment: str) -> None:
    """Cancelled while it waits for its first binding, or right after the binding appears (a Kafka source may be
    starting its group join then)."""
    before = asyncio.all_tasks()
    sink = harness.sink(bound=False)
    async with running(harness, harness.build(), sink) as task:
        await harness.produce(numbered(0, 1))
        if moment == "just bound":
            sink.bind()
        took = await stop(task)
    assert took < STOP_S
    await sink.settle()
    left = [t.get_name() for t in asyncio.all_tasks() - before if not t.done()]
    assert left == []


async def test_undecodable_input_is_an_event_with_a_decode_error(harness: Harness) -> None:
    sink = harness.sink()
    async with running(harness, harness.build(), sink):
        raw = await harness.produce_undecodable()
        await harness.produce(numbered(0, 1))  # and the stream goes on
        events = await sink.exactly(2)
    odd = next(event for event in events if event.fields[harness.content_field] != {"n": 0})
    good = next(event for event in events if event is not odd)
    assert good.error is None
    assert odd.source == harness.config.id
    assert isinstance(odd.error, DecodeError), odd.error
    try:
        carried = {harness.content_field: raw.decode("utf-8")}
    except UnicodeDecodeError:
        carried = {harness.content_field: None, "raw_b64": base64.b64encode(raw).decode()}
    assert set(odd.fields) == harness.fields | set(carried)
    assert {k: odd.fields[k] for k in carried} == carried
