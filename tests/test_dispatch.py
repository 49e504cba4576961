"""The Dispatcher in process, against a scripted invoker: retries and the attempt count, backoff bounds, fan-out
isolation, filtered and dead-lettered outcomes. Backoffs are a few milliseconds, so every test runs in
milliseconds; the end-to-end tests drive the same rules through a real engine and a real `bridge up`."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bridge.bindings import Binding, BindingTable
from bridge.config import DeliveryConfig, RetryConfig, SourceConfig
from bridge.dispatch import Dispatcher, Invocation, backoff_s
from bridge.errors import DecodeError, DeliveryError, EngineUnavailable
from bridge.sources import Event
from bridge.sources.file.spec import FileSourceConfig
from tests.support.configs import source_config

FAST = RetryConfig(max_attempts=3, initial_backoff_ms=1, max_backoff_ms=4, multiplier=2.0, jitter=0.0)
"""Retries a few milliseconds apart."""

Answer = Any | BaseException
"""What the fake invoker does on one call: raise the exception, or return the value."""


@dataclasses.dataclass
class Call:
    function_id: str
    payload: Any
    options: dict[str, Any]
    at: float  # time.monotonic() when the call arrived


class FakeInvoker:
    """An Invoker whose functions answer from a script: ``script[function_id]`` is a list of answers used one per
    call (the last one repeats), or a callable of the payload. Functions without a script return ``{"ok": True}``.
    Every call is recorded."""

    connected = True

    def __init__(self, script: dict[str, list[Answer] | Callable[[Any], Answer]] | None = None) -> None:
        self.script = script or {}
        self.calls: list[Call] = []

    async def wait_connected(self) -> None:
        return None

    async def invoke(self, call: Invocation) -> Any:
        function_id, payload = call.function_id, call.payload
        options = {f.name: getattr(call, f.name) for f in dataclasses.fields(call)
                   if f.name not in ("function_id", "payload")}
        self.calls.append(Call(function_id, payload, options, time.monotonic()))
        plan = self.script.get(function_id)
        if plan is None:
            answer: Answer = {"ok": True}
        elif callable(plan):
            answer = plan(payload)
        else:
            answer = plan[min(self.count(function_id), len(plan)) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def count(self, function_id: str) -> int:
        return sum(1 for call in self.calls if call.function_id == function_id)

    def times(self, function_id: str) -> list[float]:
        return [call.at for call in self.calls if call.function_id == function_id]


class MemoryDeadLetters:
    """A DeadLetterSink that keeps the records."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.keys: list[bytes | None] = []

    def describe(self) -> str:
        return "memory"

    async def write(self, record: dict[str, Any], *, key: bytes | None = None) -> None:
        self.records.append(record)
        self.keys.append(key)

    async def close(self) -> None:
        return None

    def of(self, function_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["binding"] and r["binding"]["function_id"] == function_id]


def _timeout() -> DeliveryError:
    return DeliveryError("TIMEOUT", "the function did not answer in time")


def _dispatcher(
    tmp_path: Path,
    bindings: list[Binding],
    invoker: FakeInvoker,
    *,
    retry: RetryConfig = FAST,
    **source: Any,
) -> tuple[Dispatcher, MemoryDeadLetters]:
    """A Dispatcher of source ``orders`` with ``bindings``; ``source`` overrides SourceConfig fields (``when``,
    ``payload``, ``payload_schema``)."""
    config: SourceConfig = source_config(
        "orders", FileSourceConfig(path=tmp_path), delivery=DeliveryConfig(timeout_ms=1000, retry=retry)
    )
    config = dataclasses.replace(config, **source)
    table = BindingTable(config.id)
    for binding in bindings:
        table.upsert(binding)
    dead_letters = MemoryDeadLetters()
    return Dispatcher(config, table, invoker, dead_letters), dead_letters


def _binding(function_id: str, **config: Any) -> Binding:
    return Binding(f"b-{function_id}", "orders", function_id, None, config)


def _event(**fields: Any) -> Event:
    return Event(id="e1", source="orders", fields=fields or {"total": 12})


# retries and the attempt count ---------------------------------------------------------------------------------


async def test_a_failing_call_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    invoker = FakeInvoker({"f::pay": [_timeout(), _timeout(), {"paid": True}]})
    dispatcher, dead_letters = _dispatcher(tmp_path, [_binding("f::pay")], invoker)

    assert await dispatcher.deliver(_event()) == "delivered"

    assert invoker.count("f::pay") == 3
    assert [call.payload for call in invoker.calls] == [{"id": "e1", "source": "orders", "total": 12}] * 3
    assert dead_letters.records == []
    stats = dispatcher.stats
    assert (stats.delivered, stats.deliveries_ok, stats.deliveries_failed, stats.retries) == (1, 1, 2, 2)


