"""The test engine against the real iii-sdk on both sides: a provider worker advertising a trigger type and a
Consumer binding functions to it."""

from __future__ import annotations

import asyncio
import json
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websockets
from iii import InitOptions, InvocationError, TriggerAction, register_worker
from iii.iii_types import RegisterTriggerTypeInput
from iii.triggers import TriggerConfig, TriggerHandler
from iii_helpers.observability import ReconnectionConfig
from websockets.asyncio.client import connect

from bridge.testing.consumer import Consumer, shutdown_client
from bridge.testing.engine import TestEngine
from bridge.testing.waiting import until

ORDERS = "orders.placed"


class _Handler(TriggerHandler):  # type: ignore[misc]
    """Rejects a non-numeric ``min_total`` the way a provider validates bind configs."""

    def __init__(self) -> None:
        self.registered: list[TriggerConfig] = []
        self.unregistered: list[TriggerConfig] = []

    async def register_trigger(self, config: TriggerConfig) -> None:
        value = (config.config or {}).get("min_total", 0)
        if not isinstance(value, int | float):
            raise ValueError(f"config.min_total: {value!r} is not a number")
        self.registered.append(config)

    async def unregister_trigger(self, config: TriggerConfig) -> None:
        self.unregistered.append(config)


class _Provider:
    """A second real SDK client that provides a trigger type, as the bridge does."""

    def __init__(self, engine: TestEngine, name: str, reconnect_delay_ms: int = 50) -> None:
        self.name = name
        self.handler = _Handler()
        self.iii: Any = register_worker(engine.url, InitOptions(
            worker_name=name, otel={"enabled": False}, enable_metrics_reporting=False,
            reconnection_config=ReconnectionConfig(initial_delay_ms=reconnect_delay_ms, max_delay_ms=500),
        ))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "register_trigger_type is deprecated", DeprecationWarning)
            self.iii.register_trigger_type(
                RegisterTriggerTypeInput(
                    id=ORDERS, description="Orders placed",
                    trigger_request_format={"type": "object", "properties": {"min_total": {"type": "number"}}},
                    call_request_format={"type": "object"},
                ),
                self.handler,
            )
        engine.wait_until(lambda: any(t.worker_name == name for t in engine.trigger_types()))

    async def call(self, function_id: str, payload: Any, **extra: Any) -> Any:
        return await self.iii.trigger_async({"function_id": function_id, "payload": payload, **extra})

    def close(self) -> None:
        shutdown_client(self.iii)


@pytest.fixture
def make_provider(iii_engine: TestEngine) -> Iterator[Callable[..., _Provider]]:
    made: list[_Provider] = []

    def make(name: str = "bridge-a", reconnect_delay_ms: int = 50) -> _Provider:
        made.append(_Provider(iii_engine, name, reconnect_delay_ms))
        return made[-1]

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def provider(make_provider: Callable[..., _Provider]) -> _Provider:
    return make_provider()


def test_binding_reaches_the_provider_with_config_metadata_and_namespace(
    iii_engine: TestEngine, provider: _Provider, make_consumer: Callable[..., Consumer]
) -> None:
    shop = make_consumer(namespace="shop")
    shop.function("billing::on-order")
    binding = shop.bind(ORDERS, "billing::on-order", {"min_total": 100}, {"team": "a"})
    plain = make_consumer()
    plain.function("audit::log")
    plain.bind(ORDERS, "audit::log", {"min_total": 1}, namespace="default")

    iii_engine.wait_until(lambda: len(provider.handler.registered) == 2)
    first = provider.handler.registered[0]
    assert (first.id, first.function_id, first.config, first.metadata, first.namespace) == (
        binding.id, "billing::on-order", {"min_total": 100}, {"team": "a"}, "shop"
    )
    forwarded = iii_engine.frames_of("registertrigger", direction="out", worker=provider.name)
    assert forwarded[0] == {
        "type": "registertrigger", "id": binding.id, "trigger_type": ORDERS, "function_id": "billing::on-order",
        "config": {"min_total": 100}, "metadata": {"team": "a"}, "namespace": "shop",
    }
    assert "namespace" not in forwarded[1]  # "default" is sent as no namespace
    assert [b.parked for b in iii_engine.bindings(ORDERS)] == [False, False]


