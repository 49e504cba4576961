"""The runtime's Sink: in-flight window, per-key ordering, acknowledgement, bounded memory under a flood.

A synthetic in-memory source and an in-process invoker stand in for a real source and the engine here (the real
ones are covered end to end in test_e2e_file.py and test_delivery.py); what is under test is the runtime.
"""

from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from bridge.bindings import Binding, BindingTable
from bridge.config import DeadLetterConfig, DeliveryConfig, RetryConfig, SourceConfig
from bridge.deadletter import FileDeadLetter
from bridge.dispatch import Dispatcher, Invocation, backoff_s
from bridge.runtime import SourceRunner
from bridge.sources import Event, Outcome
from bridge.sources.file.spec import FileSourceConfig
from tests.support.configs import source_config


class _Invoker:
    """Answers every call on the same loop after an optional delay, counting concurrency."""

    connected = True

    def __init__(self, delay_s: float = 0.0, record: bool = True) -> None:
        self.delay_s = delay_s
        self.record = record
        self.now = 0
        self.peak = 0
        self.calls: list[tuple[str, Any]] = []

    async def wait_connected(self) -> None:
        return None

    async def invoke(self, call: Invocation) -> Any:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s * random.random())
            if self.record:
                self.calls.append((call.function_id, call.payload))
            return {"ok": True}
        finally:
            self.now -= 1


def _source(tmp_path: Path, max_in_flight: int, payload: Any = None) -> SourceConfig:
    return source_config(
        "synthetic",
        FileSourceConfig(path=tmp_path),
        description="synthetic",
        delivery=DeliveryConfig(retry=RetryConfig(max_attempts=1), dead_letter=DeadLetterConfig(file=tmp_path / "dl")),
        max_in_flight=max_in_flight,
        payload=payload,
    )


def _runner(tmp_path: Path, max_in_flight: int, invoker: _Invoker, payload: Any = None) -> SourceRunner:
    source = _source(tmp_path, max_in_flight, payload)
    table = BindingTable(source.id)
    table.upsert(Binding("b1", source.id, "f::one", None, {}))
    dispatcher = Dispatcher(source, table, invoker, FileDeadLetter(tmp_path / "dl.jsonl"))
    return SourceRunner(source, dispatcher, table)


async def _flood(runner: SourceRunner, count: int, key_of: Any = None) -> tuple[int, set[int]]:
    """Submit ``count`` events as fast as the runner accepts them; return the worst submitted-minus-done gap and
    the set of acknowledged event numbers (kept only for small floods: it would weigh on the memory test)."""
    acked: set[int] = set()
    acked_count = 0
    worst = 0
    done = asyncio.Event()
    keep = count <= 1000

    for i in range(count):
        event = Event(id=f"e{i}", source="synthetic", fields={"n": i}, order_key=key_of(i) if key_of else None)

        async def on_done(outcome: Outcome, n: int = i) -> None:
            nonlocal acked_count
            acked_count += 1
            if keep:
                acked.add(n)
            if acked_count == count:
                done.set()

        await runner.submit(event, on_done)
        worst = max(worst, i + 1 - acked_count)
    await asyncio.wait_for(done.wait(), 60)
    return worst, acked


async def test_the_window_bounds_what_a_source_can_run_ahead(tmp_path: Path) -> None:
    invoker = _Invoker(delay_s=0.002)
    runner = _runner(tmp_path, 8, invoker)
    worst, acked = await _flood(runner, 500)
    assert acked == set(range(500))
    assert runner.peak_in_flight == 8
    assert worst <= 8
    assert invoker.peak <= 8


async def test_events_with_one_order_key_are_delivered_one_at_a_time_in_order(tmp_path: Path) -> None:
    invoker = _Invoker(delay_s=0.003)
    runner = _runner(tmp_path, 32, invoker, payload={"n": "{{ event.n }}", "key": "{{ event.n % 4 }}"})
    await _flood(runner, 400, key_of=lambda i: i % 4)
    for key in range(4):
        seen = [p["n"] for _, p in invoker.calls if p["key"] == key]
        assert seen == sorted(seen) and len(seen) == 100
    assert invoker.peak > 1  # different keys still run in parallel


async def test_memory_stays_flat_under_a_flood_of_100000_events(tmp_path: Path) -> None:
    async def peak_for(count: int) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            runner = _runner(tmp_path, 64, _Invoker(record=False))
            await _flood(runner, count)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small = await peak_for(10_000)
    large = await peak_for(100_000)
    # Ten times the events must not cost anything like ten times the memory: only the window is held.
    assert large < small * 1.5 + 1_000_000, (small, large)


