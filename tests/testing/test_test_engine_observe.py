"""The test engine's observe side (``TestEngine(features=("observe.v1",))``), against the real iii-sdk 0.25 in
both roles: an owner that registers an owner-delivered observable function (as the bridge does in observe mode),
and workers that observe it with ``iii.observe`` or bind to it the old way (``register_trigger``, through the
legacy shim)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from iii import InitOptions, InvocationError, ObserveHooks, Observer, ObserveRejection, register_worker
from iii_helpers.observability import ReconnectionConfig

from bridge.testing.consumer import Consumer, shutdown_client
from bridge.testing.engine import TestEngine

SOURCE = "bridge::orders"
LEGACY = "orders"
ARGS_FORMAT = {"type": "object", "properties": {"min_total": {"type": "number"}}, "additionalProperties": False}


class Owner:
    """A real SDK worker that hosts SOURCE as an owner-delivered observable function: it keeps the observers its
    hook accepts (and rejects those with ``min_total`` over 1000), and delivers to them on demand."""

    def __init__(self, engine: TestEngine, name: str) -> None:
        self.name = name
        self.added: list[Observer] = []
        self.removed: list[str] = []
        self._lock = threading.Lock()
        self.iii: Any = register_worker(engine.url, InitOptions(
            worker_name=name, otel={"enabled": False}, enable_metrics_reporting=False,
            reconnection_config=ReconnectionConfig(initial_delay_ms=50, max_delay_ms=500),
        ))

        async def added(obs: Observer) -> None:
            if obs.args.get("min_total", 0) > 1000:
                raise ObserveRejection("TOO_BIG", f"min_total {obs.args['min_total']} is over 1000")
            with self._lock:
                self.added.append(obs)

        async def removed(obs: Observer) -> None:
            with self._lock:
                self.removed.append(obs.id)
                self.added = [o for o in self.added if o.id != obs.id]

        async def handler(_data: Any) -> Any:
            raise RuntimeError("observe me")

        self.iii.register_function(SOURCE, handler, observe=ObserveHooks(
            delivery="owner", args_format=ARGS_FORMAT, legacy_trigger_type=LEGACY,
            on_observer_added=added, on_observer_removed=removed,
        ))

    def observer(self, observer_id: str) -> Observer | None:
        with self._lock:
            return next((o for o in self.added if o.id == observer_id), None)

    def call(self, observer_id: str, payload: Any) -> Any:
        obs = self.observer(observer_id)
        assert obs is not None
        return asyncio.run_coroutine_threadsafe(obs.call_async(payload, timeout_ms=5000), self.iii._loop).result(10)

    def emit(self, observer_id: str, payload: Any) -> bool:
        obs = self.observer(observer_id)
        assert obs is not None
        return obs.emit(payload)

    def close(self) -> None:
        shutdown_client(self.iii)


@pytest.fixture
def iii_engine() -> Iterator[TestEngine]:
    with TestEngine(features=("observe.v1",)) as engine:
        yield engine
        errors = engine.internal_errors
    assert not errors, "the iii test engine failed while handling frames:\n" + "\n".join(errors)


@pytest.fixture
def make_owner(iii_engine: TestEngine) -> Iterator[Callable[[str], Owner]]:
    made: list[Owner] = []

    def make(name: str) -> Owner:
        made.append(Owner(iii_engine, name))
        return made[-1]

    yield make
    for owner in made:
        owner.close()


@pytest.fixture
def owner(iii_engine: TestEngine, make_owner: Callable[[str], Owner]) -> Owner:
    made = make_owner("bridge-a")
    iii_engine.wait_until(lambda: iii_engine.frames_of("functionregistered", worker="bridge-a"))
    return made


def test_the_engine_announces_observe_v1_and_the_default_one_nothing(iii_engine: TestEngine) -> None:
    with TestEngine() as old, Consumer(old.url, engine=old) as a, Consumer(iii_engine.url, engine=iii_engine):
        [hello] = old.wait_until(lambda: old.frames_of("workerregistered"))
        assert "features" not in hello
        [hello] = iii_engine.wait_until(lambda: iii_engine.frames_of("workerregistered"))
        assert hello["features"] == ["observe.v1"]
        # Without observe.v1 the SDK refuses to observe (UNSUPPORTED) and sends nothing.
        handle = a.iii.observe({"function_id": SOURCE}, "shop::on-order")
        with pytest.raises(ObserveRejection) as refused:
            handle.ready(timeout=10)
        assert refused.value.code == "UNSUPPORTED"
        assert old.frames_of("observe") == []


def test_an_observer_reaches_the_owner_and_its_deliveries_reach_the_target(
    iii_engine: TestEngine, owner: Owner, consumer: Consumer
) -> None:
    consumer.function("shop::on-order")
    handle = consumer.iii.observe(
        {"function_id": SOURCE, "args": {"min_total": 5}}, "shop::on-order", {"metadata": {"team": "a"}}
    )
    handle.ready(timeout=10)
    obs = owner.observer(handle.id)
    assert obs is not None and (obs.args, obs.target, obs.legacy) == ({"min_total": 5}, "shop::on-order", None)

    assert owner.call(handle.id, {"n": 1}) == {"ok": True}  # sync: the target's result comes back
    [record] = consumer.records("shop::on-order")
    assert record.payload["n"] == 1 and record.metadata == {"team": "a"}
    [sent] = iii_engine.frames_of("invokefunction", direction="out", worker=consumer.worker_name)
    assert sent["activation"]["observer_id"] == handle.id

    assert owner.emit(handle.id, {"n": 2})  # fire-and-forget: the target gets the Observed envelope
    [_, envelope] = consumer.wait_calls("shop::on-order", 2)
    assert (envelope["observer_id"], envelope["function_id"], envelope["input"]) == (handle.id, SOURCE, {"n": 2})

    handle.dispose()
    iii_engine.wait_until(lambda: owner.removed == [handle.id])
    with pytest.raises(InvocationError) as stopped:
        asyncio.run_coroutine_threadsafe(obs.call_async({"n": 3}), owner.iii._loop).result(10)
    assert stopped.value.code == "OBSERVER_NOT_ACTIVE"


def test_args_are_checked_against_args_format_and_the_owner_may_reject(
    iii_engine: TestEngine, owner: Owner, consumer: Consumer
) -> None:
    consumer.function("shop::on-order")
    bad = consumer.iii.observe({"function_id": SOURCE, "args": {"min_total": "lots"}}, "shop::on-order")
    with pytest.raises(ObserveRejection) as invalid:
        bad.ready(timeout=10)
    assert invalid.value.code == "INVALID_ARGS"
    assert "args.min_total: 'lots' is not of type 'number'" in invalid.value.message
    big = consumer.iii.observe({"function_id": SOURCE, "args": {"min_total": 5000}}, "shop::on-order")
    with pytest.raises(ObserveRejection) as rejected:
        big.ready(timeout=10)
    assert (rejected.value.code, rejected.value.message) == ("TOO_BIG", "min_total 5000 is over 1000")
    assert owner.added == []


def test_the_legacy_shim_turns_register_trigger_into_an_observer(
    iii_engine: TestEngine, owner: Owner, consumer: Consumer
) -> None:
    consumer.function("shop::on-order")
    bound = consumer.bind(LEGACY, "shop::on-order", {"min_total": 7}, metadata={"team": "b"})
    iii_engine.wait_until(lambda: owner.observer(str(bound.id)))
    obs = owner.observer(str(bound.id))
    assert obs is not None
    assert (obs.args, obs.legacy) == ({"min_total": 7}, {"trigger_type": LEGACY, "config": {"min_total": 7}})
    # the owner's hook runs before its ack: the engine has the observer active once the ack arrived
    iii_engine.wait_until(lambda: [o.state for o in iii_engine.observers(SOURCE)] == ["active"])
    assert [b.parked for b in iii_engine.bindings(LEGACY)] == [False]  # listed among the bindings, live

    owner.call(str(bound.id), {"n": 1})
    assert owner.emit(str(bound.id), {"n": 2})  # a legacy observer gets the event itself, as a trigger did
    assert consumer.wait_calls("shop::on-order", 2) == [{"n": 1}, {"n": 2}]
    assert [r.metadata for r in consumer.records("shop::on-order")] == [{"team": "b"}, {"team": "b"}]

    consumer.bind(LEGACY, "shop::on-order", {"min_total": "lots"})
    consumer.bind(LEGACY, "shop::on-order", {"min_total": 5000})
    errors = [e["error"] for e in consumer.wait_registration_errors(2)]
    assert [e["code"] for e in errors] == ["INVALID_ARGS", "TOO_BIG"]

    bound.unregister()
    iii_engine.wait_until(lambda: owner.removed == [bound.id])


def test_a_trigger_bound_before_the_owner_registers_waits_and_is_adopted(
    iii_engine: TestEngine, make_owner: Callable[[str], Owner], consumer: Consumer
) -> None:
    consumer.function("shop::on-order")
    bound = consumer.bind(LEGACY, "shop::on-order", {})
    assert [b.parked for b in iii_engine.bindings(LEGACY)] == [True]
    owner = make_owner("bridge-a")
    iii_engine.wait_until(lambda: owner.observer(str(bound.id)))
    iii_engine.wait_until(lambda: [b.parked for b in iii_engine.bindings(LEGACY)] == [False])


def test_the_first_owner_keeps_the_function_and_observers_wait_for_the_next_one(
    iii_engine: TestEngine, make_owner: Callable[[str], Owner], consumer: Consumer
) -> None:
    first = make_owner("bridge-a")
    iii_engine.wait_until(lambda: iii_engine.has_function(SOURCE))
    second = make_owner("bridge-b")
    [refusal] = iii_engine.wait_until(lambda: iii_engine.frames_of("registrationrejected", worker="bridge-b"))
    assert refusal["code"] == "FUNCTION_NAMESPACE_CONFLICT"
    consumer.function("shop::on-order")
    handle = consumer.iii.observe({"function_id": SOURCE, "args": {}}, "shop::on-order")
    handle.ready(timeout=10)
    assert first.observer(handle.id) is not None and second.observer(handle.id) is None

    first.close()
    iii_engine.wait_until(lambda: [o.state for o in iii_engine.observers()] == ["pending"])
    third = make_owner("bridge-c")  # the function registered again: its observers come with functionregistered
    iii_engine.wait_until(lambda: third.observer(handle.id))
    iii_engine.wait_until(lambda: [o.state for o in iii_engine.observers()] == ["active"])  # after its ack
