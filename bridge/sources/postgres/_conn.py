"""Connection plumbing shared by the postgres source's modes and its dead-letter destination."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

from bridge.sources.postgres.spec import IDENTIFIER

log = logging.getLogger("bridge.sources.postgres")

CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 30.0

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable; TimeoutError is one too
    asyncpg.PostgresError,  # includes server shutdown, "starting up", missing tables
    asyncpg.InterfaceError,  # the connection was closed under us
    # A FATAL message (pg_terminate_backend, shutdown) on an idle connection leaves it unusable for a moment
    # before the socket closes; a query sent then fails with this instead of a connection error.
    asyncpg.InternalClientError,
)
"""What a dropped or refused connection raises; a caller retries after these."""

def plain_table_name(name: str) -> str:
    """``name`` when it is a plain, optionally schema-qualified SQL name; it is spliced into SQL unquoted (so
    it folds to lower case exactly as the user's own unquoted DDL does)."""
    if not IDENTIFIER.match(name):
        raise ValueError(f"{name!r} is not a plain SQL table name (letters, digits, _, optionally schema.table)")
    return name


def application_name(source_id: str, role: str) -> str:
    """Shown in pg_stat_activity, so an operator can tell the bridge's sessions apart (63 bytes at most)."""
    return f"iii-bridge {role} {source_id}".encode()[:63].decode(errors="ignore")


async def connect(dsn: str, app_name: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """One connection; raises one of CONNECTION_ERRORS when the server cannot be reached."""
    return await asyncpg.connect(
        dsn,
        timeout=timeout_s,
        command_timeout=COMMAND_TIMEOUT_S,
        server_settings={"application_name": app_name},
    )


async def close_quietly(conn: Any) -> None:
    """Close ``conn`` within CLOSE_TIMEOUT_S whatever state it is in; abort the socket if that fails."""
    if conn is None or conn.is_closed():
        return
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await conn.close()
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except Exception:
        # A dead server or a timeout: dropping the socket ends the session (and its locks) all the same.
        conn.terminate()


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Backoff:
    """Exponential reconnection delays: initial, doubled each failure, capped; ``reset`` after a success."""

    def __init__(self, initial_ms: int, max_ms: int) -> None:
        self._initial = initial_ms / 1000
        self._max = max(max_ms, initial_ms) / 1000
        self._next = self._initial

    def reset(self) -> None:
        self._next = self._initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._max)
        return delay


async def terminate_pool(pool: Any) -> None:
    """Close a pool within CLOSE_TIMEOUT_S; terminate it (dropping every socket) if that does not work."""
    if pool is None:
        return
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await pool.close()
    except asyncio.CancelledError:
        pool.terminate()
        raise
    except Exception:
        pool.terminate()



PING_INTERVAL_S = 10.0


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Whether ``event`` is set within ``timeout_s``. Not ``asyncio.wait_for``: on Python 3.11 it swallows a
    cancellation that arrives just as the event is set, which would keep a reconnect loop running."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


def stop_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop: a library that swallowed the cancellation during
    a reconnect must not keep the loop alive."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def watch_connection(conn: Any, lost: asyncio.Event, ping_interval_s: float = PING_INTERVAL_S) -> str:
    """Return once ``conn`` is gone: ``lost`` set (by a termination listener) or a periodic ping failed. The
    ping catches a silently dead peer (a network partition) that would otherwise look like a quiet channel.
    Returns why, for the log."""
    while True:
        if await wait_event(lost, ping_interval_s):
            return "the connection was closed"
        try:
            await conn.fetchval("SELECT 1", timeout=ping_interval_s)
        except CONNECTION_ERRORS as exc:
            return f"a health check failed ({describe_error(exc)})"


def termination_event(conn: Any) -> asyncio.Event:
    """An event set when ``conn`` closes for any reason (server shutdown, pg_terminate_backend, our close)."""
    lost = asyncio.Event()

    def on_close(_conn: Any) -> None:
        lost.set()

    conn.add_termination_listener(on_close)
    return lost