async def test_a_call_that_keeps_failing_is_dead_lettered_after_exactly_max_attempts(tmp_path: Path) -> None:
    invoker = FakeInvoker({"f::pay": [DeliveryError("invocation_failed", "card declined")]})
    dispatcher, dead_letters = _dispatcher(tmp_path, [_binding("f::pay")], invoker)

    assert await dispatcher.deliver(_event()) == "dead_lettered"

    assert invoker.count("f::pay") == FAST.max_attempts
    (record,) = dead_letters.records
    assert record["attempts"] == FAST.max_attempts
    assert record["error"] == {"code": "invocation_failed", "message": "card declined"}
    assert record["payload"] == {"id": "e1", "source": "orders", "total": 12}
    assert record["binding"] == {"id": "b-f::pay", "function_id": "f::pay", "namespace": "default", "config": {}}
    assert record["first_attempt_at"] <= record["last_attempt_at"]
    stats = dispatcher.stats
    assert (stats.dead_lettered, stats.deliveries_failed, stats.retries) == (1, 3, 2)


async def test_the_raw_key_of_an_event_reaches_its_dead_letter(tmp_path: Path) -> None:
    invoker = FakeInvoker({"f::pay": [DeliveryError("invocation_failed", "card declined")]})
    dispatcher, dead_letters = _dispatcher(tmp_path, [_binding("f::pay")], invoker)
    keyed = Event(id="e1", source="orders", fields={"key": "/gA="}, raw_key=b"\xfe\x00")

    assert await dispatcher.deliver(keyed) == "dead_lettered"
    assert await dispatcher.deliver(_event()) == "dead_lettered"

    assert dead_letters.keys == [b"\xfe\x00", None]  # the bytes as received; templates saw base64


async def test_max_attempts_one_never_retries(tmp_path: Path) -> None:
    invoker = FakeInvoker({"f::pay": [_timeout()]})
    dispatcher, dead_letters = _dispatcher(
        tmp_path, [_binding("f::pay")], invoker, retry=dataclasses.replace(FAST, max_attempts=1)
    )

    assert await dispatcher.deliver(_event()) == "dead_lettered"

    assert invoker.count("f::pay") == 1
    assert [r["attempts"] for r in dead_letters.records] == [1]
    assert dispatcher.stats.retries == 0


async def test_a_cut_engine_link_costs_no_attempt(tmp_path: Path) -> None:
    """Two link cuts, then the function's own failures: still max_attempts real attempts before the dead letter."""
    cut = EngineUnavailable("the engine link dropped under the call")
    invoker = FakeInvoker({"f::pay": [cut, cut, _timeout()]})
    dispatcher, dead_letters = _dispatcher(tmp_path, [_binding("f::pay")], invoker)

    assert await dispatcher.deliver(_event()) == "dead_lettered"

    assert invoker.count("f::pay") == 2 + FAST.max_attempts
    (record,) = dead_letters.records
    assert (record["attempts"], record["error"]["code"]) == (FAST.max_attempts, "TIMEOUT")


# backoff ------------------------------------------------------------------------------------------------------


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap() -> None:
    retry = RetryConfig(initial_backoff_ms=100, max_backoff_ms=1000, multiplier=2.0, jitter=0.2)
    middle = [backoff_s(retry, attempt, rand=lambda: 0.5) for attempt in range(1, 8)]
    assert middle == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("jitter", [0.0, 0.2, 0.5, 1.0])
def test_jitter_extremes_bound_the_backoff(jitter: float) -> None:
    retry = RetryConfig(initial_backoff_ms=100, max_backoff_ms=1000, multiplier=3.0, jitter=jitter)
    for attempt in range(1, 10):
        capped = min(0.1 * 3.0 ** (attempt - 1), 1.0)
        low, high = capped * (1 - jitter), capped * (1 + jitter)
        assert backoff_s(retry, attempt, rand=lambda: 0.0) == pytest.approx(low)
        assert backoff_s(retry, attempt, rand=lambda: 1.0) == pytest.approx(high)
        draws = random.Random(attempt)
        for _ in range(200):
            delay = backoff_s(retry, attempt, rand=draws.random)
            assert low - 1e-12 <= delay <= high + 1e-12
            assert delay >= 0.0


def test_a_large_attempt_number_stays_at_the_cap() -> None:
    retry = RetryConfig(initial_backoff_ms=200, max_backoff_ms=30000, multiplier=2.0, jitter=0.0)
    assert backoff_s(retry, 1000) == pytest.approx(30.0)


def test_any_attempt_number_stays_at_the_cap() -> None:
    retry = RetryConfig(initial_backoff_ms=200, max_backoff_ms=30000, multiplier=2.0, jitter=0.0)
    assert backoff_s(retry, 1100) == pytest.approx(30.0)


