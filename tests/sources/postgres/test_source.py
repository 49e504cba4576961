"""The postgres source against a real PostgreSQL server, with an in-memory Sink (MemorySink) standing in for the
runtime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from bridge.config import DeadLetterConfig, SourceConfig
from bridge.errors import DeadLetterError, DecodeError
from bridge.sources.file.spec import FileSourceConfig
from bridge.sources.postgres._outboxtable import row_event
from bridge.sources.postgres._validate import check_outbox_table
from bridge.sources.postgres.source import (
    PostgresDeadLetter,
    PostgresSource,
    outbox_ddl,
    postgres_dead_letter,
)
from bridge.sources.postgres.spec import PostgresSourceConfig
from bridge.testing.sink import MemorySink, running, stop_source
from bridge.testing.waiting import until
from tests.support.configs import source_config
from tests.support.services import PostgresServer

QUIET_S = 0.3
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def make_config(dsn: str, source_id: str = "signups", max_in_flight: int = 64, **kw: Any) -> SourceConfig:
    kw.setdefault("reconnect_initial_backoff_ms", 50)
    kw.setdefault("reconnect_max_backoff_ms", 500)
    return source_config(source_id, PostgresSourceConfig(dsn=dsn, **kw), max_in_flight=max_in_flight)


def outbox_config(dsn: str, **kw: Any) -> SourceConfig:
    kw.setdefault("poll_interval_ms", 200)
    return make_config(dsn, "outbox", mode="outbox", outbox_table=kw.pop("outbox_table", "bridge_outbox"), **kw)


@contextlib.asynccontextmanager
async def db(dsn: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


async def notify(dsn: str, channel: str, *payloads: str) -> int:
    """Send the payloads in order from one backend; returns its pid."""
    async with db(dsn) as conn:
        for payload in payloads:
            await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        return pid


async def listening(source: PostgresSource, timeout: float = 5.0) -> None:
    await until(lambda: source.listening, timeout, "the source to listen")


async def wake_ups_listening(dsn: str, timeout: float = 5.0) -> None:
    """Until the outbox's wake-up connection has sent its LISTEN, as Postgres shows it: pg_stat_activity keeps a
    session's latest statement, and LISTEN is that connection's first (its health-check ping, every 10 s, the
    only later one)."""

    async def sent() -> bool:
        async with db(dsn) as conn:
            count = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'iii-bridge outbox wake-ups %' AND query <> ''"
            )
        return bool(count)

    await until_async(sent, timeout, "the outbox wake-up connection to LISTEN")


async def insert_rows(dsn: str, count: int, table: str = "bridge_outbox", channel: str = "orders") -> None:
    async with db(dsn) as conn:
        await conn.execute(
            f"INSERT INTO {table} (channel, payload)"
            " SELECT $1, jsonb_build_object('n', n) FROM generate_series(1, $2) AS n",
            channel, count,
        )


async def row_count(dsn: str, table: str = "bridge_outbox") -> int:
    async with db(dsn) as conn:
        count: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
        return count


async def create_outbox(dsn: str, config: SourceConfig) -> None:
    async with db(dsn) as conn:
        await conn.execute(outbox_ddl(config))


async def terminate(dsn: str, application_prefix: str) -> int:
    async with db(dsn) as conn:
        killed: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE $1", application_prefix + "%",
        )
        return killed


def with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is not None:
        return dsn
    user = parts.username or "postgres"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


# ------------------------------------------------------------------------------------------------- listen


async def test_listen_json_payloads_become_events(pg_database: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.postgres")
    dsn = with_password(pg_database, "s3cret-pw")
    source, sink = PostgresSource(make_config(dsn, channels=("user_signup", "other")), Path()), MemorySink()
    async with running(source, sink):
        await listening(source)
        pid = await notify(pg_database, "user_signup", '{"id": 1, "email": "a@example.com"}', "[1, 2]")
        await notify(pg_database, "other", "42")
        events = await sink.exactly(3)
    first = events[0]
    assert first.source == "signups"
    assert first.error is None
    assert first.fields["channel"] == "user_signup"
    assert first.fields["payload"] == {"id": 1, "email": "a@example.com"}
    assert first.fields["pid"] == pid
    assert ISO_MS.match(first.fields["received_at"])
    assert re.fullmatch(rf"pg:user_signup:{pid}:\d+", first.id)
    assert events[1].fields["payload"] == [1, 2]
    assert (events[2].fields["channel"], events[2].fields["payload"]) == ("other", 42)
    assert len({e.id for e in events}) == 3
    assert "listening on user_signup, other" in caplog.text
    assert "s3cret-pw" not in caplog.text


async def test_listen_text_payloads_stay_strings(pg_database: str) -> None:
    config = make_config(pg_database, channels=("pings",), payload_format="text")
    source, sink = PostgresSource(config, Path()), MemorySink()
    async with running(source, sink):
        await listening(source)
        await notify(pg_database, "pings", '{"id": 1}', "", "plain words")
        events = await sink.exactly(3)
    assert [e.fields["payload"] for e in events] == ['{"id": 1}', "", "plain words"]
    assert all(e.error is None for e in events)


async def test_listen_non_json_payload_is_an_event_with_a_decode_error(pg_database: str) -> None:
    source, sink = PostgresSource(make_config(pg_database, channels=("c",)), Path()), MemorySink()
    async with running(source, sink):
        await listening(source)
        await notify(pg_database, "c", "not json", "", '{"ok": true}')
        events = await sink.exactly(3)
    bad, empty, good = events
    assert isinstance(bad.error, DecodeError) and "not JSON" in str(bad.error)
    assert bad.fields["payload"] == "not json"
    assert isinstance(empty.error, DecodeError) and "payload_format: text" in str(empty.error)
    assert good.error is None and good.fields["payload"] == {"ok": True}


# Strictly undecodable JSON a Postgres NOTIFY can carry (< 8000 bytes each), with the reason each must give.
NOTIFY_POISON = [
    ("[" * 3999 + "]" * 3999, "nested deeper than 512 levels"),
    ("[" * 600 + "]" * 600, "nested deeper than 512 levels"),
    ('{"n": NaN}', "NaN is not JSON"),
    ("[1e400]", "beyond a double's range"),
    ("7" * 5000, "integer of 5000 digits"),
    ('{"name": "\\ud800"}', "lone surrogate \\ud800"),
]


async def test_listen_poison_payloads_are_decode_error_events_and_the_listener_lives_on(
    pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    source, sink = PostgresSource(make_config(pg_database, channels=("c",)), Path()), MemorySink()
    payloads = []
    for i, (poison, _) in enumerate(NOTIFY_POISON):
        payloads += [json.dumps({"good": i}), poison]
    payloads.append('{"good": "last"}')
    async with running(source, sink):
        await listening(source)
        await notify(pg_database, "c", *payloads)
        events = await sink.exactly(len(payloads))
        assert source.listening
    assert source.received == len(payloads) and source.dropped == 0
    good, poison = events[0::2], events[1::2]
    assert [e.fields["payload"] for e in good] == [{"good": i} for i in range(len(NOTIFY_POISON))] + [
        {"good": "last"}]
    assert all(e.error is None for e in good)
    for event, (raw, reason) in zip(poison, NOTIFY_POISON, strict=True):
        assert isinstance(event.error, DecodeError) and reason in str(event.error), str(event.error)
        assert event.fields["payload"] == raw  # the raw text, for the dead-letter record
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]


async def test_listen_a_notification_the_source_fails_to_take_is_counted_not_raised(
    pg_database: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, sink = PostgresSource(make_config(pg_database, channels=("c",)), Path()), MemorySink()

    def broken(channel: str, pid: int, payload: str, ns: int) -> Any:
        if payload == "boom":
            raise RuntimeError("an unforeseen failure")
        return real(channel, pid, payload, ns)

    real = source._event
    monkeypatch.setattr(source, "_event", broken)  # stands in for a bug: asyncpg would swallow it uncounted
    async with running(source, sink):
        await listening(source)
        await notify(pg_database, "c", '{"n": 1}', "boom", '{"n": 2}')
        events = await sink.exactly(2)
        assert source.listening
    assert [e.fields["payload"] for e in events] == [{"n": 1}, {"n": 2}]
    assert source.received == 3 and source.dropped == 1
    assert "could not be taken" in caplog.text and "an unforeseen failure" in caplog.text


async def test_listen_queues_notifications_while_the_window_is_full_and_keeps_their_order(pg_database: str) -> None:
    source, sink = PostgresSource(make_config(pg_database, channels=("c",)), Path()), MemorySink(hold=True, window=2)
    async with running(source, sink):
        await listening(source)
        await notify(pg_database, "c", *[json.dumps(i) for i in range(6)])
        await sink.wait_for(2)  # taken at once (offer); the other four wait in the source's queue
        await until(lambda: source.received == 6, 5, lambda: f"{source.received} of 6 notifications received")
        assert len(sink.events) == 2 and source.dropped == 0
        while len(sink.events) < 6:
            await sink.ack_all()
            await asyncio.sleep(0.05)
        await sink.ack_all()
    assert [e.fields["payload"] for e in sink.events] == list(range(6))


async def test_listen_reconnects_after_the_backend_is_killed_and_counts_the_gap(
    pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    source, sink = PostgresSource(make_config(pg_database, channels=("c",)), Path()), MemorySink()
    async with running(source, sink):
        await listening(source)
        await notify(pg_database, "c", '"before"')
        await sink.wait_for(1)
        assert await terminate(pg_database, "iii-bridge listen") == 1
        await until(lambda: source.gaps == 1 and source.listening, 5, "the re-LISTEN")
        # It stepped down with the lost connection (its lock died with it) and provides the type again now.
        assert (sink.activations, sink.deactivations) == (2, 1)
        await notify(pg_database, "c", '"after"')
        events = await sink.exactly(2)
    assert [e.fields["payload"] for e in events] == ["before", "after"]
    assert re.search(r"notifications sent between \S+Z and \S+Z were lost", caplog.text)


async def test_listen_drops_and_counts_notifications_while_nothing_is_bound(pg_database: str) -> None:
    source, sink = PostgresSource(make_config(pg_database, channels=("c",)), Path()), MemorySink(bound=False)
    async with running(source, sink):
        await listening(source)
        await notify(pg_database, "c", *[json.dumps(i) for i in range(5)])
        await until(lambda: source.dropped == 5, 5, lambda: f"5 drops (got {source.dropped})")
        sink.bind()
        await notify(pg_database, "c", '"bound"')
        events = await sink.exactly(1)
    assert events[0].fields["payload"] == "bound"
    assert source.dropped == 5 and source.received == 6


async def test_listen_replicas_deliver_each_notification_once_and_fail_over(
    pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.postgres")
    config = make_config(pg_database, channels=("c",))
    replicas = [(PostgresSource(config, Path()), MemorySink()) for _ in range(2)]
    tasks = [asyncio.create_task(source.run(sink)) for source, sink in replicas]
    try:
        await until(lambda: any(source.listening for source, _ in replicas), 5, "a listener")
        await until(lambda: "stands by" in caplog.text, 5, "the standby's log line")
        assert [source.listening for source, _ in replicas].count(True) == 1
        await notify(pg_database, "c", *[json.dumps(i) for i in range(50)])
        await until(lambda: sum(len(sink.events) for _, sink in replicas) >= 50, 5, "50 events")
        await asyncio.sleep(QUIET_S)
        payloads = sorted(e.fields["payload"] for _, sink in replicas for e in sink.events)
        assert payloads == list(range(50))
        # Cancel the lock holder: its session ends, the lock is free, the standby takes over within seconds.
        holder = next(i for i, (source, _) in enumerate(replicas) if source.listening)
        standby, standby_sink = replicas[1 - holder]
        started = time.monotonic()
        await stop_source(tasks[holder])
        await listening(standby, timeout=5)
        assert time.monotonic() - started < 3
        assert standby_sink.events == []  # it never listened before
        await notify(pg_database, "c", '"after failover"')
        events = await standby_sink.exactly(1)
        assert events[0].fields["payload"] == "after failover"
        assert "this one listens now" in caplog.text
    finally:
        for task in tasks:
            await stop_source(task)


@pytest.mark.parametrize("mode", ["listen", "outbox", "outbox dry run"])
async def test_an_unreachable_server_is_retried_and_the_password_never_logged(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = "postgresql://app:s3cret-pw@127.0.0.1:1/db"
    config = outbox_config(dsn) if mode.startswith("outbox") else make_config(dsn, channels=("c",))
    source, sink = PostgresSource(config, Path(), dry_run=mode.endswith("dry run")), MemorySink()
    async with running(source, sink) as task:
        await until(lambda: caplog.text.count("retrying in") >= 3, 5, "three retries")
        assert not task.done()
    assert "postgresql://app:***@127.0.0.1:1/db" in caplog.text
    assert "s3cret-pw" not in caplog.text


# ------------------------------------------------------------------------------------------------- outbox


async def test_outbox_delivers_rows_inserted_before_start_and_is_woken_by_notify(pg_database: str) -> None:
    config = outbox_config(pg_database, poll_interval_ms=60_000)  # only NOTIFY can wake it after the start
    await create_outbox(pg_database, config)
    await insert_rows(pg_database, 10)
    source, sink = PostgresSource(config, Path()), MemorySink()
    async with running(source, sink):
        events = await sink.wait_for(10)
        await until(lambda: source.outbox is not None and source.outbox.deleted == 10, 5, "10 deletions")
        assert await row_count(pg_database) == 0
        await wake_ups_listening(pg_database)
        started = time.monotonic()
        await insert_rows(pg_database, 1)
        await sink.wait_for(11, timeout=2)
        woken_after = time.monotonic() - started
    assert woken_after < 1.0
    ids = [int(e.id.rpartition(":")[2]) for e in events]
    assert ids == sorted(ids) and all(e.id == f"pg:bridge_outbox:{i}" for e, i in zip(events, ids, strict=True))
    first = events[0]
    assert first.fields["channel"] == "orders"
    assert first.fields["payload"] == {"n": 1}
    assert first.fields["pid"] is None
    assert ISO_MS.match(first.fields["received_at"])
    assert first.error is None


# What an outbox row can hold that Python's json cannot (or must not) load. A jsonb column takes deep nesting and
# long integers; a json column (the check accepts it) keeps the text as written, so overflowing floats and lone
# surrogate escapes get through too. Postgres refuses NaN in both.
OUTBOX_POISON = {
    "jsonb": [
        ("[" * 600 + "]" * 600, "nested deeper than 512 levels"),
        ("[" * 5000 + "]" * 5000, "nested deeper than 512 levels"),
        ("9" * 5000, "integer of 5000 digits"),
    ],
    "json": [
        ("[" * 5000 + "]" * 5000, "nested deeper than 512 levels"),
        ("9" * 5000, "integer of 5000 digits"),
        ('{"x": 1e400}', "beyond a double's range"),
        ('"\\ud800"', "lone surrogate \\ud800"),
    ],
}


async def create_outbox_with(dsn: str, config: SourceConfig, payload_type: str) -> None:
    await create_outbox(dsn, config)
    async with db(dsn) as conn:
        await conn.execute(f"ALTER TABLE bridge_outbox ALTER COLUMN payload TYPE {payload_type}")


async def insert_payloads(dsn: str, payloads: list[str]) -> None:
    async with db(dsn) as conn:
        for payload in payloads:  # one statement each: ids in this order
            await conn.execute("INSERT INTO bridge_outbox (channel, payload) VALUES ('orders', $1::text::json)",
                               payload)


@pytest.mark.parametrize("payload_type", ["jsonb", "json"])
async def test_outbox_poison_rows_are_decode_error_events_and_deleted_like_any_done_row(
    pg_database: str, payload_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = outbox_config(pg_database, batch_size=3)
    await create_outbox_with(pg_database, config, payload_type)
    poison = OUTBOX_POISON[payload_type]
    payloads = []
    for i, (raw, _) in enumerate(poison):
        payloads += [json.dumps({"n": i}), raw]
    payloads.append('{"n": "last"}')
    await insert_payloads(pg_database, payloads)
    source, sink = PostgresSource(config, Path()), MemorySink()
    async with running(source, sink):
        events = list(await sink.exactly(len(payloads)))
        await until(lambda: source.outbox is not None and source.outbox.deleted == len(payloads), 5, "deletions")
        assert await row_count(pg_database) == 0
        await insert_payloads(pg_database, ['{"n": "after"}'])  # the claim loop is still alive
        await sink.exactly(len(payloads) + 1)
    good, bad = events[0::2], events[1::2]
    assert [e.fields["payload"] for e in good] == [{"n": i} for i in range(len(poison))] + [{"n": "last"}]
    assert all(e.error is None for e in good)
    async with db(pg_database) as conn:  # what Postgres gives back as text (jsonb normalises, json keeps it)
        texts = [await conn.fetchval(f"SELECT $1::text::{payload_type}::text", raw) for raw, _ in poison]
    for event, (_, reason), text in zip(bad, poison, texts, strict=True):
        assert isinstance(event.error, DecodeError) and reason in str(event.error), str(event.error)
        assert event.fields["payload"] == text
        assert event.fields["channel"] == "orders"
    assert "Traceback" not in caplog.text


async def test_a_dry_run_shows_poison_outbox_rows_as_decode_error_events(pg_database: str) -> None:
    config = outbox_config(pg_database)
    await create_outbox_with(pg_database, config, "json")
    await insert_payloads(pg_database, ['{"n": 1}', "[" * 5000 + "]" * 5000, '{"n": 2}'])
    dry, sink = PostgresSource(config, Path(), dry_run=True), MemorySink()
    async with running(dry, sink):
        first, poison, last = await sink.exactly(3)
    assert (first.fields["payload"], last.fields["payload"]) == ({"n": 1}, {"n": 2})
    assert isinstance(poison.error, DecodeError) and "nested deeper than 512 levels" in str(poison.error)
    assert await row_count(pg_database) == 3


def test_an_outbox_row_that_cannot_be_read_still_makes_an_event() -> None:
    event = row_event("outbox", "bridge_outbox", {"id": 5, "channel": "orders"}, "2024-01-01T00:00:00.000Z")
    assert event.id == "pg:bridge_outbox:5"
    assert isinstance(event.error, DecodeError) and "cannot be read" in str(event.error)
    assert event.fields == {"channel": "orders", "payload": None, "pid": None,
                            "received_at": "2024-01-01T00:00:00.000Z"}


async def test_outbox_row_stays_locked_until_its_event_is_done(pg_database: str) -> None:
    config = outbox_config(pg_database)
    await create_outbox(pg_database, config)
    await insert_rows(pg_database, 3)
    holder_sink, other_sink = MemorySink(hold=True), MemorySink()
    a, b = PostgresSource(config, Path()), PostgresSource(config, Path())
    async with running(a, holder_sink):
        await holder_sink.exactly(3)
        async with running(b, other_sink):
            await asyncio.sleep(0.6)  # several polls
            assert other_sink.events == []
            assert await row_count(pg_database) == 3
            async with db(pg_database) as conn, conn.transaction():
                free = await conn.fetch("SELECT id FROM bridge_outbox FOR UPDATE SKIP LOCKED")
            assert free == []
            await holder_sink.ack_all()
            await until(lambda: a.outbox is not None and a.outbox.deleted == 3, 5, "the deletions")
            assert await row_count(pg_database) == 0
            await asyncio.sleep(QUIET_S)
            assert other_sink.events == []


async def test_outbox_shutdown_waits_briefly_for_rows_in_flight(pg_database: str) -> None:
    config = outbox_config(pg_database)
    await create_outbox(pg_database, config)
    await insert_rows(pg_database, 5)
    sink = MemorySink(hold=True, window=2)  # two rows in flight, the claim waits to submit the third
    source = PostgresSource(config, Path(), shutdown_grace_s=5)
    task = asyncio.create_task(source.run(sink))
    await sink.exactly(2)
    task.cancel()
    await asyncio.sleep(0.2)
    assert not task.done()  # waiting for the two events in flight, within the grace period
    started = time.monotonic()
    await sink.ack_all()
    await stop_source(task)
    assert time.monotonic() - started < 1
    assert await row_count(pg_database) == 3  # the two done rows are deleted; the rest wait, unlocked
    async with db(pg_database) as conn, conn.transaction():
        assert len(await conn.fetch("SELECT id FROM bridge_outbox FOR UPDATE SKIP LOCKED")) == 3

    async def closed() -> bool:  # every connection of the source is gone (backends exit just after the client)
        async with db(pg_database) as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'iii-bridge outbox%'"
            )
            return count == 0

    await until_async(closed, 5, "the source's connections to close")


async def test_outbox_crash_mid_stream_loses_no_row(pg_database: str) -> None:
    config = outbox_config(pg_database, batch_size=50)
    await create_outbox(pg_database, config)
    await insert_rows(pg_database, 2000)
    first_sink = MemorySink()
    first = PostgresSource(config, Path(), shutdown_grace_s=0)
    task = asyncio.create_task(first.run(first_sink))
    try:
        await first_sink.wait_for(500, timeout=10)
        # A crash: the sessions end without committing, so their deletions and locks vanish with them.
        assert await terminate(pg_database, "iii-bridge outbox") >= 1
    finally:
        await stop_source(task)
    left = await row_count(pg_database)
    assert 0 < left < 2000
    second_sink = MemorySink()
    async with running(PostgresSource(config, Path()), second_sink):
        await until(lambda: len(second_sink.events) >= left, 15, "the rest of the rows")
        async def empty() -> bool:
            return await row_count(pg_database) == 0
        await until_async(empty, 10, "an empty outbox")
    seen = {e.id for e in first_sink.events + second_sink.events}
    assert len(seen) == 2000


async def until_async(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_outbox_replicas_share_rows_each_delivered_once(pg_database: str) -> None:
    config = outbox_config(pg_database, batch_size=50)
    await create_outbox(pg_database, config)
    await insert_rows(pg_database, 2000)
    sink_a, sink_b = MemorySink(), MemorySink()
    a, b = PostgresSource(config, Path()), PostgresSource(config, Path())
    async with running(a, sink_a), running(b, sink_b):
        await until(lambda: len(sink_a.events) + len(sink_b.events) >= 2000, 20, "2000 events")

        async def empty() -> bool:
            return await row_count(pg_database) == 0

        await until_async(empty, 10, "an empty outbox")
        await asyncio.sleep(QUIET_S)
    ids = [e.id for e in sink_a.events + sink_b.events]
    assert len(ids) == 2000 and len(set(ids)) == 2000
    assert sink_a.events and sink_b.events, (len(sink_a.events), len(sink_b.events))


async def test_outbox_channels_restrict_the_rows_claimed(pg_database: str) -> None:
    config = outbox_config(pg_database, channels=("wanted",))
    await create_outbox(pg_database, config)
    await insert_rows(pg_database, 3, channel="wanted")
    await insert_rows(pg_database, 2, channel="other")
    source, sink = PostgresSource(config, Path()), MemorySink()
    async with running(source, sink):
        events = await sink.exactly(3)
    assert {e.fields["channel"] for e in events} == {"wanted"}
    assert await row_count(pg_database) == 2


async def test_outbox_rows_wait_while_nothing_is_bound(pg_database: str) -> None:
    config = outbox_config(pg_database)
    await create_outbox(pg_database, config)
    await insert_rows(pg_database, 2)
    source, sink = PostgresSource(config, Path()), MemorySink(bound=False)
    async with running(source, sink):
        await asyncio.sleep(0.5)
        assert source.outbox is not None and source.outbox.claimed == 0
        async with db(pg_database) as conn, conn.transaction():
            assert len(await conn.fetch("SELECT id FROM bridge_outbox FOR UPDATE SKIP LOCKED")) == 2
        sink.bind()
        await sink.exactly(2)


@pytest.fixture(scope="module")
def throwaway_pg() -> Iterator[PostgresServer]:
    with PostgresServer(force_throwaway=True) as server:
        yield server


async def test_outbox_survives_a_postgres_restart(throwaway_pg: PostgresServer) -> None:
    dsn = throwaway_pg.create_database()
    try:
        config = outbox_config(dsn, batch_size=50)
        await create_outbox(dsn, config)
        await insert_rows(dsn, 2000)
        sink = MemorySink(window=16, ack_delay_s=0.02)  # ~800 rows/s: the restart lands mid-stream
        source = PostgresSource(config, Path())
        async with running(source, sink):
            await sink.wait_for(300, timeout=10)
            await asyncio.to_thread(throwaway_pg.restart_cluster)
            assert len({e.id for e in sink.events}) < 2000
            await until(lambda: len({e.id for e in sink.events}) >= 2000, 30, lambda: f"{len(sink.events)} events")

            async def empty() -> bool:
                return await row_count(dsn) == 0

            await until_async(empty, 10, "an empty outbox")
        assert len({e.id for e in sink.events}) == 2000
    finally:
        throwaway_pg.drop_database(dsn)


async def test_listen_survives_a_postgres_restart(throwaway_pg: PostgresServer) -> None:
    dsn = throwaway_pg.create_database()
    try:
        source, sink = PostgresSource(make_config(dsn, channels=("c",)), Path()), MemorySink()
        async with running(source, sink):
            await listening(source)
            await asyncio.to_thread(throwaway_pg.restart_cluster)
            await until(lambda: source.gaps == 1 and source.listening, 10, "the re-LISTEN after the restart")
            await notify(dsn, "c", '"after restart"')
            events = await sink.exactly(1)
        assert events[0].fields["payload"] == "after restart"
    finally:
        throwaway_pg.drop_database(dsn)


# ------------------------------------------------------------------------------------------------ dry run


async def advisory_lock_holders(dsn: str) -> list[str]:
    """The application names of the sessions holding an advisory lock in this database."""
    async with db(dsn) as conn:
        rows = await conn.fetch(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
        )
        return sorted(r["application_name"] for r in rows)


async def unlocked_rows(dsn: str, table: str = "bridge_outbox") -> int:
    async with db(dsn) as conn, conn.transaction():
        return len(await conn.fetch(f"SELECT id FROM {table} FOR UPDATE SKIP LOCKED"))


async def test_a_dry_run_listens_beside_a_live_source_and_leaves_it_the_lock(
    pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.postgres")
    config = make_config(pg_database, channels=("c",))
    dry, dry_sink = PostgresSource(config, Path(), dry_run=True), MemorySink()
    live, live_sink = PostgresSource(config, Path()), MemorySink()
    async with running(dry, dry_sink):
        await listening(dry)  # started first, and still the live source below listens rather than standing by
        assert await advisory_lock_holders(pg_database) == []
        async with running(live, live_sink):
            await listening(live)
            assert await advisory_lock_holders(pg_database) == ["iii-bridge listen signups"]
            await notify(pg_database, "c", *[json.dumps(i) for i in range(20)])
            live_events = await live_sink.exactly(20)
            dry_events = await dry_sink.exactly(20)
            assert live.listening and await advisory_lock_holders(pg_database) == ["iii-bridge listen signups"]
    assert [e.fields["payload"] for e in live_events] == list(range(20))
    assert [e.fields["payload"] for e in dry_events] == list(range(20))
    assert (live_sink.activations, dry_sink.activations) == (1, 0)  # only the live source provides the type
    assert "dry run on c: listening without the advisory lock" in caplog.text
    assert "stands by" not in caplog.text


async def test_a_dry_run_shows_outbox_rows_once_each_and_leaves_them_for_a_live_source(
    pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.postgres")
    config = outbox_config(pg_database, channels=("orders",), poll_interval_ms=60_000)  # only NOTIFY wakes it
    await create_outbox(pg_database, config)
    await insert_rows(pg_database, 5)
    await insert_rows(pg_database, 1, channel="other")
    dry, dry_sink = PostgresSource(config, Path(), dry_run=True), MemorySink()
    async with running(dry, dry_sink):
        await dry_sink.exactly(5)
        assert await unlocked_rows(pg_database) == 6
        await insert_rows(pg_database, 3)  # rows inserted while the dry run runs show up, once each
        await dry_sink.exactly(8)
        await insert_rows(pg_database, 2)
        await dry_sink.exactly(10)
        assert await unlocked_rows(pg_database) == 11
    assert dry.outbox is None and dry.peek is not None and dry.peek.shown == 10
    assert [e.fields["payload"]["n"] for e in dry_sink.events] == [1, 2, 3, 4, 5, 1, 2, 3, 1, 2]
    ids = [int(e.id.rpartition(":")[2]) for e in dry_sink.events]
    assert ids == sorted(set(ids)) and dry.peek.last_id == ids[-1]
    assert {e.fields["channel"] for e in dry_sink.events} == {"orders"}
    assert await row_count(pg_database) == 11
    assert "none is claimed, locked or deleted" in caplog.text
    live, live_sink = PostgresSource(config, Path()), MemorySink()
    async with running(live, live_sink):
        await live_sink.exactly(10)

        async def only_the_other_channel_left() -> bool:
            return await row_count(pg_database) == 1

        await until_async(only_the_other_channel_left, 5, "the delivered rows deleted")
    assert sorted(live_sink.ids()) == sorted(dry_sink.ids())


async def test_a_dry_run_beside_a_live_outbox_source_sees_claimed_rows_and_takes_none(pg_database: str) -> None:
    config = outbox_config(pg_database)
    await create_outbox(pg_database, config)
    await insert_rows(pg_database, 3)
    live, live_sink = PostgresSource(config, Path()), MemorySink(hold=True)
    dry, dry_sink = PostgresSource(config, Path(), dry_run=True), MemorySink()
    async with running(live, live_sink):
        await live_sink.exactly(3)  # claimed: locked and in flight
        async with running(dry, dry_sink):
            await dry_sink.exactly(3)  # plain reads see locked rows and neither wait for nor block them
            await live_sink.ack_all()
            await until(lambda: live.outbox is not None and live.outbox.deleted == 3, 5, "3 deletions")
            await insert_rows(pg_database, 2)
            await live_sink.exactly(5)
            await dry_sink.exactly(5)
            await live_sink.ack_all()
            await until(lambda: live.outbox is not None and live.outbox.deleted == 5, 5, "5 deletions")
    assert await row_count(pg_database) == 0
    assert dry_sink.ids() == live_sink.ids()


# ----------------------------------------------------------------------------------------- DDL and checks


@pytest.mark.parametrize("table", ["bridge_outbox", "app.payment_outbox"])
async def test_outbox_ddl_runs_twice_and_passes_the_check(pg_database: str, table: str) -> None:
    config = outbox_config(pg_database, outbox_table=table)
    ddl = outbox_ddl(config)
    assert f"CREATE TABLE IF NOT EXISTS {table}" in ddl
    async with db(pg_database) as conn:
        await conn.execute(ddl)
        await conn.execute(ddl)
        await conn.execute(f"INSERT INTO {table} (channel, payload) VALUES ('x', '{{}}')")
        triggers = await conn.fetchval("SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass"
                                       " AND NOT tgisinternal", table)
    assert triggers == 1
    assert await check_outbox_table(pg_database, table) == []


# ------------------------------------------------------------------------------------------- dead letters


async def test_postgres_dead_letter_creates_its_table_and_writes_records(pg_database: str) -> None:
    source = make_config(with_password(pg_database, "s3cret-pw"), channels=("c",))
    sink = postgres_dead_letter(DeadLetterConfig(postgres_table="app_dead_letters"), source)
    assert isinstance(sink, PostgresDeadLetter)
    assert "s3cret-pw" not in sink.describe() and "app_dead_letters" in sink.describe()
    record: dict[str, Any] = {
        "source": "signups",
        "event": {"id": "pg:c:1:2", "source": "signups", "payload": "bad\x00 value"},
        "binding": None,
        "payload": None,
        "error": {"code": "decode_error", "message": "not JSON"},
        "attempts": 0,
        "first_attempt_at": None,
        "last_attempt_at": None,
    }
    failed: dict[str, Any] = {
        **record,
        "binding": {"id": "b1", "function_id": "users::welcome", "namespace": None, "config": {}},
        "payload": {"user": 1},
        "error": {"code": "timeout", "message": "timed out"},
        "attempts": 3,
        "first_attempt_at": "2024-05-01T10:00:00.000Z",
        "last_attempt_at": "2024-05-01T10:00:01.250Z",
    }
    try:
        await sink.write(record)
        await sink.write(failed)
    finally:
        await sink.close()
    async with db(pg_database) as conn:
        rows = await conn.fetch("SELECT * FROM app_dead_letters ORDER BY id")
    assert len(rows) == 2
    assert rows[0]["source"] == "signups" and rows[0]["binding"] is None and rows[0]["payload"] is None
    assert json.loads(rows[0]["event"])["payload"] == "bad\\u0000 value"  # NUL kept as its escape text
    assert (rows[0]["error_code"], rows[0]["error_message"], rows[0]["attempts"]) == ("decode_error", "not JSON", 0)
    assert json.loads(rows[1]["binding"])["function_id"] == "users::welcome"
    assert json.loads(rows[1]["payload"]) == {"user": 1}
    assert rows[1]["attempts"] == 3
    assert rows[1]["last_attempt_at"].isoformat() == "2024-05-01T10:00:01.250000+00:00"
    assert rows[1]["recorded_at"] is not None


async def test_postgres_dead_letter_failures_raise_dead_letter_error(tmp_path: Path) -> None:
    sink = PostgresDeadLetter("postgresql://u:pw@127.0.0.1:1/db", "dead", "s")
    with pytest.raises(DeadLetterError, match=r"127\.0\.0\.1:1") as info:
        await sink.write({"source": "s", "event": {}, "error": {"code": "x", "message": "y"}})
    assert "pw" not in str(info.value).replace("postgres", "")
    await sink.close()
    file_source = source_config("inbox", FileSourceConfig(path=tmp_path), description="", max_in_flight=1)
    with pytest.raises(DeadLetterError, match="needs a postgres source"):
        postgres_dead_letter(DeadLetterConfig(postgres_table="dead"), file_source)
