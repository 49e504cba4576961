"""The ``postgres_table`` dead-letter destination: one row per record, committed before ``write`` returns."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

from bridge._dlencode import encode_value, storable_json, storable_text
from bridge.config import redact_dsn
from bridge.errors import DeadLetterError
from bridge.sources.postgres._conn import (
    CONNECT_TIMEOUT_S,
    CONNECTION_ERRORS,
    application_name,
    describe_error,
    plain_table_name,
    terminate_pool,
)

_WRITE_TIMEOUT_S = 10.0


def _json(value: Any, notes: list[str]) -> str | None:
    # The same serialiser as the file and Kafka destinations, then made acceptable to jsonb (no \u0000, no lone
    # surrogate escape: those are kept as their escape text).
    return None if value is None else storable_json(encode_value(value, notes))


def _text(value: Any) -> str | None:
    return None if value is None else storable_text(str(value))


class PostgresDeadLetter:
    """Inserts each record into ``table`` (created on first use when missing). A record that cannot be committed
    raises DeadLetterError, so the event stays unacknowledged and the dispatcher retries the write."""

    def __init__(self, dsn: str, table: str, source_id: str) -> None:
        self.dsn = dsn
        self.table = plain_table_name(table)
        self.source_id = source_id
        self._pool: Any = None
        self._ready = False
        self._setup = asyncio.Lock()

    def describe(self) -> str:
        return f"postgres table {self.table} at {redact_dsn(self.dsn)}"

    def _ddl(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " id bigserial PRIMARY KEY,"
            " source text NOT NULL,"
            " event jsonb NOT NULL,"
            " binding jsonb,"
            " payload jsonb,"
            " error_code text NOT NULL,"
            " error_message text NOT NULL,"
            " attempts integer NOT NULL,"
            " first_attempt_at timestamptz,"
            " last_attempt_at timestamptz,"
            " recorded_at timestamptz NOT NULL DEFAULT now())"
        )

    async def _prepare(self) -> Any:
        async with self._setup:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=0,
                    max_size=2,
                    timeout=CONNECT_TIMEOUT_S,
                    command_timeout=_WRITE_TIMEOUT_S,
                    server_settings={"application_name": application_name(self.source_id, "dead letters")},
                )
            if not self._ready:
                # UniqueViolation: another replica created it at the same moment.
                with contextlib.suppress(asyncpg.UniqueViolationError):
                    await self._pool.execute(self._ddl())
                self._ready = True
        return self._pool

    async def write(self, record: dict[str, Any], *, key: bytes | None = None) -> None:
        error = record.get("error") or {}
        notes: list[str] = []
        event, binding, payload = (_json(record.get(k), notes) for k in ("event", "binding", "payload"))
        message = _text(error.get("message")) or ""
        if notes:  # the file and Kafka records carry these as "encoding_notes"; the table has no such column
            message += f" [dead-letter encoding: {'; '.join(sorted(set(notes)))}]"
        args = (
            _text(record.get("source")),
            event,
            binding,
            payload,
            _text(error.get("code")) or "unknown",
            message,
            int(record.get("attempts") or 0),
            record.get("first_attempt_at"),
            record.get("last_attempt_at"),
        )
        sql = (
            f"INSERT INTO {self.table} (source, event, binding, payload, error_code, error_message, attempts,"
            " first_attempt_at, last_attempt_at) VALUES ($1, $2::text::jsonb, $3::text::jsonb, $4::text::jsonb,"
            " $5, $6, $7, $8::text::timestamptz, $9::text::timestamptz)"
        )
        try:
            pool = await self._prepare()
            await pool.execute(sql, *args, timeout=_WRITE_TIMEOUT_S)
        except CONNECTION_ERRORS as exc:
            if isinstance(exc, asyncpg.UndefinedTableError):
                self._ready = False  # dropped under us: create it again on the next try
            raise DeadLetterError(f"cannot write dead letter to {self.describe()}: {describe_error(exc)}") from None
        except Exception as exc:  # whatever else refuses the row is a refusal too: the event is held, never lost
            raise DeadLetterError(f"cannot write dead letter to {self.describe()}: {describe_error(exc)}") from exc

    async def close(self) -> None:
        async with self._setup:
            pool, self._pool = self._pool, None
        await terminate_pool(pool)