def test_rejected_binding_reaches_the_consumer_and_is_disabled(
    iii_engine: TestEngine, provider: _Provider, consumer: Consumer
) -> None:
    consumer.function("billing::on-order")
    bad = consumer.bind(ORDERS, "billing::on-order", {"min_total": "lots"})

    [error] = consumer.wait_registration_errors()
    assert error == {
        "type": "triggerregistrationresult", "id": bad.id, "trigger_type": ORDERS,
        "function_id": "billing::on-order",
        "error": {"code": "trigger_registration_failed", "message": "config.min_total: 'lots' is not a number"},
    }
    [stored] = iii_engine.bindings(ORDERS)
    assert stored.parked and stored.error == error["error"]


def test_unbind_is_forwarded_with_only_id_and_type(
    iii_engine: TestEngine, provider: _Provider, consumer: Consumer
) -> None:
    consumer.function("billing::on-order")
    binding = consumer.bind(ORDERS, "billing::on-order")
    binding.unregister()

    iii_engine.wait_until(lambda: provider.handler.unregistered)
    assert iii_engine.frames_of("unregistertrigger", direction="out", worker=provider.name) == [
        {"type": "unregistertrigger", "id": binding.id, "trigger_type": ORDERS}
    ]
    assert provider.handler.unregistered[0].id == binding.id
    assert iii_engine.bindings() == []


async def test_provider_invokes_consumer_functions(
    iii_engine: TestEngine, provider: _Provider, consumer: Consumer
) -> None:
    def fail(payload: Any) -> Any:
        raise RuntimeError(f"no stock for {payload['sku']}")

    async def double(payload: Any) -> Any:
        return {"total": payload["total"] * 2}

    consumer.function("billing::double", double)
    consumer.function("billing::fail", fail)
    consumer.function("billing::notify")

    assert await provider.call("billing::double", {"total": 21}, metadata={"trace": "t1"}) == {"total": 42}
    [record] = consumer.records("billing::double")
    assert record.payload == {"total": 21, "_caller_worker_id": provider.iii.worker_id}
    assert (record.metadata, record.outcome, record.result) == ({"trace": "t1"}, "ok", {"total": 42})

    with pytest.raises(InvocationError) as failed:
        await provider.call("billing::fail", {"sku": "x1"})
    assert (failed.value.code, failed.value.message) == ("invocation_failed", "no stock for x1")
    assert consumer.records("billing::fail")[0].outcome == "error"

    assert await provider.call("billing::notify", {"n": 1}, action=TriggerAction.Void()) is None
    assert await asyncio.to_thread(consumer.wait_calls, "billing::notify", 1) == [{"n": 1}]
    void_frame = iii_engine.frames_of("invokefunction", direction="out", worker=consumer.worker_name)[-1]
    assert void_frame["function_id"] == "billing::notify" and void_frame["invocation_id"]  # void gets an id too

    with pytest.raises(InvocationError) as missing:
        await provider.call("billing::nope", {})
    assert missing.value.code == "function_not_found"
    # The caller's invocation id is the one the target sees and the one that travels back.
    [relayed] = [f for f in iii_engine.frames_of("invocationresult", "in") if f["function_id"] == "billing::double"]
    [answer] = [f for f in iii_engine.frames_of("invocationresult", "out") if f["function_id"] == "billing::double"]
    [call] = [f for f in iii_engine.frames_of("invokefunction", "in") if f["function_id"] == "billing::double"]
    [sent] = [f for f in iii_engine.frames_of("invokefunction", "out") if f["function_id"] == "billing::double"]
    assert answer["invocation_id"] == call["invocation_id"] == sent["invocation_id"] == relayed["invocation_id"]


