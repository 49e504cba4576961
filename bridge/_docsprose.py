"""The plain-words parts of the Worker Docs (:mod:`bridge.docs`): what each source reads, and its delivery
guarantee, ordering, retries, dead letters, back-pressure, engine outages and replicas, worded from its config
(DESIGN.md §3)."""

from __future__ import annotations

import os
from pathlib import Path

from bridge.config import (
    DeadLetterConfig,
    DeliveryConfig,
    EngineConfig,
    FileSourceConfig,
    KafkaSourceConfig,
    PostgresSourceConfig,
    SourceConfig,
    redact,
)
from bridge.sources import exclusive

COMMON = """\
A function receives the events of a trigger type once it is bound to it with `register_trigger` and a bind \
config. The bridge checks the bind config against the trigger type's schema when the binding arrives and rejects \
a config that does not match, naming every violation by its JSON path. Each event goes to every binding of its \
trigger type (fan-out): a binding that fails and retries never makes the others see the event again, and an event \
is done once every binding has succeeded, been filtered out or been dead-lettered. A bind config may always hold \
`condition_function_id` (an iii convention): that function is called with the rendered payload before each \
delivery, and the binding receives the event only when it does not return false. An error the condition function \
raises skips the binding too; a call that fails because of the link (engine unreachable, `TIMEOUT`, \
`invocation_stopped`) says nothing about the condition and is retried like a delivery."""

BIND_INTRO = (
    "Pass these options as `config` when binding (JSON Schema 2020-12, advertised to iii as the trigger type's "
    "request format); defaults are filled in before the templates see `config`."
)

WHEN = "When it is false the binding skips the event, which counts as handled."

PAYLOAD_SCHEMA = (
    "Every rendered payload is checked against `payload_schema`{title}, which is also advertised to iii as the "
    "call request format; a payload that breaks it is dead-lettered for that binding, without retry."
)

WHOLE_EVENT = "The function receives the whole event (no `payload` template is configured):"

TEMPLATED = (
    "The payload is rendered per binding from this template tree (a template that is exactly one "
    "`{{ expression }}` keeps the expression's type; a render error dead-letters the event for that binding):"
)

EXAMPLE_INTRO = (
    "With `iii` your connected iii-sdk client, and the function already registered on it (the config shown "
    "holds the options' examples or defaults):"
)


def relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (POSIX separators, ``./`` prefix) so no machine path is shown."""
    text = os.path.relpath(path, base).replace(os.sep, "/")
    return text if text.startswith("../") else f"./{text}"


def _names(values: tuple[str, ...]) -> str:
    return ", ".join(f"`{redact(v)}`" for v in values)


def source_summary(source: SourceConfig, base: Path) -> str:
    """What the source reads, without connection settings (brokers, DSNs and credentials are not shown)."""
    kc = source.kind_config
    if isinstance(kc, KafkaSourceConfig):
        topics = f"topics matching `{kc.topic_pattern}`" if kc.topic_pattern else f"topics {_names(kc.topics)}"
        return (
            f"Kafka {topics}, consumer group `{redact(kc.group_id)}` (starts from {kc.start_from} when the group "
            f"has no committed offset); key as {kc.key_format}, value as {kc.value_format}"
        )
    if isinstance(kc, PostgresSourceConfig):
        if kc.mode == "outbox":
            channels = f"rows of channels {_names(kc.channels)}" if kc.channels else "every row"
            return (
                f"Postgres outbox table `{redact(kc.outbox_table)}` ({channels}), woken by NOTIFY and polled every "
                f"{kc.poll_interval_ms} ms, {kc.batch_size} rows per claim"
            )
        return f"Postgres LISTEN on channels {_names(kc.channels)}, payload as {kc.payload_format}"
    assert isinstance(kc, FileSourceConfig)
    scope = "with subdirectories" if kc.recursive else "top level only"
    after = {"keep": "kept in place", "delete": "deleted"}.get(kc.after_delivery, "")
    if kc.after_delivery == "move" and kc.move_to is not None:
        after = f"moved to `{relative(kc.move_to, base)}`"
    return (
        f"directory `{relative(kc.path, base)}` ({scope}), files matching {_names(kc.include)} except "
        f"{_names(kc.exclude)}; changes: {', '.join(kc.changes)}; content as {kc.content} (up to "
        f"{kc.max_content_bytes} bytes); a file must be unchanged for {kc.settle_ms} ms; once done it is {after}"
    )


def delivery_lines(source: SourceConfig, base: Path, engine: EngineConfig) -> list[str]:
    """One Markdown bullet text each: guarantee, ordering, retries, dead letters, back-pressure, no bindings,
    engine outages, replicas."""
    return [
        "**Guarantee**: " + _guarantee(source),
        "**Ordering**: " + _ordering(source),
        "**Retries**: " + _retries(source.delivery),
        "**Dead letters**: " + _dead_letters(source.delivery.dead_letter, base),
        "**Back-pressure**: " + _back_pressure(source),
        "**No binding yet**: " + _unbound(source),
        "**Engine outages**: " + _outages(source, engine),
        "**Replicas**: " + _replicas(source, engine),
    ]


def _guarantee(source: SourceConfig) -> str:
    kc = source.kind_config
    if isinstance(kc, KafkaSourceConfig):
        text = (
            "at-least-once. A partition's offset is committed only up to the lowest event that is not done, every "
            f"{kc.commit_interval_ms} ms, on partition revoke and on shutdown; after a crash, the events done within "
            "the last commit interval and those in flight are delivered again. `event.id` "
            "(`kafka:<topic>:<partition>:<offset>`) identifies a record for de-duplication."
        )
    elif isinstance(kc, PostgresSourceConfig) and kc.mode == "outbox":
        text = (
            f"at-least-once. Rows of `{redact(kc.outbox_table)}` are claimed with `FOR UPDATE SKIP LOCKED` and "
            "deleted once their event is done; NOTIFY only wakes the bridge, which also polls, so nothing is lost "
            "across crashes, Postgres restarts or replicas. A crash before the delete delivers the row again; "
            "`event.id` (`pg:<table>:<row id>`) identifies it."
        )
    elif isinstance(kc, PostgresSourceConfig):
        text = (
            "at-most-once. Postgres keeps no NOTIFY for later: a notification sent while no bridge listens (a "
            "restart, a lost connection) is lost. On reconnect the bridge LISTENs again, logs the gap and counts "
            "it in `bridge_postgres_listen_gaps_total`. With several replicas only one listens per channel."
        )
    else:
        text = (
            "at-least-once across restarts. Each delivered file version is recorded in the bridge's state "
            "directory, and on start the bridge delivers what changed while it was down; a crash between delivery "
            "and record delivers that version again. `event.id` (`file:<relative path>:<mtime ns>:<size>`) "
            "identifies a version."
        )
    mode = source.delivery.mode
    if mode == "void":
        text += (
            " Delivery mode `void` sends each call without waiting for its result, so the function itself gets "
            "each event at most once."
        )
    elif mode == "enqueue":
        text += (
            f" Delivery mode `enqueue` hands each call to the iii queue `{redact(source.delivery.queue)}`; once "
            "the queue accepts it, the queue's own retries and dead-letter queue apply."
        )
    return text


def _ordering(source: SourceConfig) -> str:
    kc = source.kind_config
    n = source.max_in_flight
    if isinstance(kc, KafkaSourceConfig):
        if kc.ordering == "partition":
            return (
                "per partition (`ordering: partition`): one event in flight per partition, so the events of a "
                "partition reach the functions one at a time, in offset order; partitions run in parallel."
            )
        if kc.ordering == "key":
            return (
                "per message key (`ordering: key`): one event in flight per key, so events with the same key "
                "arrive one at a time, in offset order; different keys run in parallel."
            )
        return f"none (`ordering: none`): up to {n} events in parallel, finishing in any order."
    if isinstance(kc, PostgresSourceConfig) and kc.mode == "outbox":
        return (
            f"rows are claimed in id order and up to {n} are delivered concurrently, so calls can overlap and "
            "finish out of order."
        )
    if isinstance(kc, PostgresSourceConfig):
        return (
            f"notifications are taken in arrival order and up to {n} are delivered concurrently, so calls can "
            "overlap and finish out of order."
        )
    return (
        "per file: versions of one file are delivered one after the other, in order; different files run in "
        "parallel, in no particular order."
    )


def _retries(delivery: DeliveryConfig) -> str:
    retry = delivery.retry
    if delivery.mode == "sync":
        lead = (
            f"delivery mode `sync`: a call succeeds when the function returns, within {delivery.timeout_ms} ms. "
            "A failed call (an error, a timeout, the engine unreachable)"
        )
    elif delivery.mode == "void":
        lead = "delivery mode `void`: the function's errors are not seen. A call that cannot be sent"
    else:
        lead = (
            f"delivery mode `enqueue`: a call succeeds when the queue accepts it, within {delivery.timeout_ms} ms. "
            "A call the queue does not accept"
        )
    if retry.max_attempts <= 1:
        policy = " is not retried (`max_attempts: 1`): it is dead-lettered for that binding."
    else:
        policy = (
            f" is tried up to {retry.max_attempts} times in all, waiting {retry.initial_backoff_ms} ms before "
            f"the first retry and {_number(retry.multiplier)} times longer each time (at most {retry.max_backoff_ms} "
            f"ms, ±{round(retry.jitter * 100)}% jitter); then it is dead-lettered for that binding."
        )
    return (
        lead + policy + " Attempts start only while the engine is connected. Render errors and payload_schema "
        "violations are not retried: they are dead-lettered at once."
    )


def _number(value: float) -> str:
    return f"{value:g}"


def _dead_letters(dead: DeadLetterConfig, base: Path) -> str:
    if dead.file is not None:
        where = f"the JSON Lines file `{relative(dead.file, base)}` (relative to the config file)"
    elif dead.kafka_topic is not None:
        where = f"the Kafka topic `{redact(dead.kafka_topic)}` on the source's cluster"
    else:
        where = f"the table `{redact(dead.postgres_table)}` in the source's database"
    return (
        f"{where}, one record per failed (event, binding): `source`, `event`, `binding`, `payload`, `error` "
        "(`code`, `message`), `attempts`, `first_attempt_at`, `last_attempt_at`. Every event ends delivered, filtered "
        "or dead-lettered, whatever it holds. JSON is decoded strictly (RFC 8259: `NaN`/`Infinity`, numbers beyond a "
        "double's range, integers over 4,300 digits, lone surrogates and nesting deeper than 512 levels are "
        "undecodable); an event that cannot be decoded gets one record with `binding: null` and its raw content "
        "(text, or base64 in `raw_b64`) and is acknowledged, and the stream goes on. Only a destination that refuses "
        "the write (disk full, broker down) holds an event: it is retried, logged and counted in "
        "`bridge_dead_letter_failures_total`, and nothing is acknowledged before its record is durable. "
        "`bridge deadletters list|show|replay` inspects and re-delivers them."
    )


def _back_pressure(source: SourceConfig) -> str:
    kc = source.kind_config
    lead = f"at most {source.max_in_flight} events of this trigger type are in flight at once; beyond that "
    if isinstance(kc, KafkaSourceConfig):
        return lead + "the partitions are paused, so memory stays bounded whatever the backlog."
    if isinstance(kc, PostgresSourceConfig) and kc.mode == "outbox":
        return lead + "further rows wait in the table."
    if isinstance(kc, PostgresSourceConfig):
        return (
            lead + "notifications wait in a bounded queue in memory; when it is full they are dropped, logged and "
            "counted (`bridge_postgres_listen_dropped_total`)."
        )
    return lead + "further files wait on disk."


def _unbound(source: SourceConfig) -> str:
    kc = source.kind_config
    if isinstance(kc, KafkaSourceConfig):
        return "nothing is consumed and nothing is committed until a function binds."
    if isinstance(kc, PostgresSourceConfig) and kc.mode == "outbox":
        return "rows wait in the table until a function binds."
    if isinstance(kc, PostgresSourceConfig):
        return "notifications are dropped and counted (listen mode is at-most-once)."
    return "files wait on disk and are delivered once a function binds."


def _outages(source: SourceConfig, engine: EngineConfig) -> str:
    """What an engine restart or a lost link does to events (DESIGN.md §3 "Bindings across engine outages")."""
    kc = source.kind_config
    if isinstance(kc, KafkaSourceConfig):
        meanwhile = (
            "events wait in their partitions (paused once the in-flight window is full; nothing is committed beyond "
            "what was delivered)"
        )
    elif isinstance(kc, PostgresSourceConfig) and kc.mode == "outbox":
        meanwhile = "rows wait in the table"
    elif isinstance(kc, PostgresSourceConfig):
        meanwhile = (
            "the bridge keeps listening and notifications wait in memory (up to the bounded queue; beyond it they "
            "are dropped and counted in `bridge_postgres_listen_dropped_total`)"
        )
    else:
        meanwhile = "files wait on disk"
    return (
        f"while the iii engine is unreachable (a restart, a network cut) {meanwhile}. Nothing is filtered, "
        "skipped or acknowledged because of an outage; calls it cut are tried again (they count as attempts). When "
        "the link is back the bridge registers the trigger type again and gets its bindings back: the engine "
        "replays those it kept, and after an engine restart each function's worker binds again as it reconnects, "
        "before or after the bridge. Until then a binding is stale and its events wait for it, up to "
        f"`engine.rebind_grace_ms` ({engine.rebind_grace_ms} ms) after the reconnect. A binding not back by then "
        "is dropped: the bridge logs it, counts it in `bridge_bindings_expired_total`, and the events that waited "
        "for it and later ones go on without it (binding again restores it). A `condition_function_id` call cut "
        "by the outage is retried like a delivery, never taken as a skip."
    )


def _replicas(source: SourceConfig, engine: EngineConfig) -> str:
    """What several bridges with this config do, and what a failover or a joining replica does to events."""
    kc = source.kind_config
    names = (
        "run several bridges with this config to scale out or fail over; each needs its own worker name (the "
        "default `hostname:pid` is unique; a second bridge with a name already connected exits 1 and says so)."
    )
    if not exclusive(source):
        if isinstance(kc, KafkaSourceConfig):
            share = f"They share the partitions through consumer group `{redact(kc.group_id)}`"
            gone = (
                "Its partitions move to the others at the group's rebalance and resume from their committed offsets, "
                "so what it had not committed is delivered again."
            )
        else:
            assert isinstance(kc, PostgresSourceConfig)
            share = f"They share the rows of `{redact(kc.outbox_table)}` (`FOR UPDATE SKIP LOCKED`)"
            gone = "The rows it had claimed are released with its database session and claimed again by the others."
        return (
            f"{names} {share}, and each replica delivers what it takes to every binding. The engine sends a bind or "
            "an unbind to one replica only (the last to register the trigger type); the others mirror the engine's "
            f"list of bindings every `engine.reconcile_interval_ms` ({engine.reconcile_interval_ms} ms). So a new "
            "binding reaches every replica, and an unbind stops every replica, within that interval, and a replica "
            "that joins picks the bindings up the same way; no replica registers the type again just because its "
            "list differs. When the replica that registered last goes away, the engine parks the bindings; a "
            "surviving replica sees it at its next reconciliation, registers the type and gets every binding "
            f"replayed, keeping its own list meanwhile, so its deliveries go on. {gone}"
        )
    if isinstance(kc, PostgresSourceConfig):
        active = (
            "one of them listens (a Postgres advisory lock); the others stand by and one takes over within about a "
            "second when the listener or its connection goes (notifications sent in between are lost)"
        )
    else:
        active = (
            "one of them is active per watched directory (a lock on `.iii-bridge.lock` there); the others stand by "
            "and one takes over within about a second when it goes, delivering every file version not yet "
            "recorded (at-least-once)"
        )
    return (
        f"{names} Here {active}. Only the active replica provides the trigger type: a standby never registers "
        "it (not at start, not on a reconnect, not after losing its lock), so the engine always routes the bindings "
        "to the replica that delivers, and replays them all to the one that takes over."
    )
