"""The engine link across outages and replicas: stale bindings wait for their replay and expire after the grace
period; conditions are retried on link failures; replicas mirror the engine's list instead of re-registering; an
exclusive standby never registers; a worker-name conflict stops `bridge up`.

Everything runs the real iii-sdk (the bridge's EngineLink and test consumers) against the test engine. Each link
runs on its own SDK's loop, as `bridge up` does; the tests drive it from theirs through ``EngineLink.on_loop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.bindings import Binding, BindingTable, Change
from bridge.config import DeadLetterConfig, DeliveryConfig, EngineConfig, RetryConfig
from bridge.config.schemas import BindValidator
from bridge.deadletter import FileDeadLetter
from bridge.dispatch import Dispatcher, Invocation
from bridge.engine import EngineLink, TriggerTypeSpec, observable_function_id
from bridge.errors import DeliveryError
from bridge.sources import Event, Outcome
from bridge.sources.file.spec import FileSourceConfig
from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.configs import source_config
from tests.support.files import read_jsonl
from tests.support.process import BridgeProcess

TYPE = "orders"

# Every test against an engine before 0.25 (trigger mode) and one with observe.v1 (observe mode), where the
# consumers' register_trigger reaches the bridge's observable function through the engine's legacy shim.
pytestmark = pytest.mark.both_engines


class Bridge:
    """One EngineLink providing TYPE, with the dispatcher a source of TYPE would deliver through."""

    def __init__(self, link: EngineLink, table: BindingTable, dispatcher: Dispatcher, spec: TriggerTypeSpec) -> None:
        self.link = link
        self.table = table
        self.dispatcher = dispatcher
        self.spec = spec

    def deliver(self, n: int) -> asyncio.Task[Outcome]:
        event = Event(id=f"e{n}", source=TYPE, fields={"n": n})
        return asyncio.create_task(self.link.on_loop(lambda: self.dispatcher.deliver(event)))

    async def call(self, fn: Callable[..., object], *args: Any) -> None:
        """``fn(*args)`` on the link's loop, where the link and its tables live."""
        async def there() -> None:
            fn(*args)

        await self.link.on_loop(there)

    async def until(self, predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what or predicate}")
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def bridge(
    engine: TestEngine,
    tmp_path: Path,
    *,
    worker_name: str | None = None,
    grace_ms: int = 60000,
    interval_ms: int = 10000,
    exclusive: bool = False,
    max_attempts: int = 5,
    initial_backoff_ms: int = 100,
    timeout_ms: int = 5000,
    bind_schema: dict[str, Any] | None = None,
    function_id: str | None = None,
) -> AsyncIterator[Bridge]:
    config = EngineConfig(
        url=engine.url, worker_name=worker_name, reconcile_interval_ms=interval_ms, rebind_grace_ms=grace_ms
    )
    retry = RetryConfig(max_attempts=max_attempts, initial_backoff_ms=initial_backoff_ms, jitter=0)
    source = source_config(
        TYPE,
        FileSourceConfig(path=tmp_path),
        description="orders",
        delivery=DeliveryConfig(timeout_ms=timeout_ms, retry=retry, dead_letter=DeadLetterConfig(file=tmp_path / "dl")),
        payload={"n": "{{ event.n }}"},
    )
    table = BindingTable(TYPE)
    spec = TriggerTypeSpec(TYPE, "orders", BindValidator(TYPE, bind_schema), None, table, exclusive=exclusive,
                           function_id=function_id)
    link = EngineLink(config)
    dead = FileDeadLetter(tmp_path / f"dead-{worker_name or 'bridge'}.jsonl")
    b = Bridge(link, table, Dispatcher(source, table, link, dead), spec)
    try:
        await b.call(link.start, [spec])
        await asyncio.wait_for(link.on_loop(link.wait_connected), 20)
        yield b
    finally:
        await link.on_loop(link.close)
        await link.on_loop(dead.close)
        await asyncio.to_thread(link.shutdown)


async def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Consumer calls block (they wait for the engine): keep the bridge loop running meanwhile."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def _registrations(engine: TestEngine, worker: str) -> int:
    """How often ``worker`` offered TYPE: a trigger type, or (observe mode) its observable function."""
    if engine.features:
        frames = engine.frames_of("registerfunction", direction="in", worker=worker)
        return len([f for f in frames if f["id"] == observable_function_id(TYPE)])
    return len([f for f in engine.frames_of("registertriggertype", direction="in", worker=worker) if f["id"] == TYPE])


# --- stale, not gone -------------------------------------------------------------------------------------------


async def test_a_stale_binding_holds_its_events_until_the_engine_replays_it(
    iii_engine: TestEngine, tmp_path: Path, make_consumer: Callable[..., Consumer]
) -> None:
    # The consumer comes back well after the bridge (and after the bridge's first reconciliation), as in the
    # engine restart that lost 20 files: the empty list it then reads must not end the binding.
    consumer = make_consumer(reconnect_initial_delay_ms=6000, reconnect_max_delay_ms=6000)
    async with bridge(iii_engine, tmp_path) as b:
        await _in_thread(consumer.function, "shop::on-order")
        bound = await _in_thread(consumer.bind, TYPE, "shop::on-order")
        await b.until(lambda: bound.id in b.table, what="the binding")
        assert await b.deliver(1) == "delivered"
        await _in_thread(iii_engine.restart, 0.3)
        await b.until(lambda: b.table.is_stale(str(bound.id)), what="the binding turns stale")
        waiting = b.deliver(2)
        await b.until(lambda: b.link.connected, what="the bridge reconnects")
        await asyncio.sleep(2.0)  # the bridge reconciled with an engine that knows no binding yet
        assert not waiting.done()
        assert bound.id in b.table
        assert await asyncio.wait_for(waiting, 10) == "delivered"
        assert [c["n"] for c in consumer.calls("shop::on-order")] == [1, 2]
        assert not b.table.is_stale(str(bound.id))
        assert b.table.expired == 0