async def test_namespaces_route_calls(
    iii_engine: TestEngine, provider: _Provider, make_consumer: Callable[..., Consumer]
) -> None:
    shop = make_consumer(namespace="shop")
    shop.function("billing::on-order")
    assert await provider.call("billing::on-order", {"a": 1}, namespace="shop") == {"ok": True}
    with pytest.raises(InvocationError) as missing:
        await provider.call("billing::on-order", {"a": 1}, namespace="default")
    assert missing.value.code == "function_not_found"


async def test_consumer_disconnect_unbinds_and_stops_in_flight_calls(
    iii_engine: TestEngine, provider: _Provider, consumer: Consumer
) -> None:
    release = threading.Event()
    consumer.function("billing::slow", lambda payload: release.wait(10))
    binding = consumer.bind(ORDERS, "billing::slow")
    call = asyncio.create_task(provider.call("billing::slow", {"n": 1}))
    await asyncio.to_thread(consumer.wait_calls, "billing::slow", 1)
    try:
        iii_engine.disconnect(consumer.worker_name)
        with pytest.raises(InvocationError) as stopped:
            await call
        assert stopped.value.code == "invocation_stopped"
        assert iii_engine.frames_of("unregistertrigger", direction="out", worker=provider.name) == [
            {"type": "unregistertrigger", "id": binding.id, "trigger_type": ORDERS}
        ]
    finally:
        release.set()
    # The SDK reconnects and replays the binding: the provider gets it again, same id.
    await until(lambda: len(provider.handler.registered) == 2)
    assert provider.handler.registered[1].id == binding.id


async def test_provider_disconnect_parks_bindings_until_it_registers_again(
    iii_engine: TestEngine, make_provider: Callable[..., _Provider], consumer: Consumer
) -> None:
    provider = make_provider(reconnect_delay_ms=400)
    consumer.function("billing::on-order")
    binding = consumer.bind(ORDERS, "billing::on-order", {"min_total": 5})
    iii_engine.disconnect(provider.name)

    assert [b.parked for b in iii_engine.bindings()] == [True]
    assert iii_engine.trigger_types() == []
    listed = consumer.iii.trigger({"function_id": "engine::registered-triggers::list", "payload": {}})
    assert listed == {"registered_triggers": []}

    await until(lambda: len(provider.handler.registered) == 2)
    assert provider.handler.registered[1].id == binding.id
    assert provider.handler.registered[1].config == {"min_total": 5}
    assert [b.parked for b in iii_engine.bindings()] == [False]


async def test_restart_reconnects_both_sides_and_replays_bindings(
    iii_engine: TestEngine, provider: _Provider, consumer: Consumer
) -> None:
    consumer.function("billing::on-order")
    binding = consumer.bind(ORDERS, "billing::on-order", {"min_total": 7}, {"team": "a"})
    port = iii_engine.port
    iii_engine.restart(downtime_s=0.3)

    assert iii_engine.port == port
    assert all(not w.connected for w in iii_engine.workers()[:2])
    await until(lambda: len(provider.handler.registered) == 2)
    replayed = provider.handler.registered[1]
    assert (replayed.id, replayed.config, replayed.metadata) == (binding.id, {"min_total": 7}, {"team": "a"})
    await until(lambda: iii_engine.has_function("billing::on-order"))
    assert await provider.call("billing::on-order", {"after": "restart"}) == {"ok": True}
    assert len([w for w in iii_engine.workers() if w.connected]) == 2


async def test_newest_provider_wins(
    iii_engine: TestEngine, make_provider: Callable[..., _Provider], consumer: Consumer
) -> None:
    old = make_provider("bridge-a")
    consumer.function("billing::on-order")
    binding = consumer.bind(ORDERS, "billing::on-order")
    await until(lambda: old.handler.registered)

    new = make_provider("bridge-b")
    await until(lambda: new.handler.registered)
    assert new.handler.registered[0].id == binding.id
    assert [t.worker_name for t in iii_engine.trigger_types()] == ["bridge-b"]

    new.close()  # the older replica is told nothing: the bindings wait for a new registration
    await until(lambda: iii_engine.bindings()[0].parked)
    assert (len(old.handler.registered), old.handler.unregistered) == (1, [])
    assert len(iii_engine.frames_of("registertrigger", direction="out", worker="bridge-a")) == 1


