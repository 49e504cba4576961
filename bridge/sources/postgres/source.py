"""The ``postgres`` source: NOTIFY channels (``mode: listen``) or an outbox table (``mode: outbox``).

listen (at-most-once): a dedicated connection LISTENs on every channel of ``channels``. The notification
callback never blocks: it hands the event to the sink at once when the sink has room (``Sink.offer``), else puts
the notification on a bounded queue that a submit loop feeds to the sink, and drops it (counted in ``dropped``,
logged) when no function is bound or the queue is full. A NOTIFY sent while the connection is down is lost by
Postgres' design: on reconnect (exponential backoff between ``reconnect_initial_backoff_ms`` and
``reconnect_max_backoff_ms``) the source LISTENs again, logs the gap ("sent between T1 and T2 were lost") and
counts it in ``gaps``. Event: ``id = pg:<channel>:<pid>:<received ns>``, ``channel``, ``payload`` (decoded per
``payload_format``; a non-JSON payload under ``json`` becomes an event with a DecodeError, dead-lettered with
``binding: null``), ``pid`` (the notifying backend), ``received_at``.

Replicas (listen): one bridge listens per source. The listening connection takes the session-level advisory
lock :func:`listen_lock_key` (derived from the trigger type id) before it LISTENs; a replica that does not get
it stands by and tries again every second. The lock dies with its session, so when the listener's process or
connection dies a standby takes over within about a second (notifications sent in between are lost); two
replicas never both listen, so none is delivered twice.

Dry run (listen; `bridge up --dry-run`): it LISTENs without taking the lock and never activates (advertises) the
trigger type. Postgres sends every NOTIFY to every listener, so it shows what a live bridge delivers while the
live bridge keeps listening, delivering and providing the trigger type as before.

outbox (at-least-once): see :mod:`bridge.sources.postgres._outbox` (claiming, the wake-up channel); the table's DDL and
check are in :mod:`bridge.sources.postgres._outboxtable`; the dry run, which reads rows without claiming or deleting
them, in :mod:`bridge.sources.postgres._outboxpeek`.

The DSN's password never appears in logs (see :func:`bridge.config.redact_dsn`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from bridge import strictjson
from bridge._clock import iso_from_epoch, iso_from_ns
from bridge._tasks import first_then_cancel
from bridge.config import DeadLetterConfig, SourceConfig, redact_dsn
from bridge.errors import DeadLetterError, DecodeError
from bridge.sources import SHUTDOWN_GRACE_S, Event, Outcome, Sample, Sink
from bridge.sources.postgres._conn import (
    CONNECTION_ERRORS,
    Backoff,
    application_name,
    close_quietly,
    connect,
    describe_error,
    log,
    stop_if_cancelled,
    termination_event,
    wait_event,
    watch_connection,
)
from bridge.sources.postgres._deadletter import PostgresDeadLetter
from bridge.sources.postgres._outbox import OutboxMode
from bridge.sources.postgres._outboxpeek import OutboxPeek
from bridge.sources.postgres._outboxtable import outbox_ddl, wake_channel
from bridge.sources.postgres.spec import PostgresSourceConfig

__all__ = [
    "PostgresDeadLetter",
    "PostgresSource",
    "listen_lock_key",
    "outbox_ddl",
    "postgres_dead_letter",
    "wake_channel",
]

QUEUE_SIZE = 8192
"""Notifications received and not yet submitted, at most (NOTIFY payloads are < 8000 bytes each)."""
_STANDBY_RETRY_S = 1.0
_DROP_LOG_INTERVAL_S = 10.0


def listen_lock_key(source_id: str) -> int:
    """The advisory lock key of a listen-mode source: stable across processes and versions (signed bigint)."""
    digest = hashlib.sha256(f"iii-bridge:listen:{source_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def _nothing_to_acknowledge(outcome: Outcome) -> None:
    return None


class _DropLog:
    """Counts dropped notifications and logs them without flooding: at once, then at most every 10 s."""

    def __init__(self, source_id: str) -> None:
        self.source_id = source_id
        self.total = 0
        self._unlogged: dict[str, int] = {}
        self._last_log = float("-inf")

    def drop(self, reason: str, warn: bool) -> None:
        self.total += 1
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_log < _DROP_LOG_INTERVAL_S:
            return
        self._last_log = now
        for why, count in self._unlogged.items():
            log.log(
                logging.WARNING if warn else logging.INFO,
                "postgres source %s: dropped %d notification(s): %s (listen mode is at-most-once; %d dropped so far)",
                self.source_id, count, why, self.total,
            )
        self._unlogged.clear()


class PostgresSource:
    """One configured postgres source; ``run`` until cancelled. Counters for metrics: ``gaps`` (listen
    reconnections that may have lost notifications), ``dropped`` (notifications not submitted), ``received``.
    In outbox mode ``outbox`` runs the source, or ``peek`` in a dry run."""

    def __init__(
        self,
        config: SourceConfig,
        state_dir: Path,
        *,
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
        dry_run: bool = False,
    ) -> None:
        if not isinstance(config.kind_config, PostgresSourceConfig):
            raise TypeError(f"source {config.id} is not a postgres source")
        self.config = config
        self.pc: PostgresSourceConfig = config.kind_config
        self.dry_run = dry_run
        self.gaps = 0
        self.received = 0
        self.listening = False
        self._drops = _DropLog(config.id)
        self._lock_key = listen_lock_key(config.id)
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._sink: Sink | None = None
        self._last_ns = 0
        self._lost_at: float | None = None  # wall time the listening connection was lost (a gap is open)
        self.outbox: OutboxMode | None = None
        self.peek: OutboxPeek | None = None
        if self.pc.mode == "outbox":
            if not self.pc.outbox_table:
                raise ValueError(f"source {config.id}: mode outbox needs outbox_table")
            if dry_run:
                self.peek = OutboxPeek(config, self.pc)
            else:
                self.outbox = OutboxMode(config, self.pc, shutdown_grace_s)

    @property
    def dropped(self) -> int:
        return self._drops.total

    def figures(self) -> dict[str, list[Sample]]:
        """``bridge_postgres_listen_gaps`` and ``bridge_postgres_listen_dropped`` (zero in outbox mode)."""
        return {"bridge_postgres_listen_gaps": [((), self.gaps)],
                "bridge_postgres_listen_dropped": [((), self.dropped)]}

    async def run(self, sink: Sink) -> None:
        if self.outbox is not None:
            await self.outbox.run(sink)
            return
        if self.peek is not None:
            await self.peek.run(sink)
            return
        if self.dry_run:
            log.info(
                "postgres source %s: dry run on %s: listening without the advisory lock and without providing the "
                "trigger type, so a live bridge keeps listening and delivering (both get every NOTIFY)",
                self.config.id, ", ".join(self.pc.channels),
            )
        self._sink = sink
        tasks = [
            asyncio.create_task(self._listen_loop(), name=f"{self.config.id} listener"),
            asyncio.create_task(self._submit_loop(sink), name=f"{self.config.id} submitter"),
        ]
        try:
            await first_then_cancel(tasks)
            raise RuntimeError(f"postgres source {self.config.id}: the listen loop ended")
        finally:
            self.listening = False
            if not self._queue.empty():
                log.info("postgres source %s: %d received notification(s) not submitted at shutdown are dropped",
                         self.config.id, self._queue.qsize())
                while not self._queue.empty():
                    self._queue.get_nowait()

    # --- listening --------------------------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        pc = self.pc
        backoff = Backoff(pc.reconnect_initial_backoff_ms, pc.reconnect_max_backoff_ms)
        where = redact_dsn(pc.dsn)
        app_name = application_name(self.config.id, "dry-run listen" if self.dry_run else "listen")
        while True:
            stop_if_cancelled()
            conn = None
            try:
                conn = await connect(pc.dsn, app_name)
                lost = termination_event(conn)
                if not self.dry_run and not await self._take_lock(conn, lost):
                    await asyncio.sleep(backoff.next_delay())  # lost the connection while standing by
                    continue
                for channel in pc.channels:
                    await conn.add_listener(channel, self._on_notify)
                backoff.reset()
                self.listening = True
                self._log_listening(where)
                if self._sink is not None and not self.dry_run:
                    # A dry run is never the active replica: activating would make this bridge provide the
                    # trigger type (with an engine link), drawing every binding away from the live bridge.
                    self._sink.activate()
                why = await watch_connection(conn, lost)
                self._lost_at = time.time()
                self.listening = False
                self._step_down()
                log.warning("postgres source %s: the listening connection to %s was lost (%s); reconnecting",
                            self.config.id, where, why)
            except CONNECTION_ERRORS as exc:
                if self.listening:
                    self._lost_at = time.time()
                    self.listening = False
                    self._step_down()
                delay = backoff.next_delay()
                log.warning("postgres source %s: cannot listen at %s: %s; retrying in %.1f s",
                            self.config.id, where, describe_error(exc), delay)
                await close_quietly(conn)
                conn = None
                await asyncio.sleep(delay)
            finally:
                self.listening = False
                await close_quietly(conn)

    def _step_down(self) -> None:
        # The lock died with the connection: another replica may take it and provide the trigger type now.
        if self._sink is not None and not self.dry_run:
            self._sink.deactivate()

    async def _take_lock(self, conn: Any, lost: asyncio.Event) -> bool:
        """Take the source's advisory lock on ``conn``, standing by while another replica holds it. False if
        the connection was lost meanwhile."""
        standing_by = False
        while not lost.is_set():
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._lock_key):
                if standing_by:
                    log.info("postgres source %s: the replica that listened is gone; this one listens now "
                             "(notifications sent in between were lost)", self.config.id)
                return True
            if not standing_by:
                standing_by = True
                if self._lost_at is not None:
                    # Another replica took over while we were away: the gap is not ours to report.
                    log.info("postgres source %s: another replica took over listening meanwhile", self.config.id)
                    self._lost_at = None
                log.info(
                    "postgres source %s: another bridge listens on %s (advisory lock %d); this one stands by and "
                    "retries every %.0f s", self.config.id, ", ".join(self.pc.channels), self._lock_key,
                    _STANDBY_RETRY_S,
                )
            await wait_event(lost, _STANDBY_RETRY_S)
        return False

    def _log_listening(self, where: str) -> None:
        channels = ", ".join(self.pc.channels)
        if self._lost_at is None:
            log.info("postgres source %s: listening on %s at %s", self.config.id, channels, where)
            return
        self.gaps += 1
        log.warning(
            "postgres source %s: listening on %s again; notifications sent between %s and %s were lost "
            "(listen mode is at-most-once; use mode: outbox to keep them)",
            self.config.id, channels, iso_from_epoch(self._lost_at), iso_from_epoch(time.time()),
        )
        self._lost_at = None

    def _on_notify(self, _conn: Any, pid: int, channel: str, payload: str) -> None:
        # Called by asyncpg for every NOTIFY. An exception raised here would only be logged by asyncpg, and the
        # notification lost without a count: whatever happens, it ends here, counted.
        try:
            self._take(pid, channel, payload)
        except Exception:
            log.exception("postgres source %s: a notification on %s could not be taken (a bug: please report it)",
                          self.config.id, channel)
            self._drops.drop("the bridge failed to take it (see the error logged)", warn=True)

    def _take(self, pid: int, channel: str, payload: str) -> None:
        # Must never block. When the sink can take the event at once it gets it here; otherwise (window full, or
        # earlier notifications still queued) the event is queued.
        ns = time.time_ns()
        if ns <= self._last_ns:
            ns = self._last_ns + 1  # keeps event ids unique even if the clock stalls or steps back
        self._last_ns = ns
        self.received += 1
        sink = self._sink
        if sink is None or not sink.has_bindings():
            self._drops.drop("no function is bound to this source", warn=False)
            return
        if self._queue.full():
            self._drops.drop(f"{QUEUE_SIZE} notifications already wait for delivery (deliveries are slower than "
                             "NOTIFYs arrive)", warn=True)
            return
        event = self._event(channel, pid, payload, ns)  # decoded once, whichever way it goes on
        if self._queue.empty() and sink.offer(event, _nothing_to_acknowledge):
            return  # the usual case: delivery starts now, with no hop through the submit loop
        self._queue.put_nowait(event)  # room checked above; nothing else puts on this loop meanwhile

    # --- submitting -------------------------------------------------------------------------------------------

    async def _submit_loop(self, sink: Sink) -> None:
        while True:
            event = await self._queue.get()
            if not sink.has_bindings():
                self._drops.drop("no function is bound to this source", warn=False)
                continue
            await sink.submit(event, _nothing_to_acknowledge)

    def _event(self, channel: str, pid: int, payload: str, ns: int) -> Event:
        value: Any = payload
        error: DecodeError | None = None
        if self.pc.payload_format == "json":
            try:
                value = strictjson.loads(payload)
            except strictjson.Undecodable as exc:
                # event.payload keeps the raw text for the dead-letter record.
                hint = "empty; a bare NOTIFY needs payload_format: text" if not payload else exc.reason
                error = DecodeError(f"NOTIFY payload on channel {channel} is not JSON ({hint})")
        return Event(
            id=f"pg:{channel}:{pid}:{ns}",
            source=self.config.id,
            fields={"channel": channel, "payload": value, "pid": pid, "received_at": iso_from_ns(ns)},
            error=error,
        )


def postgres_dead_letter(config: DeadLetterConfig, source: SourceConfig) -> PostgresDeadLetter:
    """The ``postgres_table`` dead-letter destination of ``source``, written through the source's own DSN."""
    if config.postgres_table is None:
        raise DeadLetterError(f"source {source.id!r}: no postgres_table dead letter is configured")
    if not isinstance(source.kind_config, PostgresSourceConfig):
        raise DeadLetterError(
            f"source {source.id!r}: a postgres_table dead letter needs a postgres source (it uses the source's dsn)"
        )
    return PostgresDeadLetter(source.kind_config.dsn, config.postgres_table, source.id)