async def test_an_acknowledgement_that_fails_does_not_stop_the_runner(tmp_path: Path) -> None:
    runner = _runner(tmp_path, 4, _Invoker())
    seen: list[str] = []

    async def bad_ack(outcome: Outcome) -> None:
        raise OSError("disk full")

    async def good_ack(outcome: Outcome) -> None:
        seen.append(outcome)

    await runner.submit(Event(id="x", source="synthetic", fields={}), bad_ack)
    await runner.submit(Event(id="y", source="synthetic", fields={}), good_ack)
    assert await runner.drain(5) == 0
    assert seen == ["delivered"]
    assert runner.in_flight() == 0


async def test_events_wait_while_nothing_is_bound(tmp_path: Path) -> None:
    invoker = _Invoker()
    runner = _runner(tmp_path, 4, invoker)
    runner.table.remove("b1")
    submitted = asyncio.create_task(runner.submit(Event(id="w", source="synthetic", fields={}), _noop))
    await asyncio.sleep(0.1)
    assert not submitted.done()
    runner.table.upsert(Binding("b2", "synthetic", "f::two", None, {}))
    await asyncio.wait_for(submitted, 2)
    assert await runner.drain(5) == 0
    assert [f for f, _ in invoker.calls] == ["f::two"]


class _Gate:
    """An invoker whose calls wait until released, one at a time or all at once."""

    connected = True

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self._waiting: list[asyncio.Future[None]] = []

    async def wait_connected(self) -> None:
        return None

    async def invoke(self, call: Invocation) -> Any:
        self.calls.append(call.payload)
        gate = asyncio.get_running_loop().create_future()
        self._waiting.append(gate)
        await gate
        return None

    async def release_one(self) -> None:
        self._waiting.pop(0).set_result(None)
        for _ in range(5):  # let the finished event free its slot and the woken submit run
            await asyncio.sleep(0)

    async def until_calls(self, count: int) -> None:
        for _ in range(100):
            if len(self.calls) >= count:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"{len(self.calls)} calls, expected {count}")


def _event(n: int) -> Event:
    return Event(id=f"e{n}", source="synthetic", fields={"n": n})


async def test_offer_starts_an_event_only_when_submit_would_not_wait(tmp_path: Path) -> None:
    gate = _Gate()
    runner = _runner(tmp_path, 2, gate, payload={"n": "{{ event.n }}"})
    assert runner.offer(_event(0), _noop) and runner.offer(_event(1), _noop)
    assert runner.window_full() and not runner.offer(_event(2), _noop)
    await gate.until_calls(2)
    queued = asyncio.create_task(runner.submit(_event(2), _noop))
    await asyncio.sleep(0.01)
    assert not queued.done()
    await gate.release_one()
    assert queued.done()
    # A submit that waited keeps its turn: an offer made while it waits is refused even with a free slot.
    late = asyncio.create_task(runner.submit(_event(3), _noop))
    await asyncio.sleep(0.01)
    runner._window.taken -= 1  # a slot frees without the runner waking anybody yet
    assert not runner.offer(_event(4), _noop)
    runner._window.taken += 1
    await gate.release_one()
    assert late.done()
    runner.table.remove("b1")
    assert not runner.offer(_event(5), _noop)
    for _ in range(2):
        await gate.release_one()
    await gate.until_calls(4)
    assert [c["n"] for c in gate.calls] == [0, 1, 2, 3]
    assert await runner.drain(5) == 0


async def test_a_lane_runs_its_key_in_order_and_a_drain_cut_counts_and_frees_what_it_held(tmp_path: Path) -> None:
    gate = _Gate()
    runner = _runner(tmp_path, 8, gate, payload={"n": "{{ event.n }}"})
    acked: list[int] = []

    def ack(n: int) -> Any:
        async def on_done(outcome: Outcome) -> None:
            acked.append(n)
        return on_done

    for n in range(5):  # one key: one call at a time; another key alongside
        assert runner.offer(Event(id=f"e{n}", source="synthetic", fields={"n": n}, order_key="a"), ack(n))
    assert runner.offer(Event(id="e9", source="synthetic", fields={"n": 9}, order_key="b"), ack(9))
    await gate.until_calls(2)
    assert sorted(c["n"] for c in gate.calls) == [0, 9]
    await gate.release_one()  # 0 (the first call made) is done: 1 starts at once
    await gate.until_calls(3)
    assert gate.calls[-1]["n"] == 1 and acked == [0]
    assert runner.in_flight() == 5
    # Cut while 1 and 9 are being delivered and 2, 3, 4 wait in the lane: all five are abandoned, unacknowledged.
    assert await runner.drain(0.05) == 5
    assert acked == [0] and runner.in_flight() == 0
    assert runner.offer(Event(id="e5", source="synthetic", fields={"n": 5}, order_key="a"), ack(5))  # a new lane
    await gate.until_calls(4)
    assert gate.calls[-1]["n"] == 5
    assert await runner.drain(0.01) == 1


