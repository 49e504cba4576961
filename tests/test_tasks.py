"""bridge._tasks: a cancel that a task swallows (Python 3.11's ``wait_for`` does so when the awaited result
arrives with the cancel, and the iii SDK awaits every call through it) must not leave shutdown waiting forever."""

from __future__ import annotations

import asyncio

import pytest

from bridge._tasks import cancel_and_wait, first_then_cancel


def _swallowing(rounds: list[int]) -> asyncio.Task[None]:
    """A loop, like the reconciliation loop, whose first cancel is lost on the way."""
    async def loop() -> None:
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
            rounds.append(1)

    return asyncio.create_task(loop())


async def test_one_cancel_then_gather_waits_forever_for_a_task_that_swallowed_it() -> None:
    task = _swallowing([])
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(asyncio.gather(task, return_exceptions=True)), 0.5)
    await cancel_and_wait([task])


async def test_cancel_and_wait_cancels_again_until_the_task_has_ended() -> None:
    rounds: list[int] = []
    tasks = [_swallowing(rounds), _swallowing(rounds)]
    await asyncio.sleep(0.02)
    await asyncio.wait_for(cancel_and_wait(tasks), 5)
    assert all(t.cancelled() for t in tasks)


async def test_cancel_and_wait_reads_failures_and_ignores_finished_tasks() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait([failed])
    assert isinstance(failed.exception(), ValueError)


async def test_a_cancelled_caller_still_waits_for_its_tasks_then_raises() -> None:
    rounds: list[int] = []
    child = _swallowing(rounds)
    await asyncio.sleep(0.02)
    caller = asyncio.create_task(cancel_and_wait([child]))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert child.done()


async def test_first_then_cancel_raises_the_first_failure_and_ends_the_others() -> None:
    rounds: list[int] = []
    other = _swallowing(rounds)

    async def fails() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("the listener died")

    with pytest.raises(RuntimeError, match="the listener died"):
        await asyncio.wait_for(first_then_cancel([other, asyncio.create_task(fails())]), 5)
    assert other.cancelled()