async def test_a_binding_nobody_replays_expires_after_the_grace_period(
    iii_engine: TestEngine, tmp_path: Path, make_consumer: Callable[..., Consumer]
) -> None:
    consumer = make_consumer()
    async with bridge(iii_engine, tmp_path, grace_ms=1500) as b:
        await _in_thread(consumer.function, "shop::on-order")
        bound = await _in_thread(consumer.bind, TYPE, "shop::on-order")
        await b.until(lambda: bound.id in b.table, what="the binding")
        iii_engine.pause()
        consumer.close()  # the consumer never comes back
        await b.until(lambda: not b.link.connected, what="the link drops")
        waiting = b.deliver(1)
        await asyncio.sleep(0.5)
        iii_engine.resume()
        await b.until(lambda: b.link.connected, what="the bridge reconnects")
        back = time.monotonic()
        assert await asyncio.wait_for(waiting, 10) == "filtered"
        waited = time.monotonic() - back
        assert 1.3 <= waited < 4.0, waited
        assert len(b.table) == 0
        assert b.table.expired == 1


async def test_the_grace_period_starts_over_when_the_link_drops_again(
    iii_engine: TestEngine, tmp_path: Path, make_consumer: Callable[..., Consumer]
) -> None:
    consumer = make_consumer()
    async with bridge(iii_engine, tmp_path, grace_ms=2000) as b:
        await _in_thread(consumer.function, "shop::on-order")
        bound = await _in_thread(consumer.bind, TYPE, "shop::on-order")
        await b.until(lambda: bound.id in b.table, what="the binding")
        iii_engine.pause()
        consumer.close()
        await b.until(lambda: not b.link.connected, what="the link drops")
        iii_engine.resume()
        await b.until(lambda: b.link.connected, what="the bridge reconnects")
        await asyncio.sleep(1.2)
        iii_engine.pause()  # a second outage within the grace period: the first timer must not fire
        await b.until(lambda: not b.link.connected, what="the link drops again")
        await asyncio.sleep(1.2)
        assert bound.id in b.table and b.table.expired == 0
        iii_engine.resume()
        await b.until(lambda: b.link.connected, what="the bridge reconnects again")
        await b.until(lambda: b.table.expired == 1, timeout=5, what="the binding expires")


