"""The test engine against the real iii-sdk (and a raw WebSocket worker where an SDK will not send the frame):
rules 1-4, 8 and 12 of "What a test engine must do" in the project's iii protocol notes. Rules 5-7 and 9-11
are in test_test_engine_bindings.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import websockets
from iii import InvocationError, TriggerAction
from websockets.asyncio.client import connect

from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from bridge.testing.waiting import until

ORDERS = "orders.placed"  # the type conftest's providers advertise
Provider = Any  # conftest.Provider
MakeRaw = Callable[..., Awaitable[Any]]  # conftest's raw fixture, making RawWorkers


# ---------------------------------------------------------------- rule 1: the WebSocket and workerregistered


async def test_rule01_workerregistered_without_features_and_no_compression(iii_engine: TestEngine) -> None:
    # The client offers permessage-deflate (websockets' default, as the SDK's): the engine must not accept it.
    async with connect(iii_engine.url, compression="deflate") as ws:
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
        registered = json.loads(await ws.recv())
        assert registered.keys() == {"type", "worker_id", "reattach_token"}  # no features: trigger mode
    async with connect(iii_engine.url + "/otel") as otel:
        await otel.send("{}")
    with pytest.raises(websockets.InvalidStatus):
        async with connect(iii_engine.url + "/elsewhere"):
            pass
    await until(lambda: iii_engine.otel_frames == 1)


def test_rule01_the_sdk_runs_uncompressed(consumer: Consumer) -> None:
    assert consumer.iii._ws.protocol.extensions == []


# ---------------------------------------------------------------- rule 2: tolerated frames and the namespace hold


async def test_rule02_tolerated_frames_and_no_unregistertriggertype(iii_engine: TestEngine, raw: MakeRaw) -> None:
    w = await raw(name="prov")
    await w.send(type="somethingnew")
    await w.send(type="registerservice", id="svc", name="svc")
    await w.send(type="registertriggertype", id=ORDERS, description="Orders")
    await w.send(type="unregistertriggertype", id=ORDERS)  # engine 0.23 has no such frame: dropped
    await w.send(type="ping")
    assert await w.recv("pong") == {"type": "pong"}
    assert [(t.id, t.worker_name) for t in iii_engine.trigger_types()] == [(ORDERS, "prov")]


async def test_rule02_registrations_wait_for_workers_register(iii_engine: TestEngine, raw: MakeRaw) -> None:
    w = await raw(register=False)
    await w.send(type="registerfunction", id="shop::fn")
    await w.send(type="registertriggertype", id=ORDERS, description="Orders")
    await w.sync()
    assert iii_engine.functions() == [] and iii_engine.trigger_types() == []  # held, not filed under default

    await w.register(name="shop-worker", namespace="shop")
    await w.sync()
    assert [(f.namespace, f.function_id) for f in iii_engine.functions()] == [("shop", "shop::fn")]
    assert [(t.namespace, t.id) for t in iii_engine.trigger_types()] == [("shop", ORDERS)]


async def test_rule02_without_workers_register_the_grace_files_them_under_default(raw: MakeRaw) -> None:
    with TestEngine(registration_grace_s=0.5) as engine:
        w = await raw(register=False, engine=engine)
        await w.send(type="registerfunction", id="late::fn")
        await w.sync()
        assert not engine.has_function("late::fn")
        await until(lambda: engine.has_function("late::fn"), timeout=5)
        # A late workers::register cannot move them any more.
        await w.register(name="late", namespace="elsewhere")
        await w.sync()
        assert engine.has_function("late::fn", "default") and not engine.has_function("late::fn", "elsewhere")


# ---------------------------------------------------------------- rule 3: providers by (namespace, type)


async def test_rule03_provider_resolution_order(
    iii_engine: TestEngine, make_provider: Callable[..., Provider], make_consumer: Callable[..., Consumer]
) -> None:
    default = make_provider("prov-default", accept_all=True)
    shop = make_provider("prov-shop", namespace="shop", accept_all=True)
    assert sorted((t.namespace, t.worker_name) for t in iii_engine.trigger_types()) == [
        ("default", "prov-default"), ("shop", "prov-shop")
    ]
    at_home = make_consumer(namespace="shop").bind(ORDERS, "shop::fn")  # home namespace first
    fallback = make_consumer(namespace="other").bind(ORDERS, "other::fn")  # then default
    explicit = make_consumer(namespace="shop").bind(ORDERS, "shop::fn2", trigger_namespace="default")
    nowhere = make_consumer().bind(ORDERS, "a::fn", trigger_namespace="nowhere")  # strict: parked

    await until(lambda: len(default.handler.registered) == 2 and len(shop.handler.registered) == 1)
    assert shop.handler.ids() == [at_home.id]
    assert sorted(default.handler.ids()) == sorted([fallback.id, explicit.id])
    [parked] = [b for b in iii_engine.bindings() if b.id == nowhere.id]
    assert parked.parked and parked.provider_namespace is None
    # The provider is told which of its namespaces a binding is filed under when it is not default.
    [to_shop] = iii_engine.frames_of("registertrigger", "out", worker="prov-shop")
    assert to_shop["trigger_namespace"] == "shop" and to_shop["namespace"] == "shop"


async def test_rule03_a_provider_at_home_claims_back_what_fell_back_to_default(
    iii_engine: TestEngine, make_provider: Callable[..., Provider], make_consumer: Callable[..., Consumer]
) -> None:
    default = make_provider("prov-default", accept_all=True)
    binding = make_consumer(namespace="late").bind(ORDERS, "late::fn")
    await until(lambda: default.handler.ids() == [binding.id])

    home = make_provider("prov-late", namespace="late", accept_all=True)
    await until(lambda: home.handler.ids() == [binding.id] and default.handler.unregistered)
    assert [c.id for c in default.handler.unregistered] == [binding.id]
    assert [b.provider_namespace for b in iii_engine.bindings()] == ["late"]


# ---------------------------------------------------------------- rule 4: forwarding a binding


async def test_rule04_binding_reaches_the_provider_with_config_metadata_and_namespace(
    iii_engine: TestEngine, provider: Provider, make_consumer: Callable[..., Consumer]
) -> None:
    shop = make_consumer(namespace="shop")
    shop.function("billing::on-order")
    binding = shop.bind(ORDERS, "billing::on-order", {"min_total": 100}, {"team": "a"})
    plain = make_consumer()
    plain.function("audit::log")
    plain.bind(ORDERS, "audit::log", {"min_total": 1}, namespace="default")

    await until(lambda: len(provider.handler.registered) == 2)
    first = provider.handler.registered[0]
    assert (first.id, first.function_id, first.config, first.metadata, first.namespace) == (
        binding.id, "billing::on-order", {"min_total": 100}, {"team": "a"}, "shop"
    )
    forwarded = iii_engine.frames_of("registertrigger", direction="out", worker=provider.name)
    assert forwarded[0] == {
        "type": "registertrigger", "id": binding.id, "trigger_type": ORDERS, "function_id": "billing::on-order",
        "config": {"min_total": 100}, "metadata": {"team": "a"}, "namespace": "shop",
    }
    # "default" is sent as no namespace, and a binding without metadata carries none.
    assert forwarded[1].keys() == {"type", "id", "trigger_type", "function_id", "config"}
    assert [b.parked for b in iii_engine.bindings(ORDERS)] == [False, False]


async def test_rule04_listed_only_once_sent_to_a_provider(
    iii_engine: TestEngine, make_provider: Callable[..., Provider], raw: MakeRaw
) -> None:
    w = await raw(name="binder")
    await w.send(type="registertrigger", id="t1", trigger_type=ORDERS, function_id="a::fn", config={})
    await w.sync()
    assert [b.parked for b in iii_engine.bindings()] == [True]
    assert (await w.call("engine::registered-triggers::list", {}))["result"] == {"registered_triggers": []}

    provider = make_provider(accept_all=True)
    await until(lambda: provider.handler.ids() == ["t1"])
    assert [r["id"] for r in await provider.listed()] == ["t1"]
    # The frame to the provider went out before any list answer that shows the binding.
    frames = iii_engine.frames
    sent = next(i for i, f in enumerate(frames) if f.direction == "out" and f.data["type"] == "registertrigger")
    shown = [i for i, f in enumerate(frames) if f.data.get("result", {}).get("registered_triggers")]
    assert shown and min(shown) > sent


async def test_rule04_upsert_overwrites_and_tells_the_old_provider_nothing(
    iii_engine: TestEngine, make_provider: Callable[..., Provider], raw: MakeRaw
) -> None:
    orders = make_provider("prov-orders", accept_all=True)
    refunds = make_provider("prov-refunds", accept_all=True, type_id="refunds.made")
    w = await raw(name="binder")
    await w.send(type="registertrigger", id="t1", trigger_type=ORDERS, function_id="a::fn", config={"v": 1})
    await w.send(type="registertrigger", id="t1", trigger_type=ORDERS, function_id="a::fn", config={"v": 2})
    await until(lambda: len(orders.handler.registered) == 2)
    assert [c.config for c in orders.handler.registered] == [{"v": 1}, {"v": 2}]

    await w.send(type="registertrigger", id="t1", trigger_type="refunds.made", function_id="a::fn", config={})
    await until(lambda: refunds.handler.ids() == ["t1"])
    await w.sync()
    assert orders.handler.unregistered == []
    assert [(b.id, b.trigger_type) for b in iii_engine.bindings()] == [("t1", "refunds.made")]


# ---------------------------------------------------------------- rule 8: invocations


async def test_rule08_provider_invokes_consumer_functions(
    iii_engine: TestEngine, provider: Provider, consumer: Consumer
) -> None:
    def fail(payload: Any) -> Any:
        raise RuntimeError(f"no stock for {payload['sku']}")

    async def double(payload: Any) -> Any:
        return {"total": payload["total"] * 2}

    consumer.function("billing::double", double)
    consumer.function("billing::fail", fail)
    consumer.function("billing::notify")
    consumer.function("billing::echo", lambda payload: payload)

    assert await provider.call("billing::double", {"total": 21}, metadata={"trace": "t1"}) == {"total": 42}
    [record] = consumer.records("billing::double")
    assert record.payload == {"total": 21, "_caller_worker_id": provider.iii.worker_id}
    assert (record.metadata, record.outcome, record.result) == ({"trace": "t1"}, "ok", {"total": 42})
    assert await provider.call("billing::echo", [1, 2]) == [1, 2]  # only object payloads get the caller id
    consumer.function("billing::nothing", lambda payload: None)
    assert await provider.call("billing::nothing", {}) is None  # a null result is relayed as no result

    with pytest.raises(InvocationError) as failed:
        await provider.call("billing::fail", {"sku": "x1"})
    assert (failed.value.code, failed.value.message) == ("invocation_failed", "no stock for x1")

    iii_engine.clear_frames()
    assert await provider.call("billing::notify", {"n": 1}, action=TriggerAction.Void()) is None
    assert await asyncio.to_thread(consumer.wait_calls, "billing::notify", 1) == [{"n": 1}]
    await until(lambda: iii_engine.frames_of("invocationresult", "in"))
    [void_frame] = iii_engine.frames_of("invokefunction", direction="out", worker=consumer.worker_name)
    assert void_frame["invocation_id"]  # a void call gets an id too; its result goes nowhere
    assert iii_engine.frames_of("invocationresult", "out") == []

    with pytest.raises(InvocationError) as missing:
        await provider.call("billing::nope", {})
    assert missing.value.code == "function_not_found"
    # The caller's invocation id is the one the target sees and the one that travels back.
    iii_engine.clear_frames()
    await provider.call("billing::double", {"total": 1})
    [asked] = iii_engine.frames_of("invokefunction", "in")
    [sent] = iii_engine.frames_of("invokefunction", "out")
    [relayed] = iii_engine.frames_of("invocationresult", "in")
    [answer] = iii_engine.frames_of("invocationresult", "out")
    assert asked["invocation_id"] == sent["invocation_id"] == relayed["invocation_id"] == answer["invocation_id"]


async def test_rule08_namespaces_route_calls(provider: Provider, make_consumer: Callable[..., Consumer]) -> None:
    shop = make_consumer(namespace="shop")
    shop.function("billing::on-order")
    assert await provider.call("billing::on-order", {"a": 1}, namespace="shop") == {"ok": True}
    with pytest.raises(InvocationError) as missing:
        await provider.call("billing::on-order", {"a": 1}, namespace="default")
    assert missing.value.code == "function_not_found"
    assert "It is registered in namespace(s): shop." in missing.value.message


async def test_rule08_frames_the_engine_cannot_decode_are_dropped(
    iii_engine: TestEngine, consumer: Consumer, raw: MakeRaw
) -> None:
    consumer.function("a::fn")
    w = await raw(name="sender")
    await w.send(type="invokefunction", function_id="a::fn", invocation_id="not-a-uuid", data={})
    await w.send(type="invokefunction", function_id="a::fn", invocation_id="6f1c7e38-0c2a-4e8e-8a55-1f6c8d1d4b11")
    await w.send(type="invokefunction", function_id="a::fn", data={}, action={"type": "later"})
    await w.send(type="registertrigger", id="t1", trigger_type=ORDERS, function_id="a::fn")
    await w.send(type="registertriggertype", id=ORDERS)
    assert await w.quiet("invocationresult")
    await w.sync()  # the connection stays open
    assert consumer.calls("a::fn") == []
    assert iii_engine.bindings() == [] and iii_engine.trigger_types() == []
    assert (await w.call("a::fn", {"x": 1}))["result"] == {"ok": True}


async def test_rule08_a_none_payload_never_reaches_the_target(provider: Provider, consumer: Consumer) -> None:
    # The SDK leaves a None payload out of the frame, and the engine cannot decode one without `data`.
    consumer.function("a::fn")
    with pytest.raises(InvocationError) as lost:
        await provider.call("a::fn", None, timeout_ms=300)
    assert lost.value.code == "TIMEOUT"
    assert consumer.calls("a::fn") == []


# ---------------------------------------------------------------- rule 12: recording and outages


async def test_rule12_restart_reconnects_both_sides_and_replays_bindings(
    iii_engine: TestEngine, provider: Provider, consumer: Consumer
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
    # Every frame of both lives was recorded, in and out.
    assert len(iii_engine.frames_of("workerregistered", "out")) == 4


async def test_rule12_enqueue_needs_a_queue_worker(provider: Provider, consumer: Consumer) -> None:
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
