"""The batched hand-over between the bridge's loop and another thread's loop (the SDK's, in production)."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bridge._handover import Handover


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


async def test_calls_run_on_the_other_loop_and_answer_back(other_loop: asyncio.AbstractEventLoop) -> None:
    seen_loops: set[int] = set()

    async def call(request: dict[str, Any]) -> Any:
        seen_loops.add(id(asyncio.get_running_loop()))
        await asyncio.sleep(0.001 * (request["n"] % 3))
        if request["n"] % 10 == 7:
            raise ValueError(f"bad {request['n']}")
        return request["n"] * 2

    handover = Handover(call, other_loop, asyncio.get_running_loop())
    futures = [handover.submit({"n": n}) for n in range(500)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    for n, result in enumerate(results):
        if n % 10 == 7:
            assert isinstance(result, ValueError) and str(result) == f"bad {n}"
        else:
            assert result == n * 2
    assert seen_loops == {id(other_loop)}


async def test_a_caller_that_gave_up_is_not_answered(other_loop: asyncio.AbstractEventLoop) -> None:
    release = threading.Event()

    async def call(request: dict[str, Any]) -> Any:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 5)
        return "late"

    handover = Handover(call, other_loop, asyncio.get_running_loop())
    future = handover.submit({})
    future.set_exception(ConnectionError("link dropped"))  # what the engine link does when the link drops
    release.set()
    await asyncio.sleep(0.2)
    with pytest.raises(ConnectionError):
        future.result()
    assert (await handover.submit({})) == "late"


async def test_a_closed_other_loop_fails_calls_at_once() -> None:
    closed = asyncio.new_event_loop()
    closed.close()

    async def call(request: dict[str, Any]) -> Any:
        return None

    handover = Handover(call, closed, asyncio.get_running_loop())
    with pytest.raises(RuntimeError):
        await handover.submit({})


async def test_a_call_abandoned_by_its_caller_that_fails_later_is_not_reported_as_never_retrieved(
    other_loop: asyncio.AbstractEventLoop,
) -> None:
    # The engine link fails a call at once when the link drops; the SDK's own call fails much later (TIMEOUT).
    reported: list[str] = []
    other_loop.set_exception_handler(lambda loop, context: reported.append(str(context.get("message"))))
    release = threading.Event()

    async def call(request: dict[str, Any]) -> Any:
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 5)
        raise TimeoutError("invocation timed out")

    handover = Handover(call, other_loop, asyncio.get_running_loop())
    future = handover.submit({})
    future.set_exception(ConnectionError("link dropped"))
    release.set()
    await asyncio.sleep(0.2)
    with pytest.raises(ConnectionError):
        future.result()
    del future
    done = threading.Event()
    other_loop.call_soon_threadsafe(lambda: (gc.collect(), done.set()))
    await asyncio.get_running_loop().run_in_executor(None, done.wait, 5)
    assert not [m for m in reported if "never retrieved" in m], reported