async def test_the_dispatcher_waits_at_least_the_backoff_between_attempts(tmp_path: Path) -> None:
    """Jitter 0: attempts 2 and 3 come no sooner than 10 ms and 20 ms after the one before."""
    retry = RetryConfig(max_attempts=3, initial_backoff_ms=10, max_backoff_ms=1000, multiplier=2.0, jitter=0.0)
    invoker = FakeInvoker({"f::pay": [_timeout()]})
    dispatcher, _ = _dispatcher(tmp_path, [_binding("f::pay")], invoker, retry=retry)

    assert await dispatcher.deliver(_event()) == "dead_lettered"

    first, second, third = invoker.times("f::pay")
    assert second - first >= 0.010
    assert third - second >= 0.020


# fan-out isolation --------------------------------------------------------------------------------------------


async def test_a_retrying_binding_never_re_invokes_one_that_succeeded(tmp_path: Path) -> None:
    invoker = FakeInvoker({"f::flaky": [_timeout(), _timeout(), {"ok": True}]})
    dispatcher, dead_letters = _dispatcher(tmp_path, [_binding("f::flaky"), _binding("f::steady")], invoker)

    assert await dispatcher.deliver(_event()) == "delivered"

    assert (invoker.count("f::steady"), invoker.count("f::flaky")) == (1, 3)
    assert dead_letters.records == []
    # The sibling did not wait for the retries: it was called before the flaky binding's second attempt.
    assert invoker.times("f::steady")[0] < invoker.times("f::flaky")[1]


async def test_one_dead_lettered_binding_never_stops_the_others(tmp_path: Path) -> None:
    invoker = FakeInvoker({"f::broken": [_timeout()]})
    bindings = [_binding("f::a"), _binding("f::broken"), _binding("f::c")]
    dispatcher, dead_letters = _dispatcher(tmp_path, bindings, invoker)

    assert await dispatcher.deliver(_event()) == "dead_lettered"

    assert (invoker.count("f::a"), invoker.count("f::broken"), invoker.count("f::c")) == (1, 3, 1)
    assert [r["binding"]["function_id"] for r in dead_letters.records] == ["f::broken"]
    assert (dispatcher.stats.deliveries_ok, dispatcher.stats.dead_lettered) == (2, 1)


async def test_a_render_error_of_one_binding_dead_letters_only_its_share(tmp_path: Path) -> None:
    """The payload divides by the binding's own config: zero fails for that binding, the others get theirs."""
    invoker = FakeInvoker()
    bindings = [_binding("f::half", divisor=2), _binding("f::zero", divisor=0), _binding("f::quarter", divisor=4)]
    dispatcher, dead_letters = _dispatcher(
        tmp_path, bindings, invoker, payload={"share": "{{ event.total / config.divisor }}"}
    )

    assert await dispatcher.deliver(_event(total=12)) == "dead_lettered"

    assert {c.function_id: c.payload for c in invoker.calls} == {"f::half": {"share": 6}, "f::quarter": {"share": 3}}
    (record,) = dead_letters.records
    assert (record["binding"]["function_id"], record["error"]["code"], record["attempts"]) == (
        "f::zero",
        "render_error",
        0,
    )


# filtered -----------------------------------------------------------------------------------------------------


async def test_when_false_filters_without_any_call(tmp_path: Path) -> None:
    invoker = FakeInvoker()
    dispatcher, dead_letters = _dispatcher(tmp_path, [_binding("f::pay")], invoker, when="{{ event.total > 100 }}")

    assert await dispatcher.deliver(_event(total=12)) == "filtered"

    assert invoker.calls == []
    assert dead_letters.records == []
    assert (dispatcher.stats.filtered, dispatcher.stats.delivered) == (1, 0)


async def test_when_filters_per_binding_and_the_event_counts_as_delivered(tmp_path: Path) -> None:
    invoker = FakeInvoker()
    bindings = [_binding("f::big", min_total=100), _binding("f::small", min_total=10)]
    dispatcher, _ = _dispatcher(tmp_path, bindings, invoker, when="{{ event.total >= config.min_total }}")

    assert await dispatcher.deliver(_event(total=12)) == "delivered"

    assert [c.function_id for c in invoker.calls] == ["f::small"]


async def test_a_condition_answering_false_filters_and_the_function_is_never_called(tmp_path: Path) -> None:
    invoker = FakeInvoker({"f::is_big": [False]})
    dispatcher, dead_letters = _dispatcher(
        tmp_path, [_binding("f::pay", condition_function_id="f::is_big")], invoker
    )

    assert await dispatcher.deliver(_event()) == "filtered"

    assert [c.function_id for c in invoker.calls] == ["f::is_big"]
    assert dead_letters.records == []


