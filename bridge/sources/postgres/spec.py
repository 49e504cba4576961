"""The ``postgres`` kind (LISTEN/NOTIFY or an outbox table): its config, checks, event fields, docs prose and
figures. No client library here: the source, the dead-letter table and `bridge validate`'s look at an outbox table
(:mod:`bridge.sources.postgres._validate`) load asyncpg when they are used."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bridge._redact import redact
from bridge.sources import Figure, KindChecker, KindSpec, Source, is_set
from bridge.sources._prose import names

if TYPE_CHECKING:
    from bridge.config import BridgeConfig, DeadLetterConfig, SourceConfig
    from bridge.config.diagnostics import Problem
    from bridge.config.yamlpos import KeyPath
    from bridge.deadletter import DeadLetterSink


@dataclass(frozen=True)
class PostgresSourceConfig:
    dsn: str
    channels: tuple[str, ...] = ()
    payload_format: Literal["text", "json"] = "json"
    mode: Literal["listen", "outbox"] = "listen"
    outbox_table: str | None = None
    poll_interval_ms: int = 1000
    batch_size: int = 100
    reconnect_initial_backoff_ms: int = 500
    reconnect_max_backoff_ms: int = 30000


IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}(\.[A-Za-z_][A-Za-z0-9_$]{0,62})?$")
"""A plain, optionally schema-qualified SQL table name (what the bridge is willing to put into SQL)."""


def postgres_config(source: SourceConfig) -> PostgresSourceConfig:
    """``source.kind_config`` of a postgres source."""
    pc = source.kind_config
    assert isinstance(pc, PostgresSourceConfig), f"{source.id} is a {source.kind} source"
    return pc


def _outbox(source: SourceConfig) -> bool:
    return postgres_config(source).mode == "outbox"


class PostgresSpec(KindSpec):
    name = "postgres"
    config_type = PostgresSourceConfig
    event_fields = (
        ("id", "string", "listen: `pg:<channel>:<backend pid>:<received ns>`; outbox: `pg:<table>:<row id>`"),
        ("source", "string", "the trigger type id"),
        ("channel", "string", "the NOTIFY channel (outbox: the row's channel)"),
        ("payload", "per payload_format", "the NOTIFY payload, text or parsed JSON (outbox: the row's payload)"),
        ("pid", "integer or null", "the notifying backend's process id (outbox: null)"),
        ("received_at", "string", "when the bridge received it, ISO-8601 UTC"),
    )
    sample_event: dict[str, Any] = {  # noqa: RUF012 (read-only by convention, like every spec attribute)
        "channel": "signups", "payload": {"user_id": 7}, "pid": 4242, "received_at": "2026-01-01T00:00:00.000Z",
    }
    figures = (
        Figure("bridge_postgres_listen_gaps",
               "Times the LISTEN connection was re-established; notifications sent meanwhile are lost.", "counter"),
        Figure("bridge_postgres_listen_dropped",
               "Notifications received in listen mode and dropped (no function bound, or the queue was full).",
               "counter"),
    )
    dead_letter_key = "postgres_table"
    reserved_options: Mapping[str, Mapping[str, str]] = {}

    # -- config

    def schema(self) -> dict[str, Any]:
        from bridge.config.schemas import kind_schema

        return kind_schema(self.name)

    def build(self, source_id: str, block: dict[str, Any], resolve: Callable[[str], Path]) -> PostgresSourceConfig:
        return PostgresSourceConfig(**{**block, "channels": tuple(block.get("channels") or ())})

    def check(self, checker: KindChecker, here: KeyPath, block: dict[str, Any]) -> None:
        dsn = block.get("dsn")
        if isinstance(dsn, str) and _unencoded_password(dsn):
            checker.add("value", (*here, "dsn"), "the password seems to hold an unencoded # ? / or @, which the "
                        "database client reads as the end of the host", "percent-encode them: %23 %3F %2F %40",
                        severity="warning")
        mode = block.get("mode", PostgresSourceConfig.mode)
        table = block.get("outbox_table")
        if mode == "outbox" and not is_set(table):
            checker.require(here, ("outbox_table",), "mode: outbox needs outbox_table",
                            "bridge sql SOURCE prints the table's DDL")
        elif mode != "outbox" and is_set(table):
            checker.add("value", (*here, "outbox_table"), "only used with mode: outbox", key=True)
        if isinstance(table, str) and table and not IDENTIFIER.match(table):
            checker.add("value", (*here, "outbox_table"), f"{table!r} is not a plain SQL table name",
                        "letters, digits and _, optionally schema-qualified: app.bridge_outbox")
        if mode == "listen" and not is_set(block.get("channels")):
            checker.require(here, ("channels",), "mode: listen needs at least one channel in channels")

    def check_dead_letter(self, checker: KindChecker, path: KeyPath, value: Any) -> None:
        if isinstance(value, str) and value and not IDENTIFIER.match(value):
            checker.add("value", path, f"{value!r} is not a plain SQL table name")

    def online_problems(self, config: BridgeConfig, display: str) -> list[Problem]:
        outboxes = [s for s in config.sources if s.kind == self.name and _outbox(s)]
        if not outboxes:
            return []
        from bridge.sources.postgres._validate import outbox_problems

        return outbox_problems(outboxes, display)

    def exclusive(self, source: SourceConfig) -> bool:
        return not _outbox(source)  # one replica LISTENs (an advisory lock); outbox replicas share the rows

    def render_id(self, fields: dict[str, Any]) -> str | None:
        return f"pg:{fields['channel']}:0:0" if "channel" in fields else None

    def ddl(self, source: SourceConfig) -> str | None:
        if not _outbox(source):
            return None
        from bridge.sources.postgres._outboxtable import outbox_ddl

        return outbox_ddl(source)

    # -- docs prose

    def summary(self, source: SourceConfig, base: Path) -> str:
        pc = postgres_config(source)
        if pc.mode == "outbox":
            channels = f"rows of channels {names(pc.channels)}" if pc.channels else "every row"
            return (
                f"Postgres outbox table `{redact(pc.outbox_table)}` ({channels}), woken by NOTIFY and polled every "
                f"{pc.poll_interval_ms} ms, {pc.batch_size} rows per claim"
            )
        return f"Postgres LISTEN on channels {names(pc.channels)}, payload as {pc.payload_format}"

    def guarantee(self, source: SourceConfig) -> str:
        if _outbox(source):
            return (
                f"at-least-once. Rows of `{redact(postgres_config(source).outbox_table)}` are claimed with `FOR "
                "UPDATE SKIP LOCKED` and deleted once their event is done; NOTIFY only wakes the bridge, which also "
                "polls, so nothing is lost across crashes, Postgres restarts or replicas. A crash before the delete "
                "delivers the row again; `event.id` (`pg:<table>:<row id>`) identifies it."
            )
        return (
            "at-most-once. Postgres keeps no NOTIFY for later: a notification sent while no bridge listens (a "
            "restart, a lost connection) is lost. On reconnect the bridge LISTENs again, logs the gap and counts "
            "it in `bridge_postgres_listen_gaps_total`. With several replicas only one listens per channel."
        )

    def ordering(self, source: SourceConfig) -> str:
        n = source.max_in_flight
        if _outbox(source):
            return (
                f"rows are claimed in id order and up to {n} are delivered concurrently, so calls can overlap and "
                "finish out of order."
            )
        return (
            f"notifications are taken in arrival order and up to {n} are delivered concurrently, so calls can "
            "overlap and finish out of order."
        )

    def back_pressure(self, source: SourceConfig) -> str:
        if _outbox(source):
            return "further rows wait in the table."
        return (
            "notifications wait in a bounded queue in memory; when it is full they are dropped, logged and "
            "counted (`bridge_postgres_listen_dropped_total`)."
        )

    def unbound(self, source: SourceConfig) -> str:
        if _outbox(source):
            return "rows wait in the table until a function binds."
        return "notifications are dropped and counted (listen mode is at-most-once)."

    def outage_wait(self, source: SourceConfig) -> str:
        if _outbox(source):
            return "rows wait in the table"
        return (
            "the bridge keeps listening and notifications wait in memory (up to the bounded queue; beyond it they "
            "are dropped and counted in `bridge_postgres_listen_dropped_total`)"
        )

    def replicas(self, source: SourceConfig) -> tuple[str, str]:
        if _outbox(source):
            return (
                f"They share the rows of `{redact(postgres_config(source).outbox_table)}` (`FOR UPDATE SKIP LOCKED`)",
                "The rows it had claimed are released with its database session and claimed again by the others.",
            )
        return (
            "one of them listens (a Postgres advisory lock); the others stand by and one takes over within about a "
            "second when the listener or its connection goes (notifications sent in between are lost)",
            "",
        )

    def dead_letter_place(self, dead: DeadLetterConfig) -> str:
        return f"the table `{redact(dead.postgres_table)}` in the source's database"

    # -- running

    def open_source(self, source: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> Source:
        from bridge.sources.postgres.source import PostgresSource

        return PostgresSource(source, state_dir, dry_run=dry_run)

    def open_dead_letter(self, dead: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
        from bridge.sources.postgres.source import postgres_dead_letter

        return postgres_dead_letter(dead, source)

    def connection(self, source: SourceConfig) -> str:
        return postgres_config(source).dsn


def _unencoded_password(dsn: str) -> bool:
    """Whether a URL DSN's password (up to the LAST @) holds a character that ends the host for a URL parser.
    ``host:5432/db?x=a@b`` is a port and a query, not a password: digits before the first / ? # are a port."""
    scheme, sep, rest = dsn.partition("://")
    at = rest.rfind("@")
    if not sep or not scheme or at < 0:
        return False
    user, colon, password = rest[:at].partition(":")
    if not colon or any(c in user for c in "/?#"):
        return False
    head = re.split(r"[/?#]", password, maxsplit=1)[0]
    return any(c in password for c in "/?#@") and not head.isdigit()


SPEC = PostgresSpec()
