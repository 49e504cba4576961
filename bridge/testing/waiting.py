"""Polling until a condition holds: the wait loops of the test utilities, blocking and async."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


def wait_for(
    predicate: Callable[[], _T], timeout: float = 10.0, what: str = "condition", interval: float = 0.02
) -> _T:
    """Poll ``predicate`` until it returns something truthy and return that; AssertionError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


async def until(
    check: Callable[[], _T],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.01,
) -> _T:
    """:func:`wait_for` for async tests: sleeps on the running loop, so the code under test keeps running.
    ``what`` may be a callable, to describe the state at the moment of failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what} not reached within {timeout} s")
        await asyncio.sleep(interval)
