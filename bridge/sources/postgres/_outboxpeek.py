"""Outbox mode under `bridge up --dry-run`: shows the rows a live bridge would deliver, and takes none of them.

The rows belong to the live bridge (or to the next one started): a dry run never locks, claims or deletes one.
It reads with plain SELECTs, which take no row locks and neither wait for nor block a live bridge's claims
(``FOR UPDATE SKIP LOCKED``), in id order after the last id it has shown::

    SELECT id, channel, payload FROM <table> WHERE id > $last [AND channel = ANY($channels)] ORDER BY id LIMIT n

Each row is shown once (the last id lives in memory only: every dry run starts again from the oldest row in the
table). Like the live mode it reads at start, whenever the table's trigger NOTIFYs the wake-up channel (its one
connection LISTENs on it) and every ``poll_interval_ms``, so rows inserted while it runs show up too.

What a dry run beside a live bridge sees: every row that is in the table when it reads, claimed-and-in-flight
rows included; not a row that the live bridge claims, delivers and deletes between two of its reads. And since
ids are drawn at insert, not at commit, a row whose transaction commits after a row with a higher id was shown
is skipped (only concurrent writers with slow transactions do that).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from bridge._clock import iso_now
from bridge.config import SourceConfig, redact_dsn
from bridge.sources import Outcome, Sink
from bridge.sources.postgres._conn import (
    CONNECTION_ERRORS,
    Backoff,
    application_name,
    close_quietly,
    connect,
    describe_error,
    log,
    plain_table_name,
    stop_if_cancelled,
    wait_event,
)
from bridge.sources.postgres._outboxtable import row_event, wake_channel
from bridge.sources.postgres.spec import PostgresSourceConfig

_BEFORE_ANY_ID = -(2**63)  # below every bigint: the first read starts at the oldest row


async def _nothing_to_acknowledge(outcome: Outcome) -> None:
    return None  # a dry run deletes nothing: the row stays for the live bridge


class OutboxPeek:
    """Reads outbox rows without locks and submits each once; see the module docstring. ``last_id``: the id of
    the last row shown (None before the first); ``shown``: how many rows were submitted."""

    def __init__(self, config: SourceConfig, pc: PostgresSourceConfig) -> None:
        assert pc.outbox_table is not None
        self.config = config
        self.pc = pc
        self.table = plain_table_name(pc.outbox_table)
        self.channel = wake_channel(self.table)
        where = " AND channel = ANY($3::text[])" if pc.channels else ""
        # $1::bigint: an integer id column compares with it as well (Postgres has int4 > int8).
        self._read_sql = (
            f"SELECT id, channel, payload::text AS payload FROM {self.table}"
            f" WHERE id > $1::bigint{where} ORDER BY id LIMIT $2"
        )
        self.last_id: int | None = None
        self.shown = 0
        self._wake = asyncio.Event()

    async def run(self, sink: Sink) -> None:
        pc = self.pc
        log.info(
            "postgres source %s: dry run on outbox %s at %s: rows are read without locks and shown once each; "
            "none is claimed, locked or deleted (a live bridge still delivers and deletes them all)",
            self.config.id, self.table, redact_dsn(pc.dsn),
        )
        backoff = Backoff(pc.reconnect_initial_backoff_ms, pc.reconnect_max_backoff_ms)
        while True:
            stop_if_cancelled()
            conn = None
            try:
                conn = await connect(pc.dsn, application_name(self.config.id, "dry-run outbox"))
                conn.add_termination_listener(self._on_terminated)
                await conn.add_listener(self.channel, self._on_notify)
                await self._read_until_lost(sink, conn, backoff)
            except CONNECTION_ERRORS as exc:
                await close_quietly(conn)
                conn = None
                delay = backoff.next_delay()
                hint = ""
                if isinstance(exc, asyncpg.UndefinedTableError):
                    hint = f" (`bridge sql {self.config.id}` prints the table's DDL)"
                log.warning(
                    "postgres source %s: dry run cannot read outbox rows from %s at %s: %s%s; retrying in %.1f s",
                    self.config.id, self.table, redact_dsn(pc.dsn), describe_error(exc), hint, delay,
                )
                await asyncio.sleep(delay)
            finally:
                await close_quietly(conn)

    async def _read_until_lost(self, sink: Sink, conn: Any, backoff: Backoff) -> None:
        """Read, submit and sleep until woken, until a query fails (the connection is lost: raises)."""
        limit = self.pc.batch_size
        channels = [list(self.pc.channels)] if self.pc.channels else []
        while True:
            stop_if_cancelled()
            if not sink.has_bindings():
                await sink.wait_for_bindings()
                continue
            self._wake.clear()  # before the read: a NOTIFY for a row it misses wakes it again
            after = _BEFORE_ANY_ID if self.last_id is None else self.last_id
            rows = await conn.fetch(self._read_sql, after, limit, *channels)
            backoff.reset()
            received_at = iso_now()
            for row in rows:
                await sink.submit(row_event(self.config.id, self.table, row, received_at), _nothing_to_acknowledge)
                self.last_id = row["id"]
                self.shown += 1
            if len(rows) < limit:
                await wait_event(self._wake, self.pc.poll_interval_ms / 1000)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._wake.set()

    def _on_terminated(self, _conn: Any) -> None:
        self._wake.set()  # the next read fails at once and reconnects, instead of at the next poll
