"""The outbox table's shape, apart from how rows are read: its DDL (table, wake-up trigger), the check `bridge
validate` runs on it, the wake-up channel its trigger notifies, and how one of its rows becomes an :class:`Event`.
Both readers of the table use these: the live claiming loop (:mod:`bridge.sources._pgoutbox`) and the dry run
(:mod:`bridge.sources._pgoutboxpeek`), so a dry run shows exactly the events a live bridge delivers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from bridge.config import PostgresSourceConfig, SourceConfig
from bridge.sources import Event
from bridge.sources._pgconn import plain_table_name


def wake_channel(table: str) -> str:
    """The NOTIFY channel an outbox table's trigger wakes the bridge on: its name as written, lower-cased (how
    Postgres folds the unquoted name), shortened with a hash suffix past Postgres' 63-byte limit."""
    name = table.lower()
    if len(name.encode()) <= 63:
        return name
    return f"{name[:50]}_{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def row_event(source_id: str, outbox_table: str, row: Any, received_at: str) -> Event:
    """The event of one outbox row (``id``, ``channel``, ``payload`` as text); ``outbox_table`` as configured."""
    text = row["payload"]
    return Event(
        id=f"pg:{outbox_table}:{row['id']}",
        source=source_id,
        fields={
            "channel": row["channel"],
            "payload": None if text is None else json.loads(text),
            "pid": None,
            "received_at": received_at,
        },
    )


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
