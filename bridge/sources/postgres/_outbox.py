"""Outbox mode of the postgres source (at-least-once): claiming, deleting, waking. The table's DDL, its check
and the row → event mapping are in :mod:`bridge.sources.postgres._outboxtable`; `bridge up --dry-run` reads the table
without claiming anything (:mod:`bridge.sources.postgres._outboxpeek`).

Claiming: a claim opens a transaction on a pooled connection and locks up to ``batch_size`` rows with
``SELECT ... ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED``. That transaction *is* the claim: it stays open while
the batch's events are in flight, so replicas skip those rows; once every row of the batch is done, the done
rows are deleted (``DELETE ... WHERE id = ANY(...)``) and the transaction commits. If the bridge crashes, or
the server restarts, the transaction dies with its session: nothing is deleted, the locks are gone, and the
rows are claimed again (at-least-once; a row may then be delivered twice, never zero times). Many rows in
flight share one connection per batch; at most a handful of batches are open at once.

Flow: a batch is claimed whenever the in-flight window has a free slot and fewer than ``max_in_flight /
batch_size + 2`` batches (at most 8) are open; its rows are submitted one by one as slots free up, so at most
one batch of rows waits locked-but-unsubmitted (a small prefetch that keeps the window full across claims).

Trade-off: a batch commits as a whole, so one slow or retrying row keeps its finished siblings locked (not
redelivered by replicas, but redelivered after a crash) and keeps a transaction open meanwhile (which holds
back vacuum and trips ``idle_in_transaction_session_timeout`` if the server sets one: the rows then simply come
back). Other batches keep flowing meanwhile (up to the cap on open batches), so a slow row stalls only its own
batch. Keep ``batch_size`` modest (tens to a few hundred) when deliveries can be slow.

Waking: an ``AFTER INSERT ... FOR EACH STATEMENT`` trigger runs ``pg_notify(<table name>, '')``; a dedicated
connection LISTENs on that channel (the outbox table's name as written in bridge.yaml, lower-cased; see
:func:`wake_channel`). The table name rather than a row channel is used so that the wake-ups never reach a
listen-mode source on a business channel (it would dead-letter the empty payloads). Besides wake-ups the table
is polled at start (rows inserted while the bridge was down) and every ``poll_interval_ms``. ``channels``, when
given, restricts the rows this source claims to those channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from bridge._clock import iso_now
from bridge._tasks import first_then_cancel
from bridge.config import SourceConfig, redact_dsn
from bridge.sources import Outcome, Sink
from bridge.sources.postgres._conn import (
    CONNECT_TIMEOUT_S,
    CONNECTION_ERRORS,
    Backoff,
    application_name,
    close_quietly,
    connect,
    describe_error,
    log,
    plain_table_name,
    stop_if_cancelled,
    terminate_pool,
    termination_event,
    wait_event,
    watch_connection,
)
from bridge.sources.postgres._outboxtable import row_event, wake_channel
from bridge.sources.postgres.spec import PostgresSourceConfig

_MAX_BATCHES = 8
_RELEASE_TIMEOUT_S = 5.0


@dataclass(eq=False)
class _Batch:
    """One claim: a transaction holding the locks of ``ids`` until every one is done (or shutdown)."""

    conn: Any
    tx: Any
    ids: list[int]
    done: set[int] = field(default_factory=set)
    over: asyncio.Event = field(default_factory=asyncio.Event)  # every row done, shutdown, or connection lost

    def mark_done(self, row_id: int | None) -> None:
        if row_id is not None:
            self.done.add(row_id)
        if len(self.done) >= len(self.ids):
            self.over.set()

    def on_terminated(self, _conn: Any) -> None:
        self.over.set()  # nothing to commit any more: release the pool slot now


class OutboxMode:
    """Claims, submits and deletes outbox rows; see the module docstring."""

    def __init__(self, config: SourceConfig, pc: PostgresSourceConfig, shutdown_grace_s: float) -> None:
        assert pc.outbox_table is not None
        self.config = config
        self.pc = pc
        self.table = plain_table_name(pc.outbox_table)
        self.channel = wake_channel(self.table)
        self.shutdown_grace_s = shutdown_grace_s
        # Enough batches to cover the window, plus one being submitted and one finishing.
        self._max_batches = min(_MAX_BATCHES, -(-config.max_in_flight // pc.batch_size) + 2)
        where = " WHERE channel = ANY($2::text[])" if pc.channels else ""
        self._claim_sql = (
            f"SELECT id, channel, payload::text AS payload FROM {self.table}{where}"
            " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        )
        self._delete_sql = f"DELETE FROM {self.table} WHERE id = ANY($1::bigint[])"
        self._rows: dict[int, list[_Batch]] = {}  # row id → batches waiting for its event (usually one)
        self._batches: set[_Batch] = set()
        self._holders: set[asyncio.Task[None]] = set()
        self._outstanding = 0  # events submitted and not done
        self._wake = asyncio.Event()
        self._capacity = asyncio.Event()
        self.claimed = 0
        self.deleted = 0

    async def run(self, sink: Sink) -> None:
        pc = self.pc
        pool = await asyncpg.create_pool(
            pc.dsn,
            min_size=0,
            max_size=self._max_batches + 1,
            timeout=CONNECT_TIMEOUT_S,
            server_settings={"application_name": application_name(self.config.id, "outbox")},
        )
        log.info(
            "postgres source %s: outbox mode on %s at %s (woken by NOTIFY %s, polled every %d ms%s)",
            self.config.id, self.table, redact_dsn(pc.dsn), self.channel, pc.poll_interval_ms,
            f", channels {', '.join(pc.channels)}" if pc.channels else "",
        )
        tasks = [
            asyncio.create_task(self._listen(), name=f"{self.config.id} outbox wake-ups"),
            asyncio.create_task(self._claim_loop(sink, pool), name=f"{self.config.id} outbox claims"),
        ]
        try:
            await first_then_cancel(tasks)
            raise RuntimeError(f"postgres source {self.config.id}: the outbox loop ended")
        finally:
            try:
                await self._finish_batches()
            finally:
                await terminate_pool(pool)

    # --- claiming ---------------------------------------------------------------------------------------------

    async def _claim_loop(self, sink: Sink, pool: Any) -> None:
        pc = self.pc
        backoff = Backoff(pc.reconnect_initial_backoff_ms, pc.reconnect_max_backoff_ms)
        failing = False
        while True:
            stop_if_cancelled()
            if not sink.has_bindings():
                await sink.wait_for_bindings()  # rows wait in the table, unclaimed, for replicas or for later
                continue
            if self._outstanding >= self.config.max_in_flight or len(self._batches) >= self._max_batches:
                self._capacity.clear()
                if self._outstanding >= self.config.max_in_flight or len(self._batches) >= self._max_batches:
                    await self._capacity.wait()
                continue
            limit = pc.batch_size
            self._wake.clear()  # before the claim: a NOTIFY for a row our snapshot misses wakes us again
            try:
                got = await self._claim(sink, pool, limit)
            except CONNECTION_ERRORS as exc:
                delay = backoff.next_delay()
                hint = ""
                if isinstance(exc, asyncpg.UndefinedTableError):
                    hint = f" (`bridge sql {self.config.id}` prints the table's DDL)"
                log.warning(
                    "postgres source %s: cannot claim outbox rows from %s: %s%s; retrying in %.1f s",
                    self.config.id, self.table, describe_error(exc), hint, delay,
                )
                failing = True
                await asyncio.sleep(delay)
                continue
            if failing:
                log.info("postgres source %s: claiming from %s works again", self.config.id, self.table)
                failing = False
            backoff.reset()
            if got < limit:  # the table is drained (for us): sleep until a NOTIFY or the next poll
                await wait_event(self._wake, pc.poll_interval_ms / 1000)

    async def _claim(self, sink: Sink, pool: Any, limit: int) -> int:
        conn = await pool.acquire(timeout=CONNECT_TIMEOUT_S)
        tx = conn.transaction()
        try:
            await tx.start()
            args: list[Any] = [limit, list(self.pc.channels)] if self.pc.channels else [limit]
            rows = await conn.fetch(self._claim_sql, *args)
        except asyncio.CancelledError:
            await self._release(pool, conn, tx, abort=True)
            raise
        except BaseException:
            await self._release(pool, conn, tx)
            raise
        if not rows:
            await self._release(pool, conn, tx)
            return 0
        batch = _Batch(conn, tx, [r["id"] for r in rows])
        conn.add_termination_listener(batch.on_terminated)
        self._batches.add(batch)
        self.claimed += len(rows)
        holder = asyncio.create_task(self._hold(pool, batch), name=f"{self.config.id} outbox batch")
        self._holders.add(holder)
        holder.add_done_callback(self._holders.discard)
        received_at = iso_now()
        for index, row in enumerate(rows):
            try:
                await self._submit(sink, batch, row, received_at)
            except BaseException:
                # Stopped mid-batch: the rows not submitted are not waited for; the commit releases them.
                batch.ids = batch.ids[:index]
                batch.mark_done(None)
                raise
        return len(rows)

    async def _submit(self, sink: Sink, batch: _Batch, row: Any, received_at: str) -> None:
        row_id: int = row["id"]
        waiting = self._rows.get(row_id)
        if waiting is not None:
            # Still in flight from a batch whose connection died: wait for that event instead of sending it again.
            waiting.append(batch)
            return
        event = row_event(self.config.id, self.table, row, received_at)
        waiting = self._rows[row_id] = [batch]
        self._outstanding += 1

        async def on_done(outcome: Outcome) -> None:
            self._row_done(row_id)

        try:
            await sink.submit(event, on_done)
        except BaseException:
            if self._rows.get(row_id) is waiting:
                del self._rows[row_id]
                self._outstanding -= 1
            raise

    def _row_done(self, row_id: int) -> None:
        waiting = self._rows.pop(row_id, None)
        if waiting is None:
            return
        self._outstanding -= 1
        for batch in waiting:
            batch.mark_done(row_id)
        self._capacity.set()

    # --- finishing batches ------------------------------------------------------------------------------------

    async def _hold(self, pool: Any, batch: _Batch) -> None:
        """Wait until the batch is over, then delete its done rows and commit; the rest stays in the table."""
        try:
            await batch.over.wait()
            done = [i for i in batch.ids if i in batch.done]
            try:
                if done:
                    await batch.conn.execute(self._delete_sql, done)
                await batch.tx.commit()
            except CONNECTION_ERRORS as exc:
                log.warning(
                    "postgres source %s: a batch of %d outbox row(s) could not be deleted and committed (%s); "
                    "its rows stay in %s and are delivered again",
                    self.config.id, len(batch.ids), describe_error(exc), self.table,
                )
                return
            self.deleted += len(done)
            if len(done) < len(batch.ids):
                log.info(
                    "postgres source %s: %d outbox row(s) were not done; released in %s for a later claim",
                    self.config.id, len(batch.ids) - len(done), self.table,
                )
        finally:
            self._batches.discard(batch)
            with contextlib.suppress(asyncpg.InterfaceError):  # the pool released it already, on close
                if not batch.conn.is_closed():
                    batch.conn.remove_termination_listener(batch.on_terminated)
            await self._release(pool, batch.conn, batch.tx)
            self._capacity.set()

    @staticmethod
    async def _release(pool: Any, conn: Any, tx: Any, *, abort: bool = False) -> None:
        """End ``tx`` if it is still open and return ``conn`` to the pool. ``abort`` drops the connection instead
        (after a cancellation mid-query): the session ends and its transaction and locks with it."""
        if abort:
            conn.terminate()
        else:
            # InterfaceError: the transaction is already over, or the connection is gone.
            with contextlib.suppress(*CONNECTION_ERRORS):
                async with asyncio.timeout(_RELEASE_TIMEOUT_S):
                    await tx.rollback()
        try:
            await pool.release(conn, timeout=_RELEASE_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # asyncpg raises InternalClientError too when a dying connection is reset
            log.debug("releasing an outbox connection failed (%s); the pool dropped it", describe_error(exc))

    async def _finish_batches(self) -> None:
        """Shutdown: give in-flight rows up to ``shutdown_grace_s`` to finish, then commit what is done."""
        if self._batches:
            pending = sum(len(b.ids) - len(b.done) for b in self._batches)
            log.info(
                "postgres source %s: waiting up to %.0f s for %d outbox row(s) in flight",
                self.config.id, self.shutdown_grace_s, pending,
            )
            deadline = time.monotonic() + self.shutdown_grace_s
            while self._batches and time.monotonic() < deadline:
                self._capacity.clear()
                await wait_event(self._capacity, max(0.0, deadline - time.monotonic()))
        for batch in list(self._batches):
            batch.over.set()
        if self._holders:
            await asyncio.wait(set(self._holders), timeout=_RELEASE_TIMEOUT_S * 2)

    # --- wake-ups ---------------------------------------------------------------------------------------------

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        """Keep a connection LISTENing on the wake-up channel. Losing it costs latency only (polling goes on)."""
        pc = self.pc
        backoff = Backoff(pc.reconnect_initial_backoff_ms, pc.reconnect_max_backoff_ms)
        while True:
            stop_if_cancelled()
            conn = None
            try:
                conn = await connect(pc.dsn, application_name(self.config.id, "outbox wake-ups"))
                lost = termination_event(conn)
                await conn.add_listener(self.channel, self._on_notify)
                backoff.reset()
                self._wake.set()  # NOTIFYs may have been missed while we were not listening
                why = await watch_connection(conn, lost)
                log.warning(
                    "postgres source %s: the wake-up connection was lost (%s); reconnecting (rows are still polled "
                    "every %d ms)", self.config.id, why, pc.poll_interval_ms,
                )
            except CONNECTION_ERRORS as exc:
                delay = backoff.next_delay()
                log.warning(
                    "postgres source %s: cannot LISTEN for outbox wake-ups at %s: %s; retrying in %.1f s",
                    self.config.id, redact_dsn(pc.dsn), describe_error(exc), delay,
                )
                await asyncio.sleep(delay)
            finally:
                await close_quietly(conn)
