"""The outbox table's shape, apart from how rows are read: its DDL (table, wake-up trigger), the check `bridge
validate` runs on it, the wake-up channel its trigger notifies, and how one of its rows becomes an :class:`Event`.
Both readers of the table use these: the live claiming loop (:mod:`bridge.sources.postgres._outbox`) and the dry run
(:mod:`bridge.sources.postgres._outboxpeek`), so a dry run shows exactly the events a live bridge delivers.
"""

from __future__ import annotations

import hashlib
from typing import Any

from bridge import strictjson
from bridge.config import SourceConfig
from bridge.errors import DecodeError
from bridge.sources import Event
from bridge.sources.postgres._conn import plain_table_name
from bridge.sources.postgres.spec import PostgresSourceConfig


def wake_channel(table: str) -> str:
    """The NOTIFY channel an outbox table's trigger wakes the bridge on: its name as written, lower-cased (how
    Postgres folds the unquoted name), shortened with a hash suffix past Postgres' 63-byte limit."""
    name = table.lower()
    if len(name.encode()) <= 63:
        return name
    return f"{name[:50]}_{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def row_event(source_id: str, outbox_table: str, row: Any, received_at: str) -> Event:
    """The event of one outbox row (``id``, ``channel``, ``payload`` as text; ``outbox_table`` as configured). Never
    raises: a payload that does not decode strictly, or a row that cannot be read at all, makes an event with a
    DecodeError (dead-lettered with ``binding: null``, then its row is deleted like any done row) whose
    ``payload`` holds the raw text."""
    try:
        row_id, channel, text = row["id"], row["channel"], row["payload"]
    except Exception as exc:  # not the claim query's shape: still an event, so the row is dead-lettered, not stuck
        return Event(
            id=f"pg:{outbox_table}:{_field(row, 'id')}",
            source=source_id,
            fields={"channel": _field(row, "channel"), "payload": _field(row, "payload"), "pid": None,
                    "received_at": received_at},
            error=DecodeError(f"outbox row of {outbox_table} cannot be read ({type(exc).__name__}: {exc})"),
        )
    payload: Any = None
    error: DecodeError | None = None
    if text is not None:
        try:
            payload = strictjson.loads(text)
        except strictjson.Undecodable as exc:
            payload = text
            error = DecodeError(f"outbox row {row_id} of {outbox_table}: payload is not decodable JSON ({exc.reason})")
    return Event(
        id=f"pg:{outbox_table}:{row_id}",
        source=source_id,
        fields={"channel": channel, "payload": payload, "pid": None, "received_at": received_at},
        error=error,
    )


def _field(row: Any, name: str) -> Any:
    """What a row that could not be read shows of ``name``, for the dead-letter record: text, a number or None."""
    try:
        value = row[name]
        return value if value is None or isinstance(value, (str, int)) else str(value)
    except Exception:
        return None


def _object_name(bare: str, suffix: str) -> str:
    name = bare.lower() + suffix
    if len(name) <= 63:
        return name
    return f"{bare.lower()[:63 - len(suffix) - 9]}_{hashlib.sha256(bare.encode()).hexdigest()[:8]}{suffix}"


def outbox_ddl(source: SourceConfig) -> str:
    """The outbox table, its wake-up trigger function and trigger, for ``bridge sql SOURCE``. Idempotent: it
    can run again on an existing table (the table is kept, the function and trigger are replaced)."""
    pc = source.kind_config
    if not isinstance(pc, PostgresSourceConfig) or not pc.outbox_table:
        raise ValueError(f"source {source.id!r} is not a postgres source with an outbox_table")
    table = plain_table_name(pc.outbox_table)
    schema, _, bare = table.rpartition(".")
    trigger = _object_name(bare, "_notify")
    function = f"{schema}.{trigger}" if schema else trigger
    channel = wake_channel(table).replace("'", "''")
    body = f"BEGIN\n    PERFORM pg_notify('{channel}', '');\n    RETURN NULL;\nEND\n"
    tag = "$bridge$"
    while tag in body:
        tag = tag[:-1] + "_$"
    example_channel = (pc.channels[0] if pc.channels else "orders").replace("'", "''")
    source_id = " ".join(source.id.split())
    lines = [
        f"-- Outbox of the iii-bridge source {source_id}. Safe to run again: the table is kept as it is.",
        "-- The bridge claims rows (FOR UPDATE SKIP LOCKED) and deletes each once its event is done; the trigger",
        f"-- only wakes it (NOTIFY {wake_channel(table)}) so new rows do not wait for the next poll.",
        "-- Write rows in the same transaction as the change they announce:",
        f"--   INSERT INTO {table} (channel, payload) VALUES ('{example_channel}', '{{\"id\": 42}}');",
        "BEGIN;",
        *([f"CREATE SCHEMA IF NOT EXISTS {schema};"] if schema else []),
        f"CREATE TABLE IF NOT EXISTS {table} (",
        "    id         bigserial   PRIMARY KEY,",
        "    channel    text        NOT NULL,",
        "    payload    jsonb       NOT NULL,",
        "    created_at timestamptz NOT NULL DEFAULT now()",
        ");",
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {tag}",
        body + f"{tag};",
        f"DROP TRIGGER IF EXISTS {trigger} ON {table};",
        f"CREATE TRIGGER {trigger} AFTER INSERT ON {table}",
        f"    FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
        "COMMIT;",
    ]
    return "\n".join(lines) + "\n"


# Column → (accepted types as format_type prints them, what to say when it is missing or mistyped).
_EXPECTED_COLUMNS: dict[str, tuple[frozenset[str], str]] = {
    "id": (frozenset({"bigint", "integer"}), "bigint (bigserial PRIMARY KEY)"),
    "channel": (frozenset({"text", "character varying"}), "text"),
    "payload": (frozenset({"jsonb", "json"}), "jsonb"),
}


async def table_problems(conn: Any, table: str) -> list[str]:
    """What is wrong with ``table`` as an outbox for the bridge (empty: nothing). ``conn`` is open."""
    hint = "`bridge sql SOURCE` prints its DDL"
    oid = await conn.fetchval("SELECT to_regclass($1)::oid", table)
    if oid is None:
        return [f"outbox table {table} does not exist; {hint}"]
    rows = await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute"
        " WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
        oid,
    )
    columns = {r["attname"]: r["type"].split("(")[0] for r in rows}
    problems = []
    for name, (types, wanted) in _EXPECTED_COLUMNS.items():
        found = columns.get(name)
        if found is None:
            problems.append(f"outbox table {table} has no column {name} ({wanted}); {hint}")
        elif found not in types:
            problems.append(f"outbox table {table}: column {name} is {found}, expected {wanted}")
    if "id" in columns and not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = $1 AND i.indisunique AND i.indnkeyatts = 1"
        " AND a.attname = 'id')",
        oid,
    ):
        problems.append(f"outbox table {table}: id is not unique (make it the PRIMARY KEY)")
    for privilege in ("SELECT", "UPDATE", "DELETE"):  # FOR UPDATE needs UPDATE
        if not await conn.fetchval("SELECT has_table_privilege($1::oid, $2)", oid, privilege):
            problems.append(f"outbox table {table}: this user lacks the {privilege} privilege")
    return problems
