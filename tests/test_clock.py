"""bridge._clock: ISO-8601 UTC text with milliseconds, as events and dead-letter records carry it."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime

import pytest

from bridge._clock import iso_from_epoch, iso_from_ns, iso_ms, iso_now


def _reference(ms: int) -> str:
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def test_milliseconds_agree_with_datetime() -> None:
    rng = random.Random(7)
    for ms in [0, 999, 1000, 1_700_000_000_123, 253402300799999, -1, -1001, *(rng.randrange(-10**12, 10**13)
                                                                          for _ in range(2000))]:
        assert iso_ms(ms) == _reference(ms)


def test_seconds_and_nanoseconds_truncate_to_the_millisecond() -> None:
    assert iso_from_epoch(1_700_000_000.1239) == "2023-11-14T22:13:20.123Z"
    assert iso_from_epoch(-0.0005) == "1969-12-31T23:59:59.999Z"
    assert iso_from_ns(1_700_000_000_123_999_999) == "2023-11-14T22:13:20.123Z"


def test_times_outside_years_1_to_9999() -> None:
    assert iso_ms(2**62) is None
    with pytest.raises(ValueError, match="outside years"):
        iso_from_epoch(1e15)
    with pytest.raises(ValueError, match="outside years"):
        iso_from_ns(10**21)


def test_now_is_now() -> None:
    before = time.time()
    text = iso_now()
    after = time.time()
    assert iso_from_epoch(before) <= text <= iso_from_epoch(after)
