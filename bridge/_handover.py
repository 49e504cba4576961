"""Calls from the bridge's loop to the SDK's loop and answers back, one wake-up of each thread per batch.

``trigger_async`` awaited on a loop other than the SDK's hands every call over on its own (one cross-thread
wake-up each way per call, and the thread switches that come with them). Under load many calls start and finish
close together, so the hand-over here queues them and wakes the other thread once for all that are waiting.
Calls started on the SDK's own loop pay no hop inside the SDK.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

Call = Callable[[dict[str, Any]], Coroutine[Any, Any, Any]]


class Handover:
    """Runs ``call(request)`` on ``sdk_loop`` for requests made on ``bridge_loop``; answers come back as futures
    of the bridge loop."""

    def __init__(self, call: Call, sdk_loop: asyncio.AbstractEventLoop, bridge_loop: asyncio.AbstractEventLoop) -> None:
        self._call = call
        self._sdk_loop = sdk_loop
        self._bridge_loop = bridge_loop
        self._out: deque[tuple[dict[str, Any], asyncio.Future[Any]]] = deque()
        self._back: deque[tuple[asyncio.Future[Any], asyncio.Task[Any]]] = deque()
        self._lock = threading.Lock()
        self._out_scheduled = False
        self._back_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()  # SDK-loop tasks, kept referenced until they finish

    def submit(self, request: dict[str, Any]) -> asyncio.Future[Any]:
        """On the bridge loop: start a call; the future resolves with its result or exception."""
        future: asyncio.Future[Any] = self._bridge_loop.create_future()
        self._out.append((request, future))
        with self._lock:
            if self._out_scheduled:
                return future
            self._out_scheduled = True
        try:
            self._sdk_loop.call_soon_threadsafe(self._start_waiting)
        except RuntimeError as exc:  # the SDK's loop is closed: the client was shut down
            with self._lock:
                self._out_scheduled = False
            self._fail_waiting(exc)
        return future

    def _fail_waiting(self, exc: BaseException) -> None:
        while self._out:
            _, future = self._out.popleft()
            if not future.done():
                future.set_exception(exc)

    def _start_waiting(self) -> None:
        """On the SDK loop: start every queued call (the flag is cleared first, so nothing queued is missed)."""
        with self._lock:
            self._out_scheduled = False
        while self._out:
            request, future = self._out.popleft()
            task = self._sdk_loop.create_task(self._call(request))
            self._tasks.add(task)
            task.add_done_callback(partial(self._finished, future))

    def _finished(self, future: asyncio.Future[Any], task: asyncio.Task[Any]) -> None:
        """On the SDK loop: queue the answer for the bridge loop."""
        self._tasks.discard(task)
        self._back.append((future, task))
        with self._lock:
            if self._back_scheduled:
                return
            self._back_scheduled = True
        try:
            self._bridge_loop.call_soon_threadsafe(self._answer_waiting)
        except RuntimeError:  # the bridge loop is gone: nobody waits for these answers any more
            with self._lock:
                self._back_scheduled = False

    def _answer_waiting(self) -> None:
        """On the bridge loop: resolve every answered call."""
        with self._lock:
            self._back_scheduled = False
        while self._back:
            future, task = self._back.popleft()
            if future.done():  # the caller gave up (link dropped, shutdown)
                if not task.cancelled():
                    task.exception()  # read, so asyncio does not report it as "never retrieved"
                continue
            if task.cancelled():  # the SDK stopped the call (its shutdown): the caller sees a link failure
                future.set_exception(ConnectionError("the iii SDK stopped the call"))
                continue
            exc = task.exception()
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(task.result())