@pytest.mark.parametrize("answer", [True, None, 0, "", {"big": False}])
async def test_a_condition_answering_anything_but_false_delivers(tmp_path: Path, answer: Any) -> None:
    invoker = FakeInvoker({"f::is_big": [answer]})
    dispatcher, _ = _dispatcher(tmp_path, [_binding("f::pay", condition_function_id="f::is_big")], invoker)

    assert await dispatcher.deliver(_event()) == "delivered"

    assert [c.function_id for c in invoker.calls] == ["f::is_big", "f::pay"]


async def test_a_condition_that_fails_itself_filters_without_retry_or_dead_letter(tmp_path: Path) -> None:
    invoker = FakeInvoker({"f::is_big": [DeliveryError("invocation_failed", "KeyError: 'total'")]})
    dispatcher, dead_letters = _dispatcher(
        tmp_path, [_binding("f::pay", condition_function_id="f::is_big")], invoker
    )

    assert await dispatcher.deliver(_event()) == "filtered"

    assert [c.function_id for c in invoker.calls] == ["f::is_big"]
    assert dead_letters.records == []
    assert dispatcher.stats.retries == 0


async def test_a_condition_that_times_out_is_retried_and_not_asked_again_once_it_passed(tmp_path: Path) -> None:
    """Any other condition failure says nothing about the condition: retried like a delivery. Once it passed,
    a failing delivery repeats only the delivery."""
    invoker = FakeInvoker({"f::is_big": [_timeout(), True], "f::pay": [_timeout(), {"ok": True}]})
    dispatcher, _ = _dispatcher(tmp_path, [_binding("f::pay", condition_function_id="f::is_big")], invoker)

    assert await dispatcher.deliver(_event()) == "delivered"

    assert [c.function_id for c in invoker.calls] == ["f::is_big", "f::is_big", "f::pay", "f::pay"]


async def test_a_condition_that_never_answers_is_dead_lettered_after_max_attempts(tmp_path: Path) -> None:
    invoker = FakeInvoker({"f::is_big": [_timeout()]})
    dispatcher, dead_letters = _dispatcher(
        tmp_path, [_binding("f::pay", condition_function_id="f::is_big")], invoker
    )

    assert await dispatcher.deliver(_event()) == "dead_lettered"

    assert invoker.count("f::is_big") == FAST.max_attempts
    assert invoker.count("f::pay") == 0
    (record,) = dead_letters.records
    assert (record["attempts"], record["error"]["code"]) == (FAST.max_attempts, "TIMEOUT")


# dead-lettered without a call ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [{"x": "{{ event.missing.deeper }}"}, "{{ none }}", "{{ 10 ** 100000 }}"],
    ids=["undefined", "null payload", "bounded operation"],
)
async def test_a_render_error_is_dead_lettered_at_once_without_a_call(tmp_path: Path, payload: Any) -> None:
    invoker = FakeInvoker()
    dispatcher, dead_letters = _dispatcher(tmp_path, [_binding("f::pay")], invoker, payload=payload)

    assert await dispatcher.deliver(_event()) == "dead_lettered"

    assert invoker.calls == []
    (record,) = dead_letters.records
    assert (record["error"]["code"], record["attempts"], record["payload"]) == ("render_error", 0, None)
    assert record["first_attempt_at"] is None
    assert dispatcher.stats.retries == 0


async def test_a_payload_schema_violation_is_dead_lettered_at_once_without_a_call(tmp_path: Path) -> None:
    invoker = FakeInvoker()
    schema = {"type": "object", "required": ["order_id"], "properties": {"order_id": {"type": "string"}}}
    dispatcher, dead_letters = _dispatcher(
        tmp_path, [_binding("f::pay")], invoker, payload={"order_id": "{{ event.total }}"}, payload_schema=schema
    )

    assert await dispatcher.deliver(_event(total=12)) == "dead_lettered"

    assert invoker.calls == []
    (record,) = dead_letters.records
    assert (record["error"]["code"], record["attempts"]) == ("payload_schema_violation", 0)
    assert "order_id" in record["error"]["message"]


async def test_an_undecodable_event_is_dead_lettered_once_with_no_binding(tmp_path: Path) -> None:
    invoker = FakeInvoker()
    dispatcher, dead_letters = _dispatcher(tmp_path, [_binding("f::a"), _binding("f::b")], invoker)
    event = Event(id="e1", source="orders", fields={"total": None}, error=DecodeError("not JSON at byte 0"))

    assert await dispatcher.deliver(event) == "dead_lettered"

    assert invoker.calls == []
    (record,) = dead_letters.records
    assert (record["binding"], record["error"]["code"], record["attempts"]) == (None, "decode_error", 0)
