"""MemorySink, the runtime stand-in of the source tests: it must keep the runtime's back-pressure rules (window,
waiting submits served in order and ahead of offers, nothing accepted while unbound), or source tests would pass
against rules the runtime does not have."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from bridge.sources import Event, OnDone, Outcome, Sink
from bridge.testing.sink import MemorySink, running, stop_source


class Hooks:
    """Acknowledgement hooks that record which event was acknowledged with which outcome."""

    def __init__(self) -> None:
        self.done: list[tuple[str, Outcome]] = []

    def for_(self, event_id: str) -> OnDone:
        async def on_done(outcome: Outcome) -> None:
            self.done.append((event_id, outcome))

        return on_done


def ev(event_id: str) -> Event:
    return Event(id=event_id, source="test")


async def started(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``coro`` as a task and let it reach its first wait."""
    task = asyncio.create_task(coro)
    for _ in range(3):
        await asyncio.sleep(0)
    return task


async def test_offer_accepts_at_once_and_acknowledges_from_its_own_task() -> None:
    sink, hooks = MemorySink(), Hooks()
    assert sink.offer(ev("a"), hooks.for_("a")) is True
    assert sink.ids() == ["a"] and sink.in_flight() == 1
    assert hooks.done == []  # not inside offer: from the event's task, like a delivery
    await sink.settle()
    assert hooks.done == [("a", "delivered")]
    assert sink.in_flight() == 0 and sink.peak_in_flight == 1


async def test_unbound_offer_refuses_and_submit_waits_until_bind() -> None:
    sink, hooks = MemorySink(bound=False), Hooks()
    assert not sink.has_bindings()
    assert sink.offer(ev("a"), hooks.for_("a")) is False
    assert sink.events == [] and sink.in_flight() == 0
    submit = await started(sink.submit(ev("b"), hooks.for_("b")))
    assert not submit.done() and sink.events == []
    sink.bind()
    await asyncio.wait_for(submit, 1)
    assert sink.ids() == ["b"]


async def test_a_full_window_refuses_offers_and_makes_submit_wait_for_an_ack() -> None:
    sink, hooks = MemorySink(window=2, hold=True), Hooks()
    assert sink.offer(ev("a"), hooks.for_("a")) and sink.offer(ev("b"), hooks.for_("b"))
    assert sink.window_full() and sink.in_flight() == 2
    assert sink.offer(ev("c"), hooks.for_("c")) is False
    submit = await started(sink.submit(ev("d"), hooks.for_("d")))
    assert not submit.done()
    await sink.ack("b", "dead_lettered")
    await asyncio.wait_for(submit, 1)
    assert sink.ids() == ["a", "b", "d"]
    assert hooks.done == [("b", "dead_lettered")]
    assert [event.id for event, _ in sink.held] == ["a", "d"]


async def test_waiting_submits_get_freed_slots_in_order_and_ahead_of_offers() -> None:
    sink, hooks = MemorySink(window=1, hold=True), Hooks()
    assert sink.offer(ev("a"), hooks.for_("a"))
    first = await started(sink.submit(ev("b"), hooks.for_("b")))
    second = await started(sink.submit(ev("c"), hooks.for_("c")))
    await sink.ack("a")
    # The slot is free but promised to the first waiting submit: an offer must not take it.
    assert not sink.window_full()
    assert sink.offer(ev("x"), hooks.for_("x")) is False
    await asyncio.wait_for(first, 1)
    assert not second.done()
    await sink.ack("b")
    await asyncio.wait_for(second, 1)
    assert sink.ids() == ["a", "b", "c"]
    assert sink.offer(ev("y"), hooks.for_("y")) is False  # window full again
    await sink.ack_all()
    assert sink.offer(ev("z"), hooks.for_("z")) is True  # nobody waits any more
    assert hooks.done == [("a", "delivered"), ("b", "delivered"), ("c", "delivered")]


async def test_a_cancelled_waiting_submit_passes_its_slot_on() -> None:
    sink, hooks = MemorySink(window=1, hold=True), Hooks()
    assert sink.offer(ev("a"), hooks.for_("a"))
    first = await started(sink.submit(ev("b"), hooks.for_("b")))
    second = await started(sink.submit(ev("c"), hooks.for_("c")))
    await sink.ack("a")  # wakes the first waiter ...
    first.cancel()  # ... which is cancelled before it takes the slot
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    assert sink.ids() == ["a", "c"]


