"""What `bridge validate` asks a database (unless ``--offline``): whether each outbox table is there and has the
shape the bridge needs. Called through :meth:`bridge.sources.postgres.spec.PostgresSpec.online_problems`."""

from __future__ import annotations

import asyncio

import asyncpg

from bridge.config import SourceConfig, redact_dsn
from bridge.config.diagnostics import Problem
from bridge.errors import BridgeError
from bridge.sources.postgres._conn import CONNECTION_ERRORS, close_quietly, connect, describe_error, plain_table_name
from bridge.sources.postgres._outboxtable import table_problems
from bridge.sources.postgres.spec import postgres_config

__all__ = ["PostgresUnreachable", "check_outbox_table", "outbox_problems"]


class PostgresUnreachable(BridgeError):
    """The database could not be reached (or answered with a connection-level error): a check was not made."""


async def check_outbox_table(dsn: str, table: str, *, timeout_s: float = 5.0) -> list[str]:
    """Problems with ``table`` as an outbox (missing table, missing or mistyped columns, id not unique, missing
    privileges); empty when it is fine. Raises PostgresUnreachable when the database cannot be reached within
    ``timeout_s`` (or refuses the login), so an offline ``bridge validate`` can skip this check."""
    try:
        name = plain_table_name(table)
    except ValueError as exc:
        return [str(exc)]
    try:
        conn = await connect(dsn, "iii-bridge validate", timeout_s)
    except CONNECTION_ERRORS as exc:
        raise PostgresUnreachable(f"cannot connect to {redact_dsn(dsn)}: {describe_error(exc)}") from None
    except ValueError:  # the client cannot parse the DSN; its message may quote part of the password
        raise PostgresUnreachable(f"cannot connect to {redact_dsn(dsn)}: the client cannot parse the DSN "
                                  "(percent-encode # ? / @ : in the password)") from None
    try:
        return await table_problems(conn, name)
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        raise PostgresUnreachable(f"cannot check {name} at {redact_dsn(dsn)}: {describe_error(exc)}") from None
    finally:
        await close_quietly(conn)


def outbox_problems(sources: list[SourceConfig], display: str, *, timeout_s: float = 3.0) -> list[Problem]:
    """`bridge validate`'s online check of the outbox table of each of ``sources`` (postgres sources). A table
    that does not exist yet is a warning (the DDL comes from `bridge sql`); a table of the wrong shape is an error;
    an unreachable database skips the check with a note (validate works offline)."""

    async def check_all() -> list[Problem]:
        problems: list[Problem] = []
        for source in sources:
            pc = postgres_config(source)
            if pc.mode != "outbox" or pc.outbox_table is None:
                continue
            where = f"sources.{source.id}.postgres.outbox_table"
            try:
                found = await check_outbox_table(pc.dsn, pc.outbox_table, timeout_s=timeout_s)
            except PostgresUnreachable as exc:
                problems.append(Problem("outbox-unchecked", where, f"not checked: {exc}", line=source.line,
                                        col=1, file=display, severity="warning"))
                continue
            for text in found:
                missing = "does not exist" in text
                problems.append(Problem("outbox-table", where, text.replace("SOURCE", source.id), line=source.line,
                                        col=1, file=display, severity="warning" if missing else "error"))
        return problems

    return asyncio.run(check_all())
