"""An in-memory :class:`~bridge.sources.Sink` for testing sources without the runtime (a test utility, never a
product feature).

A source only sees the Sink protocol, so its tests need a stand-in for :class:`bridge.runtime.SourceRunner` that
keeps the runtime's back-pressure rules exactly, because sources are built around them: ``submit`` waits while
nothing is bound or the in-flight window is full; waiting submits get free slots in arrival order, ahead of any
``offer``; ``offer`` accepts only what ``submit`` would accept at once. Instead of dispatching, the sink records
every accepted event and acknowledges it itself, right away or when the test says so, so a test can hold events
in flight and watch what the source does meanwhile (commits held back, rows kept locked, checkpoints not
written).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from bridge._window import Window
from bridge.sources import Event, OnDone, Outcome, Source

if TYPE_CHECKING:
    from bridge.sources import Sink

__all__ = ["MemorySink", "running", "stop_source", "wait_ended"]

_IDS_SHOWN = 20  # how many event ids a failure message lists


class MemorySink:
    """The runtime's side of the Sink protocol, in memory.

    Configuration (keyword only):

    - ``bound``: whether a function is bound from the start (``bind``/``unbind`` change it later).
    - ``window``: the in-flight window (the runtime's ``max_in_flight``).
    - ``hold``: which accepted events stay in flight until the test acknowledges them with :meth:`ack` or
      :meth:`ack_all`: ``True`` for every event, or a predicate (the ``hold`` attribute may be replaced at any
      time; it is asked once per accepted event, so a redelivered event is held once per delivery). Every other
      event is acknowledged as ``"delivered"`` from its own task, as the runtime does once a delivery is done.
    - ``ack_delay_s``: how long each automatic acknowledgement waits first (a delivery that takes a while).
    - ``wait_timeout_s`` and ``quiet_s``: the defaults of :meth:`wait_for` and :meth:`exactly`.

    Unlike the runtime it does not serialise events with the same ``order_key`` and does not stall
    acknowledgements while nothing is bound: acknowledging is the test's business.
    """

    def __init__(
        self,
        *,
        bound: bool = True,
        window: int = 1000,
        hold: bool | Callable[[Event], bool] = False,
        ack_delay_s: float = 0.0,
        wait_timeout_s: float = 5.0,
        quiet_s: float = 0.3,
    ) -> None:
        self._window = Window(window)
        self.hold: Callable[[Event], bool] = hold if callable(hold) else (lambda event: hold)
        self.ack_delay_s = ack_delay_s
        self.wait_timeout_s = wait_timeout_s
        self.quiet_s = quiet_s
        self.events: list[Event] = []  # every accepted event, in acceptance order (redeliveries included)
        self.held: list[tuple[Event, OnDone]] = []  # events held for the test to acknowledge, in acceptance order
        self.activations = 0  # how often the source said it became the active replica
        self.deactivations = 0  # how often it said it stopped being the active replica
        self._bound = asyncio.Event()
        if bound:
            self._bound.set()
        self._acks: set[asyncio.Task[None]] = set()  # automatic acknowledgements under way
        self._arrived = asyncio.Event()  # set at each accepted event, for wait_for

    # Sink ----------------------------------------------------------------------------------------------------

    async def submit(self, event: Event, on_done: OnDone) -> None:
        """Accept ``event``, first waiting while nothing is bound or the window is full; waiting submits are
        served in arrival order."""
        waited = False
        while not self._accept(event, on_done, waited=waited):
            if not self._bound.is_set():
                await self._bound.wait()
                continue
            await self._window.wait_turn()
            waited = True

    def offer(self, event: Event, on_done: OnDone) -> bool:
        """Accept ``event`` only if ``submit`` would not wait: bound, room in the window and no submit waiting
        for room. False accepts (and records) nothing."""
        return self._accept(event, on_done, waited=False)

    def has_bindings(self) -> bool:
        return self._bound.is_set()

    async def wait_for_bindings(self) -> None:
        await self._bound.wait()

    def in_flight(self) -> int:
        """Events accepted and not yet acknowledged (held ones included)."""
        return self._window.taken

    def window_full(self) -> bool:
        return self._window.full

    @property
    def peak_in_flight(self) -> int:
        return self._window.peak

    def activate(self) -> None:
        self.activations += 1

    def deactivate(self) -> None:
        self.deactivations += 1

    # test controls -------------------------------------------------------------------------------------------

    def bind(self) -> None:
        """A function is bound: waiting submits go on."""
        self._bound.set()

    def unbind(self) -> None:
        """The last binding is gone: ``submit`` waits and ``offer`` refuses until :meth:`bind`."""
        self._bound.clear()

    async def ack(self, event_id: str, outcome: Outcome = "delivered") -> None:
        """Acknowledge the earliest held delivery of ``event_id`` and free its slot."""
        index = next((i for i, (event, _) in enumerate(self.held) if event.id == event_id), None)
        if index is None:
            raise AssertionError(f"no held event {event_id}; held: {[event.id for event, _ in self.held]}")
        _, on_done = self.held.pop(index)
        await self._acknowledge(on_done, outcome)

    async def ack_all(self, outcome: Outcome = "delivered") -> None:
        """Acknowledge every event held now, oldest first (events held meanwhile stay held), then wait for the
        automatic acknowledgements under way."""
        for _ in range(len(self.held)):
            _, on_done = self.held.pop(0)
            await self._acknowledge(on_done, outcome)
        await self.settle()

    async def settle(self) -> None:
        """Wait for the automatic acknowledgements under way now, so that their effects (a commit, a checkpoint,
        a deleted row) have happened. Re-raises what an acknowledgement hook raised."""
        pending = list(self._acks)
        if pending:
            await asyncio.gather(*pending)

    async def wait_for(self, count: int, timeout: float | None = None) -> list[Event]:
        """Wait until at least ``count`` events were accepted (AssertionError after ``timeout`` s, by default
        ``wait_timeout_s``), then :meth:`settle`. Returns every accepted event."""
        limit = self.wait_timeout_s if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                while len(self.events) < count:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {limit} s waiting for {count} events: {self._got()}") from None
        await self.settle()
        return self.events

    async def exactly(self, count: int, timeout: float | None = None) -> list[Event]:
        """:meth:`wait_for` ``count`` events, then make sure no more arrive for ``quiet_s``."""
        await self.wait_for(count, timeout)
        await asyncio.sleep(self.quiet_s)
        await self.settle()
        assert len(self.events) == count, f"expected exactly {count} events: {self._got()}"
        return self.events

    def ids(self) -> list[str]:
        """The ids of the accepted events, in acceptance order."""
        return [event.id for event in self.events]

    # internals -----------------------------------------------------------------------------------------------

    def _accept(self, event: Event, on_done: OnDone, *, waited: bool) -> bool:
        # ``waited``: the caller is a submit that was woken for a free slot, so the waiters ahead are not ahead.
        if not self._bound.is_set() or not self._window.take(waited=waited):
            return False
        self.events.append(event)
        self._arrived.set()
        if self.hold(event):
            self.held.append((event, on_done))
        else:
            task = asyncio.get_running_loop().create_task(self._deliver(on_done), name=f"ack {event.id}")
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)
        return True

    async def _deliver(self, on_done: OnDone) -> None:
        # Like the runtime, the acknowledgement runs in the event's own task, after submit or offer returned.
        try:
            if self.ack_delay_s:
                await asyncio.sleep(self.ack_delay_s)
            await on_done("delivered")
        finally:
            self._release()

    async def _acknowledge(self, on_done: OnDone, outcome: Outcome) -> None:
        try:
            await on_done(outcome)
        finally:
            self._release()

    def _release(self) -> None:
        self._window.release()

    def _got(self) -> str:
        ids = self.ids()
        shown = ", ".join(ids[-_IDS_SHOWN:])
        return f"got {len(ids)} ({'..., ' if len(ids) > _IDS_SHOWN else ''}{shown})"


if TYPE_CHECKING:
    _conforms: type[Sink] = MemorySink  # mypy checks that MemorySink implements the whole Sink protocol


# running a source under test ------------------------------------------------------------------------------------


async def wait_ended(task: asyncio.Task[None], timeout_s: float) -> None:
    """Wait for a source's cancelled ``run`` task to end, at most ``timeout_s``, without cancelling it again (that
    would cut its shutdown short); re-raise what it raised other than the cancellation."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    assert done, f"the source did not stop within {timeout_s} s of its cancellation"
    error = None if task.cancelled() else task.exception()
    if error is not None:
        raise error


async def stop_source(task: asyncio.Task[None], timeout_s: float = 10.0) -> None:
    """Cancel a source's ``run`` task and wait for it to end (see :func:`wait_ended`)."""
    task.cancel()
    await wait_ended(task, timeout_s)


@contextlib.asynccontextmanager
async def running(source: Source, sink: Sink, *, stop_timeout_s: float = 10.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``source`` into ``sink`` for the block; stop it at the end (:func:`stop_source`)."""
    task = asyncio.create_task(source.run(sink))
    try:
        yield task
    finally:
        await stop_source(task, stop_timeout_s)
