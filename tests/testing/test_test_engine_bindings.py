"""The test engine's bindings across providers, rejections and disconnects, its worker-name lease and its
listings, against the real iii-sdk: rules 5-7 and 9-11 of "What a test engine must do" in the project's iii
protocol notes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from iii import InvocationError

from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from bridge.testing.waiting import until

ORDERS = "orders.placed"  # the type conftest's providers advertise
Provider = Any  # conftest.Provider
MakeRaw = Callable[..., Awaitable[Any]]  # conftest's raw fixture, making RawWorkers


# ---------------------------------------------------------------- rule 5: the latest provider wins


async def test_rule05_latest_provider_gets_live_and_pending_bindings_and_the_older_hears_nothing(
    iii_engine: TestEngine, make_provider: Callable[..., Provider], consumer: Consumer
) -> None:
    old = make_provider("bridge-a")
    consumer.function("billing::on-order")
    live = consumer.bind(ORDERS, "billing::on-order", {"min_total": 1})
    rejected = consumer.bind(ORDERS, "billing::on-order", {"min_total": "lots"})
    consumer.wait_registration_errors()
    await until(lambda: old.handler.ids() == [live.id])

    new = make_provider("bridge-b", accept_all=True)
    await until(lambda: sorted(new.handler.ids()) == sorted([live.id, rejected.id]))
    assert [t.worker_name for t in iii_engine.trigger_types()] == ["bridge-b"]
    assert sorted(r["id"] for r in await new.listed()) == sorted([live.id, rejected.id])

    # The older replica is told nothing, then or when the newer one leaves.
    new.close()
    await until(lambda: all(b.parked for b in iii_engine.bindings()))
    assert (old.handler.ids(), old.handler.unregistered) == ([live.id], [])
    assert len(iii_engine.frames_of("registertrigger", direction="out", worker="bridge-a")) == 2
    assert iii_engine.frames_of("unregistertrigger", direction="out", worker="bridge-a") == []


# ---------------------------------------------------------------- rule 6: a rejected binding


async def test_rule06_rejected_binding_is_pending_reaches_the_consumer_and_is_replayed(
    iii_engine: TestEngine, make_provider: Callable[..., Provider], consumer: Consumer
) -> None:
    strict = make_provider("bridge-a")
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
    assert await strict.listed() == []

    lenient = make_provider("bridge-b", accept_all=True)  # the next registertriggertype replays it
    await until(lambda: lenient.handler.ids() == [bad.id])
    assert [r["id"] for r in await lenient.listed()] == [bad.id]
    [stored] = iii_engine.bindings(ORDERS)
    assert not stored.parked and stored.error is None


async def test_rule06_only_the_bindings_provider_may_reject_it(
    iii_engine: TestEngine, provider: Provider, consumer: Consumer, raw: MakeRaw
) -> None:
    binding = consumer.bind(ORDERS, "billing::on-order")
    intruder = await raw(name="intruder")
    await intruder.send(type="triggerregistrationresult", id=binding.id, trigger_type=ORDERS,
                        function_id="billing::on-order", error={"code": "x", "message": "spoofed"})
    await intruder.sync()
    assert [b.parked for b in iii_engine.bindings()] == [False]
    assert consumer.registration_errors() == []


# ---------------------------------------------------------------- rule 7: a provider leaves


async def test_rule07_provider_disconnect_parks_bindings_until_it_registers_again(
    iii_engine: TestEngine, make_provider: Callable[..., Provider], consumer: Consumer
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


async def test_rule07_parked_bindings_go_to_whichever_worker_registers_the_type(
    iii_engine: TestEngine, make_provider: Callable[..., Provider], consumer: Consumer
) -> None:
    first = make_provider("bridge-a", reconnect_delay_ms=60_000)
    a = consumer.bind(ORDERS, "billing::a")
    b = consumer.bind(ORDERS, "billing::b")
    iii_engine.disconnect(first.name)
    assert all(x.parked for x in iii_engine.bindings())

    second = make_provider("bridge-b")
    await until(lambda: sorted(second.handler.ids()) == sorted([a.id, b.id]))
    assert sorted(r["id"] for r in await second.listed()) == sorted([a.id, b.id])


async def test_rule07_a_namespaced_providers_bindings_fall_back_to_default(
    iii_engine: TestEngine, make_provider: Callable[..., Provider], make_consumer: Callable[..., Consumer]
) -> None:
    default = make_provider("prov-default", accept_all=True)
    shop = make_provider("prov-shop", namespace="shop", accept_all=True, reconnect_delay_ms=60_000)
    binding = make_consumer(namespace="shop").bind(ORDERS, "shop::fn")
    await until(lambda: shop.handler.ids() == [binding.id])

    iii_engine.disconnect("prov-shop")
    await until(lambda: default.handler.ids() == [binding.id])
    [moved] = iii_engine.bindings()
    assert (moved.parked, moved.provider_namespace) == (False, "default")
    assert [r["id"] for r in await default.listed()] == [binding.id]


# ---------------------------------------------------------------- rule 9: a consumer leaves


async def test_rule09_consumer_disconnect_unbinds_and_stops_in_flight_calls(
    iii_engine: TestEngine, provider: Provider, consumer: Consumer
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
        assert (stopped.value.code, stopped.value.message) == ("invocation_stopped", "Invocation stopped")
        assert iii_engine.frames_of("unregistertrigger", direction="out", worker=provider.name) == [
            {"type": "unregistertrigger", "id": binding.id, "trigger_type": ORDERS}
        ]
        assert iii_engine.bindings() == []
    finally:
        release.set()
    # The SDK reconnects and replays the binding: the provider gets it again, same id.
    await until(lambda: len(provider.handler.registered) == 2)
    assert provider.handler.registered[1].id == binding.id


async def test_rule09_unbind_is_forwarded_with_only_id_and_type(
    iii_engine: TestEngine, provider: Provider, consumer: Consumer
) -> None:
    consumer.function("billing::on-order")
    binding = consumer.bind(ORDERS, "billing::on-order")
    binding.unregister()

    await until(lambda: provider.handler.unregistered)
    assert iii_engine.frames_of("unregistertrigger", direction="out", worker=provider.name) == [
        {"type": "unregistertrigger", "id": binding.id, "trigger_type": ORDERS}
    ]
    assert iii_engine.bindings() == []


# ---------------------------------------------------------------- rule 10: one live worker name per namespace


async def test_rule10_same_worker_name_in_a_namespace_is_refused_for_good(
    iii_engine: TestEngine, make_consumer: Callable[..., Consumer]
) -> None:
    first = make_consumer(worker_name="twin")
    first.function("twin::fn")
    await until(lambda: any(w.connected and w.name == "twin" for w in iii_engine.workers()))
    twin = make_consumer(worker_name="twin", wait_connected=False)  # the refusal may beat the connection
    twin.iii.register_function("twin::other", lambda _payload: None)
    await until(lambda: twin.iii.get_connection_state() == "failed")
    [rejected] = iii_engine.frames_of("registrationrejected", direction="out")
    assert rejected == {
        "type": "registrationrejected", "code": "WORKER_NAMESPACE_CONFLICT", "namespace": "default",
        "worker_name": "twin", "owner_worker_id": first.worker_id,
    }
    await asyncio.sleep(1.0)  # the SDK would have reconnected (50 ms backoff) by now
    assert [w.connected for w in iii_engine.workers()] == [True, False]
    assert not iii_engine.has_function("twin::other")  # its held registrations were never applied
    assert await asyncio.to_thread(first.iii.trigger, {"function_id": "twin::fn", "payload": {}}) == {"ok": True}

    make_consumer(worker_name="twin", namespace="other")  # another namespace is fine
    assert len(iii_engine.frames_of("registrationrejected", direction="out")) == 1


async def test_rule10_the_refusal_closes_without_a_status_and_the_name_is_free_once_its_owner_left(
    iii_engine: TestEngine, make_consumer: Callable[..., Consumer], raw: MakeRaw
) -> None:
    first = make_consumer(worker_name="solo")
    # The name belongs to whoever registers it first: wait until the engine gave it to the SDK worker.
    await until(lambda: any(w.connected and w.name == "solo" for w in iii_engine.workers()))
    second = await raw(name="solo", register=False)
    await second.register(name="solo")
    assert (await second.recv("registrationrejected"))["owner_worker_id"] == first.worker_id
    await asyncio.wait_for(second.ws.wait_closed(), 5)
    assert (second.ws.close_code, second.ws.close_reason) == (1005, "")  # a close frame without a status

    first.close()
    await until(lambda: not any(w.connected and w.name == "solo" for w in iii_engine.workers()))
    await raw(name="solo")
    assert len(iii_engine.frames_of("registrationrejected", direction="out")) == 1


# ---------------------------------------------------------------- rule 11: the listings


async def test_rule11_registered_triggers_list(
    iii_engine: TestEngine, provider: Provider, make_consumer: Callable[..., Consumer]
) -> None:
    billing, audit = make_consumer(worker_name="billing"), make_consumer(worker_name="zed", namespace="shop")
    billing.function("billing::on-order")
    audit.function("audit::log")
    big = billing.bind(ORDERS, "billing::on-order", {"min_total": 100})
    log = audit.bind(ORDERS, "audit::log")  # target in shop: listed for a caller in default all the same
    unowned = billing.bind(ORDERS, "ghost::fn")  # no such function: worker_name is its first segment
    internal = billing.bind(ORDERS, "engine::something")
    audit.bind(ORDERS, "audit::log", {"min_total": "x"})  # rejected: not listed
    audit.wait_registration_errors()

    async def ids(**filters: Any) -> list[str]:
        return [r["id"] for r in await provider.listed(**filters)]

    rows = await provider.listed()
    assert [r["id"] for r in rows] == sorted([big.id, log.id, unowned.id])
    assert rows[[r["id"] for r in rows].index(big.id)] == {
        "id": big.id, "trigger_type": ORDERS, "function_id": "billing::on-order", "worker_name": "billing",
        "config": {"min_total": 100}, "config_summary": '{"min_total":100}',
    }
    assert {r["id"]: r["worker_name"] for r in rows}[log.id] == "zed"  # the target's owner, not the provider
    assert {r["id"]: r["worker_name"] for r in rows}[unowned.id] == "ghost"
    assert await ids(include_internal=True) == sorted([big.id, log.id, unowned.id, internal.id])
    assert await ids(function_id="audit::log") == [log.id]
    assert await ids(worker="billing") == [big.id]
    assert await ids(worker="zed") == [log.id]
    assert await ids(search="BILLING::") == [big.id]
    assert await ids(search=ORDERS.upper()) == sorted([big.id, log.id, unowned.id])
    assert await ids(search="zed") == []  # the worker name is not searched
    assert await ids(trigger_type="other.type") == []


async def test_rule11_registered_triggers_config_summary_is_cut_at_80_characters(
    provider: Provider, consumer: Consumer
) -> None:
    consumer.bind(ORDERS, "billing::on-order", {"note": "é" * 100})
    [row] = await provider.listed()
    assert row["config_summary"] == ('{"note":"' + "é" * 100)[:80] + "…"
    assert row["config"] == {"note": "é" * 100}


async def test_rule11_triggers_list(
    make_provider: Callable[..., Provider], raw: MakeRaw
) -> None:
    make_provider("prov-default")
    shop = make_provider("prov-shop", namespace="shop")
    anonymous = await raw()
    await anonymous.send(type="registertriggertype", id="files::changed", description="A file changed")
    await anonymous.send(type="registertriggertype", id="engine::internal", description="internal")
    await anonymous.sync()

    answer = await shop.call("engine::triggers::list", {})
    assert answer == {"triggers": [
        {"id": "files::changed", "namespace": "default", "worker_name": "files", "description": "A file changed"},
        {"id": ORDERS, "namespace": "default", "worker_name": "prov-default", "description": "Orders placed"},
        {"id": ORDERS, "namespace": "shop", "worker_name": "prov-shop", "description": "Orders placed"},
    ]}
    internal = await shop.call("engine::triggers::list", {"include_internal": True})
    assert internal["triggers"][0]["id"] == "engine::internal"
    assert [t["namespace"] for t in (await shop.call("engine::triggers::list", {"worker": "prov-shop"}))[
        "triggers"
    ]] == ["shop"]
    assert [t["id"] for t in (await shop.call("engine::triggers::list", {"search": "FILE"}))["triggers"]] == [
        "files::changed"
    ]