async def test_an_unbind_during_the_retry_backoff_stops_the_delivery(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    def broken(payload: Any) -> Any:
        raise RuntimeError("down")

    async with bridge(iii_engine, tmp_path, initial_backoff_ms=1500) as b:
        await _in_thread(consumer.function, "shop::broken", broken)
        bound = await _in_thread(consumer.bind, TYPE, "shop::broken")
        await b.until(lambda: bound.id in b.table, what="the binding")
        delivering = b.deliver(1)
        await b.until(lambda: consumer.records("shop::broken"), what="the first attempt")
        await _in_thread(bound.unregister)
        await b.until(lambda: bound.id not in b.table, what="the unbind reaches the bridge")
        assert await asyncio.wait_for(delivering, 5) == "filtered"
        assert len(consumer.records("shop::broken")) == 1


# --- conditions ------------------------------------------------------------------------------------------------


async def test_a_condition_that_times_out_is_retried_and_the_event_delivered(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    calls = {"n": 0}

    async def slow_then_fast(payload: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            await asyncio.sleep(1.0)
        return True

    async with bridge(iii_engine, tmp_path, timeout_ms=400) as b:
        await _in_thread(consumer.function, "shop::is-big", slow_then_fast)
        await _in_thread(consumer.function, "shop::on-order")
        await _in_thread(consumer.bind, TYPE, "shop::on-order", {"condition_function_id": "shop::is-big"})
        await b.until(lambda: len(b.table) == 1, what="the binding")
        assert await asyncio.wait_for(b.deliver(1), 10) == "delivered"
        assert calls["n"] == 2
        assert [c["n"] for c in consumer.calls("shop::on-order")] == [1]


async def test_a_condition_cut_off_by_the_link_is_retried_after_the_reconnect(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer, caplog: pytest.LogCaptureFixture
) -> None:
    async def slow(payload: Any) -> Any:
        await asyncio.sleep(1.0)
        return True

    caplog.set_level(logging.INFO, logger="bridge.dispatch")
    async with bridge(iii_engine, tmp_path, worker_name="bridge-cut") as b:
        await _in_thread(consumer.function, "shop::is-big", slow)
        await _in_thread(consumer.function, "shop::on-order")
        await _in_thread(consumer.bind, TYPE, "shop::on-order", {"condition_function_id": "shop::is-big"})
        await b.until(lambda: len(b.table) == 1, what="the binding")
        delivering = b.deliver(1)
        await b.until(lambda: consumer.records("shop::is-big"), what="the condition call")
        await _in_thread(iii_engine.disconnect, "bridge-cut")
        assert await asyncio.wait_for(delivering, 15) == "delivered"
        assert len(consumer.records("shop::is-big")) == 2
        retried = [
            r.getMessage() for r in caplog.records if r.name == "bridge.dispatch" and "retrying in" in r.getMessage()
        ]
        assert len(retried) == 1 and "cut off by the engine link (no attempt counted)" in retried[0], retried
        assert "engine_unavailable: the engine link dropped during the call" in retried[0]
        assert "client_error" not in retried[0]  # the link's own error, not re-wrapped as the SDK's
        assert [c["n"] for c in consumer.calls("shop::on-order")] == [1]


async def test_a_call_cut_off_by_the_link_costs_no_attempt(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    # max_attempts 1 (no retry): an outage under the call must still not dead-letter the event.
    async def slow(payload: Any) -> Any:
        await asyncio.sleep(1.0)
        return {"ok": True}

    async with bridge(iii_engine, tmp_path, worker_name="bridge-once", max_attempts=1) as b:
        await _in_thread(consumer.function, "shop::slow", slow)
        await _in_thread(consumer.bind, TYPE, "shop::slow")
        await b.until(lambda: len(b.table) == 1, what="the binding")
        delivering = b.deliver(1)
        await b.until(lambda: consumer.records("shop::slow"), what="the call")
        await _in_thread(iii_engine.disconnect, "bridge-once")
        assert await asyncio.wait_for(delivering, 15) == "delivered"
        assert len(consumer.records("shop::slow")) == 2
        assert not (tmp_path / "dead-bridge-once.jsonl").exists()


async def test_a_failing_condition_skips_and_false_skips(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    def broken(payload: Any) -> Any:
        raise RuntimeError("condition bug")

    async with bridge(iii_engine, tmp_path) as b:
        await _in_thread(consumer.function, "shop::broken-condition", broken)
        await _in_thread(consumer.function, "shop::no", lambda payload: False)
        await _in_thread(consumer.function, "shop::on-order")
        first = await _in_thread(
            consumer.bind, TYPE, "shop::on-order", {"condition_function_id": "shop::broken-condition"}
        )
        await b.until(lambda: first.id in b.table, what="the binding")
        assert await asyncio.wait_for(b.deliver(1), 10) == "filtered"
        assert len(consumer.records("shop::broken-condition")) == 1  # its own error: no retry
        await _in_thread(first.unregister)
        await b.until(lambda: len(b.table) == 0, what="the unbind")
        await _in_thread(consumer.bind, TYPE, "shop::on-order", {"condition_function_id": "shop::no"})
        await b.until(lambda: len(b.table) == 1, what="the second binding")
        assert await asyncio.wait_for(b.deliver(2), 10) == "filtered"
        assert consumer.calls("shop::on-order") == []


async def test_a_condition_that_never_answers_is_dead_lettered_like_a_delivery(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    async def stuck(payload: Any) -> Any:
        await asyncio.sleep(5)
        return True

    async with bridge(iii_engine, tmp_path, timeout_ms=300, max_attempts=2) as b:
        await _in_thread(consumer.function, "shop::stuck", stuck)
        await _in_thread(consumer.function, "shop::on-order")
        await _in_thread(consumer.bind, TYPE, "shop::on-order", {"condition_function_id": "shop::stuck"})
        await b.until(lambda: len(b.table) == 1, what="the binding")
        assert await asyncio.wait_for(b.deliver(1), 10) == "dead_lettered"
        [record] = read_jsonl(tmp_path / "dead-bridge.jsonl")
        assert record["error"]["code"] == "TIMEOUT" and record["attempts"] == 2
        assert record["binding"]["function_id"] == "shop::on-order"
        assert consumer.calls("shop::on-order") == []


# --- replicas --------------------------------------------------------------------------------------------------


@pytest.mark.trigger_only("observe mode: one owner delivers, the others wait to take over")
async def test_a_replica_that_is_not_the_provider_mirrors_the_list_and_never_registers_again(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer, make_consumer: Callable[..., Consumer]
) -> None:
    async with (
        bridge(iii_engine, tmp_path, worker_name="replica-a", interval_ms=200) as a,
        bridge(iii_engine, tmp_path, worker_name="replica-b", interval_ms=200) as b,
    ):
        await a.until(lambda: [t for t in iii_engine.trigger_types() if t.worker_name == "replica-b"],
                      what="replica-b provides the type")
        await _in_thread(consumer.function, "shop::on-order")
        bound = await _in_thread(consumer.bind, TYPE, "shop::on-order", {}, {"team": "a"})
        await b.until(lambda: bound.id in b.table, what="the provider hears the bind")
        await a.until(lambda: bound.id in a.table, what="the other replica mirrors it")
        mirrored = a.table.get(str(bound.id))
        assert mirrored is not None and mirrored.function_id == "shop::on-order" and mirrored.namespace is None
        # The list rows carry no namespace: the target's comes from the engine's function list.
        other = make_consumer(namespace="eu")
        await _in_thread(other.function, "shop::on-order")
        elsewhere = await _in_thread(other.bind, TYPE, "shop::on-order")
        await a.until(lambda: elsewhere.id in a.table, what="the other replica mirrors the second binding")
        assert (a.table.get(str(elsewhere.id)) or mirrored).namespace == "eu"
        await _in_thread(elsewhere.unregister)
        assert await asyncio.wait_for(a.deliver(1), 10) == "delivered"
        await asyncio.sleep(1.5)  # several reconciliation rounds with tables that differed at first
        assert _registrations(iii_engine, "replica-a") == 1
        assert _registrations(iii_engine, "replica-b") == 1
        await _in_thread(bound.unregister)
        await a.until(lambda: bound.id not in a.table, what="the mirror drops the unbound binding")
        # The provider hears the unbind in a frame of its own, which may come after the mirror's next list.
        await b.until(lambda: bound.id not in b.table, what="the provider drops the unbound binding")
        assert _registrations(iii_engine, "replica-a") == 1


@pytest.mark.trigger_only("observe mode: one owner delivers, the others wait to take over")
async def test_a_mirrored_binding_whose_config_does_not_fit_this_replica_is_skipped_and_logged(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer, caplog: pytest.LogCaptureFixture
) -> None:
    # Replicas in the middle of a rollout: the provider still accepts what this replica's bind_schema refuses.
    strict = {"type": "object", "properties": {"region": {"type": "string"}}, "additionalProperties": False}
    # The engine holds a new worker's registrations until its namespace is known, so replica-a's could land after
    # replica-b's: let replica-a provide the type first, then replica-b take it over (the latest wins).
    async with bridge(iii_engine, tmp_path, worker_name="replica-a", interval_ms=200, bind_schema=strict) as a:
        await a.until(lambda: [t for t in iii_engine.trigger_types() if t.worker_name == "replica-a"],
                      what="replica-a provides the type")
        async with bridge(iii_engine, tmp_path, worker_name="replica-b", interval_ms=200,
                          bind_schema={"type": "object"}) as b:
            await a.until(lambda: [t for t in iii_engine.trigger_types() if t.worker_name == "replica-b"],
                          what="replica-b provides the type")
            await _in_thread(consumer.function, "shop::on-order")
            fits = await _in_thread(consumer.bind, TYPE, "shop::on-order", {"region": "eu"})
            misfit = await _in_thread(consumer.bind, TYPE, "shop::on-order", {"region": 7})
            await b.until(lambda: misfit.id in b.table and fits.id in b.table, what="the provider holds both")
            await a.until(lambda: fits.id in a.table, what="the mirror")
            await asyncio.sleep(0.6)
            assert misfit.id not in a.table
            skipped = [r.getMessage() for r in caplog.records if "is skipped here" in r.getMessage()]
            assert len(skipped) == 1 and f"binding {misfit.id}" in skipped[0] and "$.region" in skipped[0], skipped
            assert _registrations(iii_engine, "replica-a") == 1


@pytest.mark.trigger_only("observe mode: test_observe_a_replica_takes_the_function_over_when_its_owner_is_gone")
async def test_a_replica_registers_again_when_the_provider_is_gone(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    async with bridge(iii_engine, tmp_path, worker_name="replica-a", interval_ms=200) as a:
        async with bridge(iii_engine, tmp_path, worker_name="replica-b", interval_ms=200) as b:
            await _in_thread(consumer.function, "shop::on-order")
            bound = await _in_thread(consumer.bind, TYPE, "shop::on-order")
            await b.until(lambda: bound.id in b.table, what="the provider hears the bind")
            await a.until(lambda: bound.id in a.table, what="the other replica mirrors it")
        # replica-b is gone: the engine parks the type's bindings until some replica registers the type again
        await a.until(lambda: _registrations(iii_engine, "replica-a") == 2, what="replica-a registers again")
        await a.until(lambda: [t for t in iii_engine.trigger_types() if t.worker_name == "replica-a"],
                      what="replica-a provides the type")
        assert bound.id in a.table
        assert await asyncio.wait_for(a.deliver(1), 10) == "delivered"
        await asyncio.sleep(1.0)
        assert _registrations(iii_engine, "replica-a") == 2


@pytest.mark.parametrize("iii_engine", ["observe"], indirect=True)
async def test_observe_a_replica_takes_the_function_over_when_its_owner_is_gone(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    # The engine keeps the first owner of a function id and refuses the others: one replica delivers, the others
    # wait (their tables stay empty) and one of them registers the function once its owner is gone.
    async with contextlib.AsyncExitStack() as first:
        a = await first.enter_async_context(bridge(iii_engine, tmp_path, worker_name="replica-a", interval_ms=200))
        await a.until(lambda: iii_engine.has_function(observable_function_id(TYPE)), what="replica-a owns it")
        async with bridge(iii_engine, tmp_path, worker_name="replica-b", interval_ms=200) as b:
            await b.until(lambda: iii_engine.frames_of("registrationrejected", worker="replica-b"),
                          what="the engine keeps the first owner")
            await _in_thread(consumer.function, "shop::on-order")
            bound = await _in_thread(consumer.bind, TYPE, "shop::on-order")
            await a.until(lambda: bound.id in a.table, what="the owner hears the observer")
            await asyncio.sleep(0.6)  # reconciliation rounds: the refused replica waits, no ping-pong
            assert bound.id not in b.table and _registrations(iii_engine, "replica-b") == 1
            await first.aclose()  # replica-a leaves
            await b.until(lambda: bound.id in b.table, timeout=15, what="replica-b takes the function over")
            assert _registrations(iii_engine, "replica-b") == 2
            assert await asyncio.wait_for(b.deliver(1), 10) == "delivered"
            assert consumer.calls("shop::on-order") == [{"n": 1}]


@pytest.mark.trigger_only("observe mode: observers are acknowledged by revision; no list to reconcile")
async def test_a_provider_that_lost_a_binding_on_the_way_registers_again_to_get_it_replayed(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    async with bridge(iii_engine, tmp_path, worker_name="provider", interval_ms=200) as p:
        await _in_thread(consumer.function, "shop::on-order")
        bound = await _in_thread(consumer.bind, TYPE, "shop::on-order")
        await p.until(lambda: bound.id in p.table, what="the binding")
        await asyncio.sleep(0.6)
        assert _registrations(iii_engine, "provider") == 1  # a table in line with the list: nothing to do
        await p.call(p.table.remove, str(bound.id))  # as if the registertrigger frame had been lost
        await p.until(lambda: bound.id in p.table, what="the replay")
        assert _registrations(iii_engine, "provider") == 2


async def test_an_exclusive_standby_never_registers_its_trigger_type(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    async with bridge(iii_engine, tmp_path, worker_name="standby", interval_ms=200, exclusive=True) as s:
        await asyncio.sleep(0.6)  # reconciliation rounds
        await _in_thread(iii_engine.disconnect, "standby")  # and a reconnect
        await s.until(lambda: s.link.connected and len([w for w in iii_engine.workers() if w.connected]) >= 2,
                      what="the standby reconnects")
        await asyncio.sleep(0.6)
        assert _registrations(iii_engine, "standby") == 0
        await s.call(s.link.activate, TYPE)  # it took the lock
        await s.until(lambda: _registrations(iii_engine, "standby") == 1, what="the active replica registers")
        await s.call(s.link.deactivate, TYPE)  # it lost the lock
        await _in_thread(iii_engine.disconnect, "standby")
        await s.until(lambda: s.link.connected, what="the reconnect")
        await asyncio.sleep(1.0)
        assert _registrations(iii_engine, "standby") == 1  # not replayed by the SDK after stepping down


# --- reload: a new spec, a withdrawn type ----------------------------------------------------------------------


async def test_a_new_spec_gets_every_binding_replayed_and_checked_against_its_bind_schema(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    loose = {"type": "object", "properties": {"label": {"type": "string"}}}
    async with bridge(iii_engine, tmp_path, worker_name="reloader", bind_schema=loose) as p:
        await _in_thread(consumer.function, "shop::short")
        await _in_thread(consumer.function, "shop::long")
        short = await _in_thread(consumer.bind, TYPE, "shop::short", {"label": "ok"})
        long = await _in_thread(consumer.bind, TYPE, "shop::long", {"label": "much-too-long"})
        await p.until(lambda: len(p.table) == 2, what="both bindings")
        tight = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 5}}}
        table = BindingTable(TYPE)
        await p.call(p.link.provide, TriggerTypeSpec(TYPE, "orders", BindValidator(TYPE, tight), None, table))
        await p.until(lambda: short.id in table, what="the binding that fits, replayed into the new table")
        errors = await _in_thread(consumer.wait_registration_errors, 1)
        assert (errors[0]["id"], errors[0]["function_id"]) == (long.id, "shop::long")
        # Observe mode: the engine checks the observer's args against the new args_format itself, in its words.
        where = "args.label" if iii_engine.features else "$.label"
        assert errors[0]["error"]["message"].endswith(f"{where}: 'much-too-long' is too long"), errors
        assert long.id not in table
        assert _registrations(iii_engine, "reloader") == 2
        await p.call(p.link.withdraw, TYPE)
        await _in_thread(iii_engine.disconnect, "reloader")
        await p.until(lambda: p.link.connected, what="the reconnect")
        await asyncio.sleep(0.5)
        assert _registrations(iii_engine, "reloader") == 2  # a withdrawn type is not registered again


async def test_a_config_the_bridge_refuses_reads_the_same_in_both_modes(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer
) -> None:
    # A format the engine's args_format check does not assert but the bridge's bind check does: the bridge itself
    # refuses, with one text whichever mode (observe mode: the engine's code for args, INVALID_ARGS).
    schema = {"type": "object", "properties": {"reply_to": {"type": "string", "format": "email"}}}
    async with bridge(iii_engine, tmp_path, bind_schema=schema) as b:
        await _in_thread(consumer.function, "shop::on-order")
        await _in_thread(consumer.bind, TYPE, "shop::on-order", {"reply_to": "nobody"})
        [error] = [e["error"] for e in await _in_thread(consumer.wait_registration_errors)]
        assert error["message"] == (
            "bind config rejected by trigger type 'orders': $.reply_to: 'nobody' is not a 'email'"
        )
        assert error["code"] == ("INVALID_ARGS" if iii_engine.features else "trigger_registration_failed")
        assert len(b.table) == 0


async def test_observe_a_source_that_names_its_function_is_that_observable_function(tmp_path: Path) -> None:
    with TestEngine(features=("observe.v1",)) as engine, Consumer(engine.url, engine=engine) as consumer:
        async with bridge(engine, tmp_path, function_id="shop::order-placed") as b:
            await b.until(lambda: engine.has_function("shop::order-placed"), what="the source's function")
            assert not engine.has_function(observable_function_id(TYPE))
            await _in_thread(consumer.function, "shop::on-order")
            handle = await _in_thread(consumer.iii.observe, {"function_id": "shop::order-placed", "args": {}},
                                      "shop::on-order")
            await _in_thread(handle.ready, 10)
            await b.until(lambda: handle.id in b.table, what="the observer")
            legacy = await _in_thread(consumer.bind, TYPE, "shop::on-order")  # the trigger type reaches it too
            await b.until(lambda: legacy.id in b.table, what="the register_trigger binder")
            assert await asyncio.wait_for(b.deliver(1), 10) == "delivered"
            calls = await _in_thread(consumer.wait_calls, "shop::on-order", 2)
            assert calls == [{"n": 1}, {"n": 1}], calls


# --- the mode of each connection ------------------------------------------------------------------------------


async def test_the_mode_follows_the_engine_of_each_connection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge.engine")
    old = TestEngine().start()
    port = old.port
    try:
        async with bridge(old, tmp_path, grace_ms=1000) as b:
            # The SDK may report the connection before it hands over the features of workerregistered.
            await b.until(lambda: b.link.mode == "trigger", what="trigger mode")
            with Consumer(old.url, engine=old) as consumer:
                await _in_thread(consumer.function, "shop::on-order")
                await _in_thread(consumer.bind, TYPE, "shop::on-order")
                assert await asyncio.wait_for(b.deliver(1), 10) == "delivered"
            await _in_thread(old.stop)
            # The same address, now an engine 0.25+: the bridge registers its source as an observable function.
            with TestEngine(port=port, features=("observe.v1",)) as new, Consumer(new.url, engine=new) as consumer:
                await b.until(lambda: b.link.mode == "observe", timeout=20, what="observe mode")
                await b.until(lambda: new.has_function(observable_function_id(TYPE)), what="the function")
                await b.until(lambda: not new.trigger_types(), what="the trigger type withdrawn")
                await _in_thread(consumer.function, "shop::on-order")
                bound = await _in_thread(consumer.bind, TYPE, "shop::on-order")
                await b.until(lambda: bound.id in b.table, what="the binding, through the legacy shim")
                assert await asyncio.wait_for(b.deliver(2), 10) == "delivered"
                assert consumer.calls("shop::on-order") == [{"n": 2}]
    finally:
        old.stop()
    modes = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().endswith("mode")
             or " mode: " in r.getMessage()]
    assert modes == ["trigger mode", "observe mode"], modes


# --- one worker name, one bridge -------------------------------------------------------------------------------

_CONFLICT_CONFIG = """\
version: 1
engine:
  url: ${III_URL}
  worker_name: twin
state_dir: state
sources:
  inbox:
    description: test inbox
    file:
      path: ./inbox
"""


def test_a_second_bridge_with_the_same_worker_name_exits_1_and_says_why(
    iii_engine: TestEngine, tmp_path: Path, make_consumer: Callable[..., Consumer]
) -> None:
    make_consumer(worker_name="twin")  # already holds the name in the default namespace
    (tmp_path / "bridge.yaml").write_text(_CONFLICT_CONFIG)
    proc = BridgeProcess(tmp_path / "bridge.yaml", iii_engine.url, env={"III_WORKER_NAME": ""}).start(
        wait_ready=False
    )
    try:
        assert proc.proc is not None
        code = proc.proc.wait(timeout=30)
    finally:
        proc.kill()
    log = proc.log()
    assert code == 1, log[-3000:]
    assert "another worker named 'twin' is already connected in namespace 'default'" in log
    assert "WORKER_NAMESPACE_CONFLICT" in log
    assert "engine.worker_name" in log and "III_WORKER_NAME" in log


def test_the_sdk_internals_the_link_relies_on_exist() -> None:
    """The link runs the bridge on the SDK's own loop and reads a few SDK internals: an SDK that changed them fails
    here, naming what is missing, rather than in a delivery."""
    import inspect
    from importlib.metadata import version

    from iii.iii import III

    sdk = version("iii-sdk")
    assert sdk.startswith("0.25."), f"iii-sdk {sdk}: the engine link is written against 0.25.* (pyproject pins it)"
    init = inspect.getsource(III.__init__)
    needed = {
        "_loop": "(the SDK's own loop, which the bridge runs on)",
        "_thread": "(the thread running that loop: run() and shutdown() must not block it)",
        "_fatal_error": "(why the engine refused this worker for good)",
        "_pending": "(the calls in flight, failed at once when the link drops)",
    }
    for name, why in needed.items():
        assert f"self.{name}" in init, f"iii-sdk {sdk}: III.{name} is gone; the engine link needs it {why}"
    assert "self._loop = asyncio.new_event_loop()" in init and "target=self._loop.run_forever" in init, (
        f"iii-sdk {sdk} no longer runs its own loop on a thread of its own: EngineLink.run() must be rethought"
    )
    assert callable(III._worker_name), f"iii-sdk {sdk}: III._worker_name() is gone (the worker name in logs)"
    from iii.iii import _PendingInvocation

    assert "future" in _PendingInvocation.__annotations__, (
        f"iii-sdk {sdk}: a pending invocation has no .future any more; the link cannot fail calls cut off by an outage"
    )
    assert "get_running_loop() is self._loop" in inspect.getsource(III._on_sdk_loop), (
        f"iii-sdk {sdk}: a call made on the SDK's own loop no longer skips the cross-thread hop (DESIGN §5)"
    )
    assert "_on_sdk_loop" in inspect.getsource(III.trigger_async), f"iii-sdk {sdk}: trigger_async changed its path"
    # observe mode: which features a connection's engine announced, and whether it confirmed a function
    for name in ("_registered_on_connection", "_engine_features", "_functions", "_connection_epoch"):
        assert f"self.{name}" in init, f"iii-sdk {sdk}: III.{name} is gone; the engine link needs it (observe mode)"
    assert "self._on_engine_features(worker.features" in inspect.getsource(III._handle_message), (
        f"iii-sdk {sdk}: workerregistered no longer goes through III._on_engine_features (the link's mode choice)"
    )
    from iii.observable import FunctionObservers

    observers = inspect.getsource(FunctionObservers.__init__)
    assert "self.confirmed " in observers and "self.confirmed_epoch " in observers, (
        f"iii-sdk {sdk}: FunctionObservers.confirmed(_epoch) is gone (observe mode: a refused replica, a reconnect)"
    )


def test_the_bridge_binds_and_calls_on_the_sdks_own_loop_without_a_hop(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `bridge up` does: the runtime runs on the link's loop (EngineLink.run); a binding is applied on that
    loop, by the SDK's own callback, and a call made there crosses no thread."""
    import threading

    from bridge.dispatch import Invocation

    threads: dict[str, threading.Thread] = {}

    class Table(BindingTable):
        def upsert(self, binding: Binding) -> Change:
            threads["binding applied"] = threading.current_thread()
            return super().upsert(binding)

    table = Table(TYPE)
    link = EngineLink(EngineConfig(url=iii_engine.url, worker_name="one-loop"))
    hops: list[object] = []
    real_hop = asyncio.run_coroutine_threadsafe

    def counted_hop(coro: Any, loop: asyncio.AbstractEventLoop) -> Any:
        hops.append(coro)
        return real_hop(coro, loop)

    async def main() -> Any:
        threads["runtime"] = threading.current_thread()
        link.start([TriggerTypeSpec(TYPE, "orders", BindValidator(TYPE, None), None, table)])
        await asyncio.wait_for(link.wait_connected(), 20)
        await asyncio.to_thread(consumer.function, "shop::echo", lambda payload: {"echo": payload["n"]})
        bound = await asyncio.to_thread(consumer.bind, TYPE, "shop::echo")
        while bound.id not in table:
            await asyncio.sleep(0.01)
        monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", counted_hop)
        try:
            result = await link.invoke(Invocation("shop::echo", {"n": 7}, None, 5000))
        finally:
            monkeypatch.undo()
        await link.close()
        return result

    with pytest.raises(RuntimeError, match=r"must run on the link's loop \(EngineLink.run"):
        link.start([])  # from this thread: refused, and nothing was started
    assert link.run(main()) == {"echo": 7}
    sdk_thread = link._client._thread
    assert threads == {"runtime": sdk_thread, "binding applied": sdk_thread}
    assert hops == [], "a call on the SDK's own loop was handed over to another thread"
    assert link.loop.is_closed() and not sdk_thread.is_alive()


@pytest.fixture(autouse=True)
def _no_worker_name_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # III_WORKER_NAME wins over engine.worker_name in the SDK: a value from the environment would merge replicas.
    monkeypatch.delenv("III_WORKER_NAME", raising=False)


def test_a_list_drops_neither_a_binding_received_after_it_was_asked_for_nor_a_stale_one() -> None:
    from bridge.bindings import Binding

    table = BindingTable(TYPE)
    for bid in ("old", "stale"):
        table.upsert(Binding(bid, TYPE, "f::x", None, {}))
    table.mark_stale()  # the link dropped
    table.upsert(Binding("old", TYPE, "f::x", None, {}))  # replayed; "stale" is not (yet)
    asked = table.mark()  # the list call is sent
    table.upsert(Binding("new", TYPE, "f::x", None, {}))  # sent to this bridge before the engine listed it
    assert [b.id for b in table.reconcile(set(), asked)] == ["old"]
    assert "new" in table and table.is_stale("stale")


@pytest.mark.parametrize("call", [
    Invocation("shop::echo", {"n": 1, "text": "é", "none": None, "list": [None, {"a": None}]}, None, 5000),
    Invocation("shop::echo", {"n": 1}, "orders", 5000, "sync", None, {"tenant": "t1"}),
    Invocation("shop::echo", None, None, 5000, "void", None, {}),
    Invocation("shop::echo", [1, 2], "orders", 5000, "void", None, {"tenant": "t1"}),
], ids=["sync", "sync-metadata", "void-no-payload", "void-metadata"])
def test_the_direct_call_sends_what_the_sdk_sends(call: Invocation) -> None:
    """The link writes the hot path's ``invokefunction`` itself (no pydantic model per call): the same JSON the SDK
    writes for ``trigger_async`` of the same request, which a change of the SDK's message would break here."""
    import json
    import uuid

    from iii.iii import III
    from iii.iii_types import InvokeFunctionMessage, TriggerActionVoid

    from bridge.engine import _CallIds, _sdk_request, invoke_message

    client = III.__new__(III)  # _prepare_json needs no connection
    request = _sdk_request(call)
    invocation_id = None if call.mode == "void" else "7c1f6b1e-0000-4000-8000-000000000001"
    sdk_message = InvokeFunctionMessage(
        function_id=request["function_id"], data=request["payload"], metadata=request.get("metadata"),
        invocation_id=invocation_id, namespace=request["namespace"],
        action=TriggerActionVoid() if call.mode == "void" else None,
    )
    assert json.loads(client._prepare_json(invoke_message(call, invocation_id))) == json.loads(
        client._prepare_json(sdk_message)
    )
    from iii import _wire_json

    from bridge.engine import _WIRE_JSON, _utf8_encodable

    message = invoke_message(call, invocation_id)
    assert _WIRE_JSON.encode(message) == _wire_json.dumps(message)  # the very text the SDK would send
    assert not _utf8_encodable(_WIRE_JSON.encode({"data": "\udc80"}))  # left to the SDK, which escapes it
    ids = _CallIds()
    made = [ids.next() for _ in range(1000)]
    assert len(set(made)) == 1000
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in made)


def test_the_sdk_still_sends_calls_the_way_the_direct_call_copies() -> None:
    """What the direct call relies on in iii-sdk 0.25: ``_invoke_remote`` sends an ``InvokeFunctionMessage`` of
    exactly these fields (OpenTelemetry's are empty for the bridge's client) and settles ``_pending`` entries."""
    import inspect
    from importlib.metadata import version

    from iii.iii import III
    from iii.iii_types import InvokeFunctionMessage

    sdk = version("iii-sdk")
    fields = set(InvokeFunctionMessage.model_fields)
    assert fields == {"function_id", "data", "metadata", "invocation_id", "traceparent", "baggage", "action",
                      "namespace", "caller", "observe_depth", "activation", "message_type"}, (
        f"iii-sdk {sdk}: InvokeFunctionMessage changed ({sorted(fields)}); bridge.engine.invoke_message must follow"
    )
    remote = inspect.getsource(III._invoke_remote)
    assert "self._pending[invocation_id] = _PendingInvocation(" in remote, (
        f"iii-sdk {sdk}: calls no longer wait in III._pending; the link's direct call cannot get its result"
    )
    assert "self._pending.pop(invocation_id, None)" in inspect.getsource(III._handle_result), (
        f"iii-sdk {sdk}: results no longer settle III._pending entries"
    )
    assert "self._ws" in inspect.getsource(III.__init__), f"iii-sdk {sdk}: III._ws (the socket) is gone"


async def test_calls_the_direct_path_leaves_to_the_sdk_still_arrive_whole(
    iii_engine: TestEngine, tmp_path: Path, consumer: Consumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message over the direct path's length, and a payload UTF-8 cannot carry (a lone surrogate), go through
    the SDK's ``trigger_async`` (its size rules, its escaping); results, void calls and the direct path's own
    timeout behave alike on both paths."""
    from bridge import engine as engine_module

    sdk_calls: list[Any] = []
    async with bridge(iii_engine, tmp_path) as b:
        await _in_thread(consumer.function, "shop::echo", lambda payload: {"echo": payload["text"]})

        async def slow(payload: Any) -> Any:
            await asyncio.sleep(0.5)
            return True

        await _in_thread(consumer.function, "shop::slow", slow)
        real = b.link._client.trigger_async

        async def counted(request: Any) -> Any:
            sdk_calls.append(request["function_id"])
            return await real(request)

        monkeypatch.setattr(b.link._client, "trigger_async", counted)

        async def call(payload: Any, mode: str = "sync", function_id: str = "shop::echo", timeout_ms: int = 5000
                       ) -> Any:
            return await b.link.on_loop(
                lambda: b.link.invoke(Invocation(function_id, payload, None, timeout_ms, mode))
            )

        assert await call({"text": "é"}) == {"echo": "é"}
        assert sdk_calls == []  # the direct path
        assert await call({"text": "a\udc80b"}) == {"echo": "a\udc80b"}
        assert sdk_calls == ["shop::echo"]
        monkeypatch.setattr(engine_module, "_DIRECT_MAX_CHARS", 64)
        long = {"text": "x" * 200}
        assert await call(long) == {"echo": long["text"]}
        assert await call(long, "void") is None
        assert sdk_calls == ["shop::echo"] * 3
        monkeypatch.setattr(engine_module, "_DIRECT_MAX_CHARS", 4 * 1024 * 1024)
        assert await call({"text": "void"}, "void") is None
        await b.until(lambda: len(consumer.calls("shop::echo")) == 5, what="every call")
        with pytest.raises(DeliveryError) as timed_out:
            await call({}, function_id="shop::slow", timeout_ms=200)
        assert timed_out.value.code == "TIMEOUT" and "200ms" in timed_out.value.message
        assert sdk_calls == ["shop::echo"] * 3
        assert b.link._client._pending == {}  # nothing left behind by the timed-out call
        await asyncio.sleep(0.5)  # the slow handler ends (its late result finds nothing pending)
