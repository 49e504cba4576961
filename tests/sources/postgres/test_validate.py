"""`bridge validate`'s look at an outbox table (bridge.sources.postgres._validate), against a real Postgres."""

from __future__ import annotations

import pytest

from bridge.sources.postgres._validate import PostgresUnreachable, check_outbox_table

from .test_source import db


async def test_check_outbox_table_reports_problems(pg_database: str) -> None:
    async with db(pg_database) as conn:
        await conn.execute("CREATE TABLE bad_outbox (id integer, payload text, created_at timestamptz)")
    problems = await check_outbox_table(pg_database, "bad_outbox")
    assert problems == [
        "outbox table bad_outbox has no column channel (text); `bridge sql SOURCE` prints its DDL",
        "outbox table bad_outbox: column payload is text, expected jsonb",
        "outbox table bad_outbox: id is not unique (make it the PRIMARY KEY)",
    ]
    assert await check_outbox_table(pg_database, "missing") == [
        "outbox table missing does not exist; `bridge sql SOURCE` prints its DDL"
    ]


async def test_check_outbox_table_signals_an_unreachable_database() -> None:
    with pytest.raises(PostgresUnreachable, match=r"cannot connect to postgresql://u:\*\*\*@127\.0\.0\.1:1/db"):
        await check_outbox_table("postgresql://u:pw@127.0.0.1:1/db", "bridge_outbox")
