"""`bridge sql` and the online outbox-table check of `bridge validate`, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from bridge.cli import main

CONFIG = """\
version: 1
sources:
  payments:
    description: payments outbox
    postgres:
      dsn: {dsn}
      mode: outbox
      outbox_table: {table}
"""


def _config(tmp_path: Path, dsn: str, table: str = "bridge_outbox") -> str:
    path = tmp_path / "bridge.yaml"
    path.write_text(CONFIG.format(dsn=dsn, table=table))
    return str(path)


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def test_validate_warns_about_a_missing_outbox_table_until_bridge_sql_creates_it(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, pg_database)
    assert main(["validate", "-c", config]) == 0
    out = capsys.readouterr().out
    expected = "warning[outbox-table] sources.payments.postgres.outbox_table: outbox table bridge_outbox does not exist"
    assert expected in out
    assert main(["sql", "-c", config, "payments"]) == 0
    ddl = capsys.readouterr().out
    asyncio.run(_execute(pg_database, ddl))
    asyncio.run(_execute(pg_database, ddl))  # idempotent
    assert main(["validate", "-c", config]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{config}: valid, 1 source"]


def test_validate_rejects_an_outbox_table_of_the_wrong_shape(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_execute(pg_database, "CREATE TABLE bad_outbox (id int, body text)"))
    config = _config(tmp_path, pg_database, "bad_outbox")
    assert main(["validate", "-c", config]) == 1
    out = capsys.readouterr().out
    assert "error[outbox-table]" in out and "has no column payload" in out
    assert main(["validate", "--offline", "-c", config]) == 0


def test_an_unreachable_database_skips_the_check_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path, "postgresql://nobody:secret@127.0.0.1:1/none")
    assert main(["validate", "-c", config]) == 0
    out = capsys.readouterr().out
    assert "warning[outbox-unchecked]" in out
    assert "secret" not in out


def test_bridge_sql_refuses_a_source_that_is_not_an_outbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text("version: 1\nsources:\n  inbox:\n    description: files\n    file: {path: ./in}\n")
    assert main(["sql", "-c", str(path), "inbox"]) == 2
    assert "not a postgres source with mode: outbox" in capsys.readouterr().err
    assert main(["sql", "-c", str(path), "nope"]) == 2
