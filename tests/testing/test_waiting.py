"""bridge.testing.waiting: the polling helpers return the truthy value, or fail naming what was awaited."""

from __future__ import annotations

import itertools

import pytest

from bridge.testing.waiting import until, wait_for


def test_wait_for_returns_the_first_truthy_value() -> None:
    counter = itertools.count()
    assert wait_for(lambda: next(counter) >= 3 and "done", 5, interval=0.001) == "done"


def test_wait_for_names_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"^the answer not reached within 0.05 s$"):
        wait_for(lambda: None, 0.05, "the answer", interval=0.01)


async def test_until_returns_the_value_and_describes_the_state_on_timeout() -> None:
    counter = itertools.count()
    assert await until(lambda: next(counter) >= 2 and 42, 5, interval=0.001) == 42
    state = {"seen": 7}
    with pytest.raises(AssertionError, match=r"^7 rows not reached within 0.05 s$"):
        await until(lambda: False, 0.05, lambda: f"{state['seen']} rows")