async def test_registered_triggers_list(
    iii_engine: TestEngine, provider: _Provider, make_consumer: Callable[..., Consumer]
) -> None:
    billing, audit = make_consumer(worker_name="billing"), make_consumer(worker_name="audit")
    billing.function("billing::on-order")
    audit.function("audit::log")
    big = billing.bind(ORDERS, "billing::on-order", {"min_total": 100})
    log = audit.bind(ORDERS, "audit::log")
    audit.bind(ORDERS, "audit::log", {"min_total": "x"})  # rejected: not listed
    audit.wait_registration_errors()

    async def listed(**filters: Any) -> list[str]:
        answer = await provider.call("engine::registered-triggers::list", filters)
        return [t["id"] for t in answer["registered_triggers"]]

    answer = await provider.call("engine::registered-triggers::list", {})
    assert [t["id"] for t in answer["registered_triggers"]] == sorted([str(big.id), str(log.id)])
    assert {
        "id": big.id, "trigger_type": ORDERS, "function_id": "billing::on-order", "worker_name": "billing",
        "config": {"min_total": 100}, "config_summary": '{"min_total":100}',
    } in answer["registered_triggers"]
    assert await listed(function_id="audit::log") == [log.id]
    assert await listed(worker="billing") == [big.id]
    assert await listed(search="BILLING::") == [big.id]
    assert await listed(trigger_type="other.type") == []


async def test_enqueue_needs_a_queue_worker(provider: _Provider, consumer: Consumer) -> None:
    consumer.function("billing::on-order")
    with pytest.raises(InvocationError) as failed:
        await provider.call("billing::on-order", {}, action=TriggerAction.Enqueue(queue="jobs"))
    assert failed.value.code == "enqueue_error"

    with TestEngine(queues=("jobs",)) as engine:
        queued = Consumer(engine.url, engine=engine)
        sender = Consumer(engine.url, engine=engine)
        try:
            queued.function("billing::on-order")
            receipt = await sender.iii.trigger_async({
                "function_id": "billing::on-order", "payload": {"n": 1},
                "action": TriggerAction.Enqueue(queue="jobs"),
            })
            assert set(receipt) == {"messageReceiptId"}
            assert await asyncio.to_thread(queued.wait_calls, "billing::on-order", 1) == [{"n": 1}]
        finally:
            queued.close()
            sender.close()


def test_same_worker_name_in_a_namespace_is_rejected(
    iii_engine: TestEngine, make_consumer: Callable[..., Consumer]
) -> None:
    make_consumer(worker_name="twin")
    twin = make_consumer(worker_name="twin")
    iii_engine.wait_until(lambda: twin.iii.get_connection_state() == "failed")
    [rejected] = iii_engine.frames_of("registrationrejected", direction="out")
    assert rejected["code"] == "WORKER_NAMESPACE_CONFLICT"
    make_consumer(worker_name="twin", namespace="other")  # another namespace is fine
    assert iii_engine.frames_of("registrationrejected", direction="out") == [rejected]


async def test_wire_basics(iii_engine: TestEngine) -> None:
    async with connect(iii_engine.url) as ws:
        registered = json.loads(await ws.recv())
        assert registered.keys() == {"type", "worker_id", "reattach_token"}  # no features: trigger mode
        await ws.send(json.dumps({"type": "somethingnew"}))
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv()) == {"type": "pong"}
    async with connect(iii_engine.url + "/otel") as otel:
        await otel.send("{}")
    with pytest.raises(websockets.InvalidStatus):
        async with connect(iii_engine.url + "/elsewhere"):
            pass
    await until(lambda: iii_engine.otel_frames == 1)
