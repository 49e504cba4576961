"""Wall-clock times as the ISO-8601 text events and records carry: UTC, milliseconds, ``Z``.

Formatting goes through integers (no float rounding of the milliseconds) and formats the date and time of day
once per second: events arrive in bursts within the same second, and this runs for every one of them.
"""

from __future__ import annotations

import functools
import math
import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@functools.lru_cache(maxsize=64)
def _iso_second(seconds: int) -> str:
    return (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")


def iso_ms(timestamp_ms: int) -> str | None:
    """``2023-11-14T22:13:20.123Z`` for milliseconds since the epoch; None for a time outside years 1..9999 (a
    Kafka producer may set any 64-bit timestamp)."""
    seconds, millis = divmod(timestamp_ms, 1000)
    try:
        return f"{_iso_second(seconds)}.{millis:03d}Z"
    except OverflowError:
        return None


def iso_from_epoch(seconds: float) -> str:
    """The time ``seconds`` after the epoch, truncated to the millisecond. ValueError outside years 1..9999."""
    text = iso_ms(math.floor(seconds * 1000))
    if text is None:
        raise ValueError(f"{seconds} s after the epoch is outside years 1..9999")
    return text


def iso_from_ns(ns: int) -> str:
    """Like :func:`iso_from_epoch` for ``time.time_ns()`` values (exact: no float on the way)."""
    text = iso_ms(ns // 1_000_000)
    if text is None:
        raise ValueError(f"{ns} ns after the epoch is outside years 1..9999")
    return text


def iso_now() -> str:
    return iso_from_ns(time.time_ns())