async def test_waiting_submits_go_in_order_and_a_cancelled_one_passes_its_turn_on(tmp_path: Path) -> None:
    gate = _Gate()
    runner = _runner(tmp_path, 1, gate, payload={"n": "{{ event.n }}"})
    await runner.submit(_event(0), _noop)
    await gate.until_calls(1)
    waiting = [asyncio.create_task(runner.submit(_event(n), _noop)) for n in (1, 2, 3)]
    await asyncio.sleep(0.01)
    waiting[0].cancel()
    await asyncio.gather(waiting[0], return_exceptions=True)
    for count in (2, 3):
        await gate.release_one()
        await gate.until_calls(count)
    await gate.release_one()
    assert [c["n"] for c in gate.calls] == [0, 2, 3]
    assert all(task.done() for task in waiting)
    assert await runner.drain(5) == 0


async def test_a_submit_cancelled_after_it_was_woken_hands_the_slot_on(tmp_path: Path) -> None:
    gate = _Gate()
    runner = _runner(tmp_path, 1, gate, payload={"n": "{{ event.n }}"})
    await runner.submit(_event(0), _noop)
    await gate.until_calls(1)
    first, second = (asyncio.create_task(runner.submit(_event(n), _noop)) for n in (1, 2))
    await asyncio.sleep(0.01)
    # What a finishing event does (free its slot, wake the first waiter), then the woken submit is cancelled
    # before it could run: the slot must go to the next waiter instead of staying unused.
    runner._window.taken -= 1
    runner._window.wake_next()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await gate.until_calls(2)
    assert second.done() and [c["n"] for c in gate.calls] == [0, 2]
    runner._window.taken += 1  # event 0 is still running: give its slot back before it ends
    for _ in range(2):
        await gate.release_one()
    assert await runner.drain(5) == 0


async def _noop(outcome: Outcome) -> None:
    return None


def test_backoff_is_exponential_capped_and_jittered() -> None:
    retry = RetryConfig(initial_backoff_ms=200, max_backoff_ms=1000, multiplier=2.0, jitter=0.2)
    assert backoff_s(retry, 1, rand=lambda: 0.5) == pytest.approx(0.2)
    assert backoff_s(retry, 2, rand=lambda: 0.5) == pytest.approx(0.4)
    assert backoff_s(retry, 5, rand=lambda: 0.5) == pytest.approx(1.0)  # capped
    assert backoff_s(retry, 1, rand=lambda: 0.0) == pytest.approx(0.16)
    assert backoff_s(retry, 1, rand=lambda: 1.0) == pytest.approx(0.24)


async def test_events_wait_while_every_binding_is_stale_and_go_once_it_is_replayed(tmp_path: Path) -> None:
    invoker = _Invoker()
    runner = _runner(tmp_path, 4, invoker)
    runner.table.mark_stale()  # the engine link dropped
    assert not runner.offer(_event(0), _noop)
    assert runner.has_bindings()  # a listen source queues its notifications instead of dropping them as unbound
    submitted = asyncio.create_task(runner.submit(_event(1), _noop))
    await asyncio.sleep(0.1)
    assert not submitted.done() and invoker.calls == []
    runner.table.upsert(Binding("b1", "synthetic", "f::one", None, {}))  # the engine replays it
    await asyncio.wait_for(submitted, 2)
    assert await runner.drain(5) == 0
    assert [f for f, _ in invoker.calls] == ["f::one"]


async def test_an_event_waits_for_a_stale_binding_while_a_live_one_gets_it_at_once(tmp_path: Path) -> None:
    invoker = _Invoker()
    runner = _runner(tmp_path, 4, invoker)
    table = runner.table
    table.mark_stale()
    table.upsert(Binding("b2", "synthetic", "f::two", None, {}))  # bound anew after the reconnect
    outcomes: list[Outcome] = []

    async def on_done(outcome: Outcome) -> None:
        outcomes.append(outcome)

    await runner.submit(_event(1), on_done)
    await asyncio.sleep(0.1)
    assert [f for f, _ in invoker.calls] == ["f::two"] and outcomes == []  # b1 is stale: the event waits for it
    assert [b.id for b in table.expire_stale()] == ["b1"]  # never replayed within the grace period
    assert await runner.drain(5) == 0
    assert outcomes == ["delivered"] and table.expired == 1
    await runner.submit(_event(2), on_done)
    assert await runner.drain(5) == 0
    assert [f for f, _ in invoker.calls] == ["f::two", "f::two"]