async def test_unbind_stops_intake_and_in_flight_events_still_finish() -> None:
    sink, hooks = MemorySink(hold=lambda event: event.id == "held"), Hooks()
    assert sink.offer(ev("held"), hooks.for_("held"))
    sink.unbind()
    assert not sink.has_bindings()
    assert sink.offer(ev("a"), hooks.for_("a")) is False
    submit = await started(sink.submit(ev("b"), hooks.for_("b")))
    waiting = await started(sink.wait_for_bindings())
    assert not submit.done() and not waiting.done()
    await sink.ack("held")
    assert hooks.done == [("held", "delivered")] and sink.in_flight() == 0
    sink.bind()
    await asyncio.wait_for(asyncio.gather(submit, waiting), 1)
    await sink.settle()
    assert sink.ids() == ["held", "b"]
    assert hooks.done == [("held", "delivered"), ("b", "delivered")]


async def test_ack_takes_the_earliest_held_delivery_of_a_redelivered_event() -> None:
    sink = MemorySink(hold=True)
    outcomes: list[tuple[int, Outcome]] = []

    def hook(delivery: int) -> OnDone:
        async def on_done(outcome: Outcome) -> None:
            outcomes.append((delivery, outcome))

        return on_done

    await sink.submit(ev("e"), hook(1))
    await sink.submit(ev("e"), hook(2))
    await sink.ack("e", "filtered")
    assert outcomes == [(1, "filtered")] and len(sink.held) == 1
    with pytest.raises(AssertionError, match="no held event other"):
        await sink.ack("other")


async def test_the_hold_predicate_is_asked_per_accepted_event_and_may_change() -> None:
    sink, hooks = MemorySink(hold=lambda event: True), Hooks()
    await sink.submit(ev("a"), hooks.for_("a"))
    sink.hold = lambda event: False
    await sink.submit(ev("b"), hooks.for_("b"))
    await sink.settle()
    assert hooks.done == [("b", "delivered")]
    assert [event.id for event, _ in sink.held] == ["a"]


async def test_ack_delay_keeps_the_slot_taken_until_the_acknowledgement() -> None:
    sink, hooks = MemorySink(window=1, ack_delay_s=0.1), Hooks()
    await sink.submit(ev("a"), hooks.for_("a"))
    await asyncio.sleep(0.02)
    assert sink.window_full() and hooks.done == []
    await sink.submit(ev("b"), hooks.for_("b"))  # waits for the delayed acknowledgement of a
    assert hooks.done == [("a", "delivered")]


async def test_wait_for_and_exactly_fail_with_what_arrived() -> None:
    sink, hooks = MemorySink(quiet_s=0.05), Hooks()
    assert sink.offer(ev("a"), hooks.for_("a"))
    assert await sink.wait_for(1) == sink.events
    assert hooks.done == [("a", "delivered")]  # wait_for settles the acknowledgements under way
    with pytest.raises(AssertionError, match=r"waiting for 2 events: got 1 \(a\)"):
        await sink.wait_for(2, timeout=0.05)

    async def late() -> None:
        await asyncio.sleep(0.01)
        assert sink.offer(ev("b"), hooks.for_("b"))

    task = asyncio.create_task(late())
    with pytest.raises(AssertionError, match=r"expected exactly 1 events: got 2 \(a, b\)"):
        await sink.exactly(1)
    await task


def test_activate_counts_and_a_window_must_hold_an_event() -> None:
    sink = MemorySink()
    sink.activate()
    sink.activate()
    assert sink.activations == 2
    with pytest.raises(ValueError, match="a window holds at least 1 event"):
        MemorySink(window=0)


class _Source:
    """A source whose run() fails, ignores its cancellation for a while, or ends by cancellation."""

    def __init__(self, *, fail: bool = False, linger_s: float = 0.0) -> None:
        self.fail = fail
        self.linger_s = linger_s

    async def run(self, sink: Sink) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.fail:
                raise RuntimeError("broken on the way out") from None
            await asyncio.shield(asyncio.sleep(self.linger_s))
            raise


async def test_running_stops_the_source_and_reports_what_went_wrong() -> None:
    async with running(_Source(), MemorySink()) as task:
        assert not task.done()
    assert task.cancelled()
    with pytest.raises(RuntimeError, match="broken on the way out"):
        async with running(_Source(fail=True), MemorySink()):
            await asyncio.sleep(0)  # let run() start, so that its cancellation reaches it
    slow = asyncio.create_task(_Source(linger_s=0.5).run(MemorySink()))
    await asyncio.sleep(0)
    with pytest.raises(AssertionError, match=r"did not stop within 0.1 s"):
        await stop_source(slow, 0.1)
    await asyncio.gather(slow, return_exceptions=True)
