"""The plain-words parts of the Worker Docs (:mod:`bridge.docs`): what each source reads, and its delivery
guarantee, ordering, retries, dead letters, back-pressure, engine outages and replicas, worded from its config
(DESIGN.md §3)."""

from __future__ import annotations

from pathlib import Path

from bridge.config import DeadLetterConfig, DeliveryConfig, EngineConfig, SourceConfig, redact
from bridge.sources import REGISTRY, spec_of
from bridge.sources._prose import relative

COMMON = """\
A function receives the events of a trigger type once it is bound to it with `register_trigger` and a bind \
config. The bridge checks the bind config against the trigger type's schema when the binding arrives and rejects \
a config that does not match, naming every violation by its JSON path. Each event goes to every binding of its \
trigger type (fan-out): a binding that fails and retries never makes the others see the event again, and an event \
is done once every binding has succeeded, been filtered out or been dead-lettered. A bind config may always hold \
`condition_function_id` (an iii convention): that function is called with the rendered payload before each \
delivery, and the binding receives the event only when it does not return false. An error the condition function \
raises skips the binding too; a call that fails because of the link (engine unreachable, `TIMEOUT`, \
`invocation_stopped`) says nothing about the condition and is retried like a delivery.

Two ways to bind. On an iii engine 0.25 or later (one that announces `observe.v1`), each trigger type is also an \
observable function, `bridge::<trigger type id>`: observe it with `iii.observe`, passing the bind config as \
`args` (the engine checks them against the same schema and refuses a mismatch with `INVALID_ARGS`); \
`register_trigger` with `config` keeps working there too (the engine turns it into an observer of that \
function). On an older engine only `register_trigger` exists. Either way a binding behaves the same: same checks, \
payloads, retries and dead letters. An observer gets each call with the observer's own metadata; with delivery \
mode `void` it gets the payload itself when it observes with `deliver: "input"` (as the examples do), else the \
iii `Observed` envelope around it."""

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
    "holds the options' examples or defaults). As an observer (iii 0.25 and later):"
)

EXAMPLE_TRIGGER = "Or as a trigger (any iii version; on 0.25 and later the engine makes it an observer):"


def source_summary(source: SourceConfig, base: Path) -> str:
    """What the source reads, without connection settings (brokers, DSNs and credentials are not shown)."""
    return spec_of(source).summary(source, base)


def delivery_lines(source: SourceConfig, base: Path, engine: EngineConfig) -> list[str]:
    """One Markdown bullet text each: guarantee, ordering, retries, dead letters, back-pressure, no bindings,
    engine outages, replicas."""
    return [
        "**Guarantee**: " + _guarantee(source),
        "**Ordering**: " + spec_of(source).ordering(source),
        "**Retries**: " + _retries(source.delivery),
        "**Dead letters**: " + _dead_letters(source.delivery.dead_letter, base),
        "**Back-pressure**: " + _back_pressure(source),
        "**No binding yet**: " + spec_of(source).unbound(source),
        "**Engine outages**: " + _outages(source, engine),
        "**Replicas**: " + _replicas(source, engine),
    ]


def _guarantee(source: SourceConfig) -> str:
    text = spec_of(source).guarantee(source)
    mode = source.delivery.mode
    if mode == "void":
        text += (
            " Delivery mode `void` sends each call without waiting for its result, so the function itself gets "
            "each event at most once."
        )
    elif mode == "enqueue":
        text += (
            f" Delivery mode `enqueue` hands each call to the iii queue `{redact(source.delivery.queue)}`; once "
            "the queue accepts it, the queue's own retries and dead-letter queue apply. Observers (iii 0.25 and "
            "later) have no queue: they get each call as in delivery mode `sync`."
        )
    return text


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
    else:
        where = _own_destination(dead)
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


def _own_destination(dead: DeadLetterConfig) -> str:
    """Where the kind that owns the destination ``dead`` names puts records."""
    for spec in REGISTRY.values():
        key = spec.dead_letter_key
        if key is not None and getattr(dead, key) is not None:
            return spec.dead_letter_place(dead)
    raise AssertionError(f"no destination in {dead!r}")


def _back_pressure(source: SourceConfig) -> str:
    lead = f"at most {source.max_in_flight} events of this trigger type are in flight at once; beyond that "
    return lead + spec_of(source).back_pressure(source)


def _outages(source: SourceConfig, engine: EngineConfig) -> str:
    """What an engine restart or a lost link does to events (DESIGN.md §3 "Bindings across engine outages")."""
    meanwhile = spec_of(source).outage_wait(source)
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
    spec = spec_of(source)
    names = (
        "run several bridges with this config to scale out or fail over; each needs its own worker name (the "
        "default `hostname:pid` is unique; a second bridge with a name already connected exits 1 and says so)."
    )
    if not spec.exclusive(source):
        share, gone = spec.replicas(source)
        return (
            f"{names} {share}, and each replica delivers what it takes to every binding. The engine sends a bind or "
            "an unbind to one replica only (the last to register the trigger type); the others mirror the engine's "
            f"list of bindings every `engine.reconcile_interval_ms` ({engine.reconcile_interval_ms} ms). So a new "
            "binding reaches every replica, and an unbind stops every replica, within that interval, and a replica "
            "that joins picks the bindings up the same way; no replica registers the type again just because its "
            "list differs. When the replica that registered last goes away, the engine parks the bindings; a "
            "surviving replica sees it at its next reconciliation, registers the type and gets every binding "
            f"replayed, keeping its own list meanwhile, so its deliveries go on. {gone} On an iii engine 0.25 or "
            "later (observe mode) the engine keeps the first replica that registers the observable function as its "
            "only owner: that replica hears every observer and delivers every event; the others stand by with no "
            "binding (so they take no share of the events) and one of them registers the function, and gets every "
            "observer, once the owner is gone."
        )
    active, _ = spec.replicas(source)
    return (
        f"{names} Here {active}. Only the active replica provides the trigger type: a standby never registers "
        "it (not at start, not on a reconnect, not after losing its lock), so the engine always routes the bindings "
        "to the replica that delivers, and replays them all to the one that takes over."
    )
