"""The in-flight window of one source: how many of its events may be between submit and done at once.

The runtime's Sink (:class:`bridge.runtime.SourceRunner`) and its in-memory test double
(:class:`bridge.testing.sink.MemorySink`) keep the same rule with it: a slot that frees goes to the submit that
has waited longest, and an ``offer`` (which never waits) is refused while any submit waits, so a source cannot
jump its own queue.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Window:
    """At most ``size`` slots taken; waiters are served in arrival order."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a window holds at least 1 event, not {size}")
        self.size = size
        self.taken = 0
        self.peak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def full(self) -> bool:
        return self.taken >= self.size

    def take(self, *, waited: bool = False) -> bool:
        """Take a slot if one is free and nobody waits for one (``waited``: the caller is the waiter that was
        just woken, so the queue does not hold it back)."""
        if self.taken >= self.size or (self._waiters and not waited):
            return False
        self.taken += 1
        if self.taken > self.peak:
            self.peak = self.taken
        return True

    def release(self) -> None:
        """Free a slot and wake the longest waiter."""
        self.taken -= 1
        if self._waiters:
            self.wake_next()

    async def wait_turn(self) -> None:
        """Wait until a released slot is offered to this caller (then it must :meth:`take` with ``waited``). A
        caller cancelled after it was woken passes the slot on to the next waiter."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._waiters.remove(waiter)
                self.wake_next()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def wake_next(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                return
