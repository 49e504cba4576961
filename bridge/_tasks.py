"""Cancelling tasks so that they really end.

On Python 3.11, ``asyncio.wait_for`` returns its result instead of raising when the cancellation and the result
arrive together: the cancel is lost and the task goes on (the iii SDK awaits every call through ``wait_for``). A
single ``cancel()`` then ``gather()`` may therefore wait forever for a loop that was told to stop. These helpers
cancel again until each task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

_RECANCEL_S = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again any that swallowed the cancel. Their
    outcomes are not raised (an owner that cares reads them). Cancelling the caller meanwhile still waits for them,
    then raises CancelledError."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    interrupted = False
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=_RECANCEL_S)
        except asyncio.CancelledError:
            interrupted = True
            pending = {t for t in pending if not t.done()}
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" when it is collected
    if interrupted:
        raise asyncio.CancelledError


async def first_ended(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Wait until one of ``tasks`` ends and raise its exception, if any (what an ending that raised nothing means
    is the caller's to say). The others go on."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        task.result()


async def first_then_cancel(tasks: list[asyncio.Task[Any]]) -> None:
    """:func:`first_ended`, then the others are cancelled and waited for in every case, the caller's cancel
    included."""
    try:
        await first_ended(tasks)
    finally:
        await cancel_and_wait(tasks)
